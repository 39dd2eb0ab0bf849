"""Resumable runs (decoupleq.resume): a run killed with SIGKILL part way and resumed
writes the same bytes as a run never interrupted; a run folder of another run is refused."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import decoupleq
from _pipeline_models import one_thread, tiny_llama, token_batches

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_quantize_worker.py")


def worker(out, *args, check=True):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, WORKER, str(out), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "model.safetensors"
    worker(out)
    return out.read_bytes()


# Layers per Llama block: q, k, v, o, gate, up, down (7 solver calls).
@pytest.mark.parametrize("kill_after", [10, 14], ids=["inside-block-1", "at-block-2-start"])
def test_killed_run_resumes_to_identical_bytes(tmp_path, uninterrupted, kill_after):
    ckpt = tmp_path / "run"
    out = tmp_path / "model.safetensors"
    killed = worker(out, "--checkpoint", str(ckpt), "--kill-after-solves", str(kill_after), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()
    done = json.loads((ckpt / "progress.json").read_text())["done"]
    assert done == kill_after // 7 - 1  # the blocks committed before the kill
    assert sorted(p.name for p in ckpt.glob("inputs-*")) == [f"inputs-{done:05d}.rank0.safetensors"]

    worker(out, "--checkpoint", str(ckpt), "--resume")
    assert out.read_bytes() == uninterrupted


def test_resume_with_fp_inputs_target(tmp_path):
    """The full-precision path is a second cache carried from block to block: kept on disk too."""
    plain = tmp_path / "plain.safetensors"
    worker(plain, "--target", "fp_inputs", "--layers", "2")
    ckpt, out = tmp_path / "run", tmp_path / "model.safetensors"
    killed = worker(out, "--target", "fp_inputs", "--layers", "2", "--checkpoint", str(ckpt),
                    "--kill-after-solves", "9", check=False)
    assert killed.returncode == -signal.SIGKILL
    worker(out, "--target", "fp_inputs", "--layers", "2", "--checkpoint", str(ckpt), "--resume")
    assert out.read_bytes() == plain.read_bytes()


def small_run(ckpt, model=None, calib=None, bits=2, resume=False):
    cfg = decoupleq.ModelQuantConfig(quant=decoupleq.QuantConfig(method="gptq", bits=bits, group_size=32),
                                     blockwise=False)
    model = tiny_llama(layers=2) if model is None else model
    calib = token_batches(n=4, seq=16) if calib is None else calib
    with one_thread():
        return decoupleq.quantize(model, calib, cfg, checkpoint_dir=ckpt, resume=resume)


def test_finished_run_resumes_without_work_and_keeps_the_report(tmp_path):
    first = small_run(tmp_path / "run")
    again = small_run(tmp_path / "run", resume=True)
    assert [r.name for r in again.decoupleq_report.layers] == [r.name for r in first.decoupleq_report.layers]
    assert [r.loss for r in again.decoupleq_report.layers] == [r.loss for r in first.decoupleq_report.layers]
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_of_a_finished_run_needs_resume(tmp_path):
    small_run(tmp_path / "run")
    with pytest.raises(ValueError, match="checkpoint_dir .*resume=True"):
        small_run(tmp_path / "run")


@pytest.mark.parametrize("change", ["bits", "calibration", "weights"])
def test_folder_of_another_run_is_refused_naming_what_differs(tmp_path, change):
    small_run(tmp_path / "run")
    model, calib, bits = tiny_llama(layers=2), token_batches(n=4, seq=16), 2
    if change == "bits":
        bits = 3
    elif change == "calibration":
        calib = token_batches(n=4, seq=16, seed=7)
    else:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expect = {"bits": r"settings\.quant\.bits \(2 in the folder, 3 now\)", "calibration": r"calibration\.digest",
              "weights": r"model\.weights_digest"}[change]
    with pytest.raises(ValueError, match=f"belongs to another run: .*{expect}"):
        small_run(tmp_path / "run", model=model, calib=calib, bits=bits, resume=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the refused call changed nothing


def test_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a run folder"):
        small_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_needs_a_checkpoint_dir():
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        small_run(None, resume=True)


def test_save_writes_the_same_bytes_every_time(tmp_path):
    """What byte-identical resumes rest on: safetensors orders its header maps by hash,
    differently from call to call; decoupleq.save sorts them."""
    model = small_run(None)
    blobs = set()
    for i in range(6):
        decoupleq.save(model, tmp_path / f"m{i}.safetensors")
        blobs.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    loaded = decoupleq.load(tmp_path / "m0.safetensors")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
