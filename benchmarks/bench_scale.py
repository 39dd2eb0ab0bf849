"""quantize spread over gloo ranks on one host: wall time, peak RSS per rank, collective bytes.

    python benchmarks/bench_scale.py                          # tiny and small Llamas, 1x2 vs 2x1
    python benchmarks/bench_scale.py --models smollm2-135m --num-samples 8 --seq-len 128
    python benchmarks/bench_scale.py --configs 1x1,1x2,2x1 --resume-check --json scale.json
    python benchmarks/bench_scale.py --project --json projection.json   # 7B / 70B on N machines

Each configuration ``RxT`` runs R processes (ranks) of T threads each (torch,
OpenBLAS and the C core's threads all set to T), launched the way torchrun
launches them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment; the library joins the gloo group itself). Every configuration
quantizes the same model on the same calibration batches with the same
settings (block tuning with ``batches_per_step`` = 2, a multiple of every
world size measured, so the algorithm is the same). The benchmark checks that
each configuration gives the integer codes of the first configuration with
the same threads per rank: ranks do not change a code, but OpenBLAS's thread
count does (decoupleQ's float step takes sgemm's rounding, which depends on
it; tests/test_determinism.py's xfail), so 1x2 and 2x1 can differ in a few
codes while 1x1 and 2x1 must not.

Per configuration it reports the wall time of ``quantize`` on rank 0 (all
ranks finish together: they meet at every layer), the whole launch's wall
time (start-up and model loading included), each rank's peak RSS
(``ru_maxrss``) and the bytes each rank passed to the collectives (payloads:
Hessians, the gathered rows of each layer, gradients, losses).
``--resume-check`` also kills a one-rank run with SIGKILL in its second block
and resumes it, and reports whether the output file is byte-identical to an
uninterrupted run's.

``--shards S`` sets ``ModelQuantConfig.shards``: then every configuration
must give the codes of the first one, whatever its ranks or threads per rank
(given the same threads per rank).

``--project`` measures a few one-core constants (a layer solve per m*n^2, a
Hessian accumulation per token*n^2, matmul throughput; ~20 s) and projects a
Llama-2 7B and 70B run on N machines from them: time, what bounds it, bytes
each rank receives, memory per rank. The model and its assumptions are
stated in benchmarks/scale_projection.py and recorded with the figures.

Timings on a shared machine are noisy: the records say so (``--note``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

MODELS = {
    # name: LlamaConfig fields (random weights, seed 0); "smollm2-135m" is the packaged model.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}


def build_model(name):
    import torch

    if name in MODELS:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=512, max_position_embeddings=512, **MODELS[name])
        return transformers.LlamaForCausalLM(cfg).eval(), None
    from decoupleq.zoo import load_model

    lm = load_model(name)
    return lm.model, lm.tokenizer


def calibration(model, tokenizer, args):
    import torch

    if tokenizer is None:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, model.config.vocab_size, (args.num_samples, args.seq_len), generator=g)
    from decoupleq.data import calibration_data

    return calibration_data(args.calib_text, tokenizer=tokenizer, num_samples=args.num_samples,
                            seq_len=args.seq_len, seed=0)


def worker(args) -> None:
    """One rank: quantize, write a record (and rank 0 the model) under args.worker_out."""
    import torch

    torch.set_num_threads(args.threads)
    import decoupleq
    import decoupleq.solver

    if args.kill_after_solves is not None:
        real, calls = decoupleq.solver.quantize_weight, []

        def counting(*a, **kw):
            if len(calls) == args.kill_after_solves:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(1)
            return real(*a, **kw)

        decoupleq.solver.quantize_weight = counting
    t_start = time.perf_counter()
    model, tok = build_model(args.model)
    calib = calibration(model, tok, args)
    cfg = decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(bits=2, group_size=64, iterations=args.iterations),
        blockwise=decoupleq.BlockTuneConfig(epochs=1, batches_per_step=2),
        verbose=False, shards=args.shards,
    )
    t0 = time.perf_counter()
    decoupleq.quantize(model, calib, cfg, checkpoint_dir=args.checkpoint, resume=args.resume)
    seconds = time.perf_counter() - t0
    d = decoupleq.distributed.current()
    codes = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, decoupleq.QuantLinear):
            codes.update(name.encode())
            codes.update(m.packed.numpy().tobytes())
    if d.rank == 0:
        decoupleq.save(model, os.path.join(args.worker_out, "model.safetensors"))
    rec = {"rank": d.rank, "world_size": d.world_size, "quantize_s": seconds,
           "startup_s": t0 - t_start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "bytes_moved": d.bytes_moved, "codes_sha256": codes.hexdigest(),
           "layers": len(model.decoupleq_report.layers)}
    with open(os.path.join(args.worker_out, f"rank{d.rank}.json"), "w") as f:
        json.dump(rec, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, model, ranks, threads, out, extra=()) -> tuple:
    """Run ``ranks`` worker processes of ``threads`` threads; returns (wall seconds, return codes)."""
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    for r in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   DECOUPLEQ_NUM_THREADS=str(threads))
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            env.pop(k, None)
        if ranks > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker-out", out, "--model", model,
               "--threads", str(threads), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--iterations", str(args.iterations), "--calib-text", args.calib_text, *extra]
        if args.shards is not None:
            cmd += ["--shards", str(args.shards)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    rcs = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode not in (0, -signal.SIGKILL):
            sys.stderr.write(err[-3000:])
        rcs.append(p.returncode)
    return time.perf_counter() - t0, rcs


def measure(args, model, ranks, threads) -> dict:
    with tempfile.TemporaryDirectory() as out:
        wall, rcs = launch(args, model, ranks, threads, out)
        if any(rcs):
            raise RuntimeError(f"{model} {ranks}x{threads}: ranks exited with {rcs}")
        recs = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]
    r0 = recs[0]
    return {"model": model, "ranks": ranks, "threads_per_rank": threads, "launch_wall_s": wall,
            "quantize_s": r0["quantize_s"], "startup_s": r0["startup_s"],
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in recs],
            "bytes_moved_per_rank": [r["bytes_moved"] for r in recs],
            "codes_sha256": r0["codes_sha256"], "ranks_agree": len({r["codes_sha256"] for r in recs}) == 1,
            "layers": r0["layers"]}


def resume_check(args, model) -> dict:
    """Kill a one-rank run in its second block (after 9 layer solves), resume, compare bytes."""
    with tempfile.TemporaryDirectory() as d:
        whole, part = os.path.join(d, "whole"), os.path.join(d, "part")
        os.makedirs(whole)
        os.makedirs(part)
        ckpt = os.path.join(d, "run")
        launch(args, model, 1, 2, whole)
        t0 = time.perf_counter()
        _, rcs = launch(args, model, 1, 2, part, ["--checkpoint", ckpt, "--kill-after-solves", "9"])
        killed_after = time.perf_counter() - t0
        done = json.load(open(os.path.join(ckpt, "progress.json")))["done"]
        wall, rcs2 = launch(args, model, 1, 2, part, ["--checkpoint", ckpt, "--resume"])
        same = open(os.path.join(whole, "model.safetensors"), "rb").read() == \
            open(os.path.join(part, "model.safetensors"), "rb").read()
    return {"model": model, "killed_rc": rcs[0], "killed_after_s": killed_after, "blocks_done_at_kill": done,
            "resumed_wall_s": wall, "resumed_rc": rcs2[0], "byte_identical": same}


def projection(args) -> list:
    """Measure the one-core constants in a one-thread child, then project (scale_projection.py)."""
    from scale_projection import project

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", DECOUPLEQ_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-costs"], env=env,
                         capture_output=True, text=True, check=True).stdout
    consts = json.loads(out.strip().splitlines()[-1])
    print(f"one core: solve {consts['solve_s_per_mn2']:.3g} s per m*n^2 (by size: "
          f"{', '.join(f'{m}x{n} {c:.3g}' for (m, n), c in consts['solve_s_per_mn2_by_size'])}), "
          f"Hessian {consts['syrk_s_per_tn2']:.3g} s per token*n^2, matmul {consts['gemm_flops'] / 1e9:.1f} GFLOP/s")
    records = [{"kind": "constants", **consts, "note": args.note}]
    for model in ("llama-7b", "llama-70b"):
        for n in (int(x) for x in args.machines.split(",")):
            rec = project(consts, model, n, cores=args.cores, bandwidth=args.bandwidth_gbit * 1e9 / 8,
                          shards=args.shards)
            rec["kind"] = "projection"
            records.append(rec)
            b = rec["bytes_received_per_rank_per_block"]
            print(f"{model:10s} {n:3d} machine(s) x {args.cores} cores: {rec['hours']:7.2f} h, bound by "
                  f"{rec['bound_by']:13s} per block {', '.join(f'{k} {v:.0f}s' for k, v in rec['per_block_s'].items())}; "
                  f"received/rank/block {sum(b.values()) / 1e9:.2f} GB (Hessians {b['hessians'] / 1e9:.2f}); "
                  f"memory/rank {rec['memory_per_rank_gb']['total_gb']:.1f} GB", flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small", help="comma list: tiny, small, or a packaged/HF model")
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="comma list of RANKSxTHREADS")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=4, help="decoupleQ iterations")
    ap.add_argument("--calib-text", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                         "shared", "data", "wikitext-2", "valid.txt"),
                    help="text for a real model's calibration windows")
    ap.add_argument("--resume-check", action="store_true")
    ap.add_argument("--note", default="", help="recorded with the figures (e.g. 'machine under load')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shards", type=int, default=None, help="ModelQuantConfig.shards of every run")
    ap.add_argument("--project", action="store_true", help="only the 7B/70B projection (no runs)")
    ap.add_argument("--machines", default="1,2,4,8,16", help="machine counts of the projection")
    ap.add_argument("--cores", type=int, default=32, help="cores per machine in the projection")
    ap.add_argument("--bandwidth-gbit", type=float, default=100.0, help="network per machine, Gbit/s")
    ap.add_argument("--measure-costs", action="store_true", help=argparse.SUPPRESS)
    # worker mode (internal)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kill-after-solves", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out is not None:
        worker(args)
        return
    if args.measure_costs:
        from scale_projection import measure

        print(json.dumps(measure()))
        return
    if args.project:
        records = projection(args)
        if args.json:
            from provenance import dump_json

            dump_json(args.json, records, args)
        return

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    records = []
    for model in args.models.split(","):
        first = {}  # threads per rank -> (config, codes digest) of the first such configuration
        for ranks, threads in configs:
            rec = measure(args, model, ranks, threads)
            ref = first.setdefault(threads, (f"{ranks}x{threads}", rec["codes_sha256"]))
            rec["codes_compared_with"] = ref[0]
            rec["codes_equal"] = rec["codes_sha256"] == ref[1]
            rec["note"] = args.note
            records.append(rec)
            print(f"{model:14s} {ranks} rank(s) x {threads} thread(s): quantize {rec['quantize_s']:7.1f} s "
                  f"(launch {rec['launch_wall_s']:.1f} s), peak RSS/rank "
                  f"{', '.join(f'{m:.0f}' for m in rec['peak_rss_mb_per_rank'])} MB, collectives "
                  f"{', '.join(f'{b / 1e6:.1f}' for b in rec['bytes_moved_per_rank'])} MB/rank, "
                  f"codes equal to {rec['codes_compared_with']}'s: {rec['codes_equal']}, "
                  f"ranks agree: {rec['ranks_agree']}",
                  flush=True)
        if args.resume_check:
            rc = resume_check(args, model)
            rc["note"] = args.note
            records.append(rc)
            print(f"{model:14s} resume: SIGKILL after {rc['blocks_done_at_kill'] + 1} block(s) done, resumed in "
                  f"{rc['resumed_wall_s']:.1f} s, byte-identical output: {rc['byte_identical']}", flush=True)
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from provenance import dump_json

        dump_json(args.json, records, args)


if __name__ == "__main__":
    main()
