"""quantize under torch.distributed (gloo): 2 and 3 processes give the integer codes of one
process, float parts within float rounding, and every rank holds the same model."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import decoupleq
from decoupleq import QuantConfig
from decoupleq.distributed import Dist
from decoupleq.reference.synthetic import synthetic_problem

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_quantize_worker.py")


# ---------------------------------------------------------------------------
# The row split: a row's solve does not depend on the other rows
# ---------------------------------------------------------------------------


# What is exact and what is not: every step reads only its own row and H, so a
# row's integer codes do not depend on the other rows solved with it. The float
# parts do, in the last bits: OpenBLAS's sgemm rounds a row's dot products
# differently with the number of rows in the call (its small-matrix paths and
# edge kernels; with one BLAS thread too), e.g. RTN's row errors move by ~3e-7
# relative, and decoupleQ's float step (a small linear solve per row) turns that
# into scales ~1e-4 relative apart (measured up to 8.7e-5 on 576x576 W2 g32).
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method,rounding", [("rtn", "gptq"), ("gptq", "gptq"), ("decoupleq", "gptq"),
                                             ("decoupleq", "pgd")])
def test_solving_row_ranges_apart_gives_the_layers_codes(world, method, rounding):
    W, H = synthetic_problem(200, 128, seed=3)
    cfg = QuantConfig(method=method, rounding=rounding, bits=2, group_size=32, iterations=4,
                      pgd_steps_per_column=1)
    whole = decoupleq.quantize_weight(W, H, cfg)
    d = Dist(0, world)
    for r in range(world):
        lo, hi = d.row_range(200, r)
        part = decoupleq.quantize_weight(np.ascontiguousarray(W[lo:hi]), H, cfg)
        np.testing.assert_array_equal(part.codes, whole.codes[lo:hi])
        np.testing.assert_allclose(part.scale, whole.scale[lo:hi], rtol=1e-3)
        np.testing.assert_allclose(part.zero, whole.zero[lo:hi], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(part.loss, whole.loss[lo:hi], rtol=1e-4)


def test_row_ranges_cover_every_row_once():
    for m in (1, 2, 7, 576):
        for world in (1, 2, 3, 4):
            d = Dist(0, world)
            ranges = [d.row_range(m, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == m
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= 1


# ---------------------------------------------------------------------------
# Whole runs: N gloo processes against one
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out, world, *args):
    """Start ``world`` workers the way torchrun does (environment variables)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if world == 1:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def launch(out, world, *args):
    """Start ``world`` workers; wait for all; each rank's record."""
    procs = start(out, world, *args)
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append((p.returncode, err[-3000:]))
    assert all(rc == 0 for rc, _ in errs), errs
    return [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(world)]


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# 12 batches: steps of 6 split evenly over 2 and 3 ranks; 2 blocks of 7 layers.
ARGS = ["--batches-per-step", "6", "--layers", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> (output file, each rank's record), made once per module."""
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}") / "model.safetensors"
            done[world] = (out, launch(out, world, *ARGS))
        return done[world]

    return get


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_codes_of_one_process(runs, world):
    ref_path, ref_info = runs(1)
    out, info = runs(world)
    # Every rank ends with the same model, bit for bit.
    assert len({i["digest"] for i in info}) == 1
    assert all(i["world_size"] == world and i["bytes_moved"] > 0 for i in info)
    # Each layer's Hessian counted every rank's tokens.
    assert info[0]["layers"] == ref_info[0]["layers"]
    ref, got = tensors(ref_path), tensors(out)
    assert ref.keys() == got.keys()
    packed = [k for k in ref if k.endswith(".packed")]
    assert len(packed) == 2 * 7
    for k in packed:
        assert np.array_equal(got[k].numpy(), ref[k].numpy()), f"{k}: codes differ"
    # Float parts: Hessians summed in another order (float32 partial sums per rank) and
    # gradients summed over ranks move them in the last bits only.
    for k in ref:
        if ref[k].is_floating_point():
            np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_distributed_run_resumes(tmp_path, runs):
    """A 2-rank run with a run folder: killed on both ranks, resumed, same bytes as run whole."""
    whole, _ = runs(2)
    ckpt, out = tmp_path / "run", tmp_path / "model.safetensors"
    with pytest.raises(AssertionError):  # the kill: rank 0 dies, rank 1 then fails on its collective
        launch(out, 2, *ARGS, "--checkpoint", str(ckpt), "--kill-after-solves", "9")
    assert json.loads((ckpt / "progress.json").read_text())["done"] == 0
    launch(out, 2, *ARGS, "--checkpoint", str(ckpt), "--resume")
    assert out.read_bytes() == whole.read_bytes()


def test_a_layer_too_tall_for_the_row_split_is_solved_whole_and_broadcast(tmp_path):
    """decoupleQ stops a layer once under 1e-4 of its rows improve: with more than 10,000
    rows a few improving rows can stop it, and a row range would not stop with it; such a
    layer is solved by rank 0 and broadcast (here in a one-process gloo group)."""
    import torch.distributed as td

    W, H = synthetic_problem(64, 64, seed=5)
    cfg = QuantConfig(method="decoupleq", bits=2, group_size=32, iterations=3)
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        d = Dist(0, 1, None)
        got = d._solve_on_one_rank(torch.as_tensor(W), H, cfg)
    finally:
        td.destroy_process_group()
    ref = decoupleq.quantize_weight(W, H, cfg)
    for name in ("codes", "scale", "zero", "loss", "trace"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert d.bytes_moved == sum(getattr(ref, n).nbytes for n in ("codes", "scale", "zero", "loss", "trace"))


# ---------------------------------------------------------------------------
# A fixed shard count: the same bits on every world size
# ---------------------------------------------------------------------------

# benchmarks/bench_scale.py's "tiny" Llama (4 blocks, hidden 128, W2 g64, 4 iterations,
# block tuning 2 batches per step) on 6 x 32 tokens. Without shards, 1 and 2 ranks give
# different codes from block 1's o_proj on (measured: 0.2% of its codes, then 2-25% of
# every later layer's): per-rank float32 partial sums move H in the last bits, and a later
# solve turns that into a flipped near-tie.
SCALE = ["--model", "scale", "--shards", "6", "--num-batches", "6", "--seq", "32", "--batches-per-step", "2"]


@pytest.fixture(scope="module")
def scale_runs(tmp_path_factory):
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"scale{world}") / "model.safetensors"
            done[world] = (out, launch(out, world, *SCALE))
        return done[world]

    return get


@pytest.mark.parametrize("world", [2, 3])
def test_fixed_shards_give_the_same_hessians_and_model_bits_on_any_world_size(scale_runs, world):
    ref_path, ref_info = scale_runs(1)
    out, info = scale_runs(world)
    assert all(i["world_size"] == world for i in info) and ref_info[0]["world_size"] == 1
    # Every layer input's Hessian (16: q/k/v, o, gate/up, down per block), bit for bit.
    assert len(ref_info[0]["hessians"]) == 16
    for i in info:
        assert i["hessians"] == ref_info[0]["hessians"]
    # Every rank holds the one-process model, floats included (tuned scales, zeros, norms).
    assert {i["digest"] for i in info} == {ref_info[0]["digest"]}
    ref, got = tensors(ref_path), tensors(out)
    assert ref.keys() == got.keys() and sum(k.endswith(".packed") for k in ref) == 4 * 7
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_shards_must_cover_the_ranks():
    with pytest.raises(ValueError, match="shards"):
        Dist(0, 3).planned(2, 12)
    with pytest.raises(ValueError, match="shards"):
        decoupleq.ModelQuantConfig(shards=0)
    with pytest.raises(TypeError, match="shards"):
        decoupleq.ModelQuantConfig(shards=2.0)


def test_shard_ownership_covers_every_batch_once():
    for n in (3, 7, 12):
        for shards in (None, 3, 6):
            for world in (1, 2, 3):
                if shards is not None and shards < world:
                    continue
                plans = [Dist(r, world).planned(shards, n) for r in range(world)]
                mine = [[p.global_index(i) for i in range(len(p.shard(list(range(n)))))] for p in plans]
                assert sorted(j for m in mine for j in m) == list(range(n))
                for j in range(n):
                    r, i = plans[0].owner(j)
                    assert mine[r][i] == j
                if shards is None or shards % world == 0:  # round robin, as without shards
                    assert all(m == list(range(r, n, world)) for r, m in enumerate(mine))


def test_a_failing_rank_stops_the_others_without_waiting_for_the_timeout(tmp_path):
    """Rank 1 raises in its third solve and its process stays alive (a caller that catches
    the error): rank 0, which would otherwise wait in its next collective for gloo's
    timeout, raises PeerFailure at once."""
    out = tmp_path / "model.safetensors"
    # Rank 1 lingers far longer than rank 0 is given (a loaded machine can take minutes to
    # start two torch processes); gloo's own timeout is 30 minutes.
    procs = start(out, 2, "--fail-rank", "1", "--fail-after-solves", "2", "--linger", "1500",
                  "--layers", "1", "--num-batches", "4", "--no-blockwise")
    try:
        _, err0 = procs[0].communicate(timeout=900)
        assert procs[0].returncode != 0
        assert "PeerFailure" in err0 and "rank(s) 1 failed" in err0, err0[-2000:]
        error = (tmp_path / "model.safetensors.rank1.error").read_text()
        assert error.startswith("RuntimeError: layer model.layers.0.") and "injected failure" in error
        assert procs[1].poll() is None  # still lingering: rank 0 did not learn it from its exit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
