"""Quantizing a model streamed from disk (decoupleq.quantize_from_disk) against the in-RAM run.

Tiny Llamas built from a LlamaConfig and saved with save_pretrained as float safetensors
(one file, or sharded with an index): the streamed output folder must hold the same bytes
as ``from_pretrained`` + ``quantize`` + ``save`` on the same calibration data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _pipeline_models import one_thread

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import decoupleq  # noqa: E402
from decoupleq import BlockTuneConfig, ModelQuantConfig, QuantConfig  # noqa: E402
from decoupleq._hf_compat import dtype_kwargs  # noqa: E402
from decoupleq.stream import folder_digest, quantize_from_disk  # noqa: E402


def _config(layers=2, tie=False, hidden=64, inter=96, vocab=96):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )


def _save_float(folder: Path, seed=0, shard=None, **cfg) -> Path:
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_config(**cfg)).eval()
    with torch.no_grad():  # norms away from 1, so their tuning and loading both show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(str(folder), **kw)
    return folder


def _calib(n=4, seq=16, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def _in_ram(folder, calib, cfg, out, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              **dtype_kwargs(torch.float32))
    model.eval()
    decoupleq.quantize(model, calib, cfg, **kw)
    decoupleq.save(model, out)
    return model


def _files(folder):
    return {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir())}


METHODS = {
    "rtn-data-free": ModelQuantConfig(quant=QuantConfig(method="rtn", bits=2, group_size=32),
                                      blockwise=BlockTuneConfig(enabled=False)),
    "rtn-tuned": ModelQuantConfig(quant=QuantConfig(method="rtn", bits=3, group_size=32),
                                  blockwise=BlockTuneConfig(enabled=True, epochs=1)),
    "gptq": ModelQuantConfig(quant=QuantConfig(method="gptq", bits=2, group_size=32),
                             blockwise=BlockTuneConfig(enabled=False)),
    "decoupleq-tuned": ModelQuantConfig(quant=QuantConfig(method="decoupleq", bits=2, group_size=32, iterations=2),
                                        blockwise=BlockTuneConfig(enabled=True, epochs=1)),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layout", ["single", "sharded-tied"])
def test_streamed_output_bytes_equal_the_in_ram_run(tmp_path, method, layout):
    tie = layout == "sharded-tied"
    src = _save_float(tmp_path / "fp", shard="40KB" if tie else None, layers=3, tie=tie)
    if tie:
        assert (src / "model.safetensors.index.json").is_file()
    cfg = METHODS[method]
    calib = _calib()
    with one_thread():
        torch.manual_seed(0)
        ref = _in_ram(src, calib, cfg, tmp_path / "ram")
        torch.manual_seed(0)
        got = quantize_from_disk(src, calib, cfg, out=tmp_path / "disk")
    a, b = _files(tmp_path / "ram"), _files(tmp_path / "disk")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs"
    assert folder_digest(tmp_path / "ram") == folder_digest(tmp_path / "disk")
    # The returned model is the whole quantized model, every tensor loaded.
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert len(got.decoupleq_report.layers) == len(ref.decoupleq_report.layers) == 3 * 7
    x = calib[:1]
    with torch.no_grad():
        assert torch.equal(got(x).logits, ref(x).logits)
    if tie:
        assert got.lm_head.weight is got.model.embed_tokens.weight


def test_streamed_output_loads_back_and_skips_stay_float(tmp_path):
    src = _save_float(tmp_path / "fp", layers=2)
    cfg = ModelQuantConfig(quant=QuantConfig(method="gptq", bits=4, group_size=32),
                           blockwise=BlockTuneConfig(enabled=False), skip=("*.o_proj",))
    calib = _calib()
    with one_thread():
        quantize_from_disk(src, calib, cfg, out=tmp_path / "disk")
        _in_ram(src, calib, cfg, tmp_path / "ram")
    assert _files(tmp_path / "ram") == _files(tmp_path / "disk")
    loaded = decoupleq.load(tmp_path / "disk")
    assert type(loaded.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_checkpoint_dir_and_resume_give_the_same_bytes(tmp_path):
    src = _save_float(tmp_path / "fp", layers=3)
    cfg = METHODS["gptq"]
    calib = _calib()
    with one_thread():
        _in_ram(src, calib, cfg, tmp_path / "ram")
        run = tmp_path / "run"
        quantize_from_disk(src, calib, cfg, out=tmp_path / "disk", checkpoint_dir=run)
        # The streamed run folder's fingerprint is the in-RAM run's: same weights digest.
        fp = json.loads((run / "fingerprint.json").read_text())
        ram_run = tmp_path / "ram-run"
        _in_ram(src, calib, cfg, tmp_path / "ram2", checkpoint_dir=ram_run)
        assert json.loads((ram_run / "fingerprint.json").read_text()) == fp
        # A run interrupted when block 2 is reached (blocks 0 and 1 committed), then resumed.
        from decoupleq import pipeline

        real = pipeline._read_block

        def interrupt(source, spec, plans, i):
            if i == 2:
                raise KeyboardInterrupt
            real(source, spec, plans, i)

        run2 = tmp_path / "run2"
        pipeline._read_block = interrupt
        try:
            with pytest.raises(KeyboardInterrupt):
                quantize_from_disk(src, calib, cfg, out=tmp_path / "resumed", checkpoint_dir=run2)
        finally:
            pipeline._read_block = real
        assert json.loads((run2 / "progress.json").read_text()) == {"done": 1}
        assert not (tmp_path / "resumed").exists()
        quantize_from_disk(src, calib, cfg, out=tmp_path / "resumed", checkpoint_dir=run2, resume=True)
    assert _files(tmp_path / "ram") == _files(tmp_path / "disk") == _files(tmp_path / "resumed")


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work
# ---------------------------------------------------------------------------


def test_not_a_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"folder .* is not a folder"):
        quantize_from_disk(f, _calib(), METHODS["gptq"], out=tmp_path / "out")
    with pytest.raises(TypeError, match="folder must be a path"):
        quantize_from_disk(3, _calib(), METHODS["gptq"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard(tmp_path):
    src = _save_float(tmp_path / "fp", shard="40KB", layers=2)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"folder .*shard '{shard.name}'.* is missing"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_match_the_weights(tmp_path):
    src = _save_float(tmp_path / "fp", layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"folder .*config.json does not match the weights: .*mlp.up_proj.weight "
                                         r"is \[96, 64\] in the folder, \[128, 64\] for the config"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "out")
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensors missing from the folder \['model.layers.2"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_config_and_quantized_folder_are_refused(tmp_path):
    src = _save_float(tmp_path / "fp", layers=2)
    with one_thread():
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "q")
    with pytest.raises(ValueError, match=r"folder .*holds a quantized model"):
        quantize_from_disk(tmp_path / "q", _calib(), METHODS["gptq"], out=tmp_path / "out")
    (src / "config.json").unlink()
    with pytest.raises(ValueError, match=r"folder .*config.json is missing"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "out")


def test_bad_out_and_bad_calibration_fail_before_any_work(tmp_path, monkeypatch):
    src = _save_float(tmp_path / "fp", layers=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    from decoupleq import stream

    read = []
    monkeypatch.setattr(stream._Shards, "get", lambda self, *a: read.append(a) or 1 / 0)
    with pytest.raises(ValueError, match=r"out .*busy.* is a folder with other files"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=busy)
    with pytest.raises(ValueError, match=r"calibration token ids must be in \[0, 96\)"):
        quantize_from_disk(src, _calib(vocab=500), METHODS["gptq"], out=tmp_path / "out")
    with pytest.raises(ValueError, match="calibration is None"):
        quantize_from_disk(src, None, METHODS["gptq"], out=tmp_path / "out")
    assert read == []  # no tensor was read
    assert (busy / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_non_finite_weight_names_its_layer_and_writes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _save_float(tmp_path / "fp", layers=2)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with one_thread(), pytest.raises(ValueError, match=r"layer model.layers.1.mlp.down_proj: weight .* NaN"):
        quantize_from_disk(src, _calib(), METHODS["gptq"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# A model larger than the memory allowed: in RAM fails, streamed succeeds
# ---------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    import transformers, decoupleq
    from decoupleq import BlockTuneConfig, ModelQuantConfig, QuantConfig
    from decoupleq.stream import quantize_from_disk

    src, out, mode, budget_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = ModelQuantConfig(quant=QuantConfig(method="gptq", bits=2, group_size=128),
                           blockwise=BlockTuneConfig(enabled=False))
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    if mode == "ram":
        from transformers import AutoModelForCausalLM  # imported before the cap, as in "disk"
    def vm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    # The cap: what the process already maps, plus budget_mb.
    cap = vm_kb() * 1024 + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        if mode == "ram":
            model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32)
            decoupleq.quantize(model, calib, cfg)
            decoupleq.save(model, out)
        else:
            quantize_from_disk(src, calib, cfg, out=out)
    except BaseException as exc:
        print(json.dumps({"ok": False, "type": type(exc).__name__, "msg": str(exc)[:300]}))
        sys.exit(0)
    print(json.dumps({"ok": True}))
""")


def _run_capped(src, out, mode, budget_mb):
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               DECOUPLEQ_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), mode, str(budget_mb)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=str(Path(out).parent))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"child failed (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_a_model_larger_than_the_memory_cap_still_quantizes_streamed(tmp_path):
    # 5 blocks of 38 MB of float32 weights (hidden and MLP width 1280, grouped-query k and v of
    # 640 rows), 190 MB in all, one shard each (as a real checkpoint is sharded).
    src = _save_float(tmp_path / "fp", layers=5, hidden=1280, inter=1280, vocab=256, shard="50MB")
    weights_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    assert weights_mb > 185
    # MB of address space past what the process maps after its imports. Measured on this
    # model: the in-RAM run needs about 600 MB of it, the streamed one about 245 MB.
    budget = 400
    ram = _run_capped(src, tmp_path / "ram", "ram", budget)
    assert not ram["ok"], "the in-RAM run fitted under the cap: the test proves nothing"
    assert ram["type"] in ("MemoryError", "RuntimeError", "OSError"), ram
    assert ram["type"] == "MemoryError" or "memory" in ram["msg"].lower(), ram
    disk = _run_capped(src, tmp_path / "disk", "disk", budget)
    assert disk["ok"], disk
    loaded = decoupleq.load(tmp_path / "disk")
    assert sum(type(m).__name__ == "QuantLinear" for m in loaded.modules()) == 5 * 7  # every layer of 5 blocks


# ---------------------------------------------------------------------------
# CLI: quantize --stream
# ---------------------------------------------------------------------------


def test_cli_stream_writes_the_folder_the_in_ram_cli_writes(tmp_path):
    from decoupleq import cli
    from zoo_helpers import read, text_slice, train_tokenizer

    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=40_000), vocab_size=280)
    with one_thread():
        torch.manual_seed(11)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    text = text_slice("wikitext-2/valid.txt", tmp_path / "valid.txt")
    common = ["--method", "gptq", "--group-size", "32", "--calib", str(text), "--num-samples", "2",
              "--seq-len", "16", "--no-checkpoint", "-q"]
    with one_thread():
        assert cli.main(["quantize", str(tmp_path / "fp"), "--out", str(tmp_path / "ram"), *common]) == 0
        assert cli.main(["quantize", str(tmp_path / "fp"), "--stream", "--out", str(tmp_path / "disk"), *common]) == 0
    ram, disk = _files(tmp_path / "ram"), _files(tmp_path / "disk")
    assert sorted(ram) == sorted(disk)
    for name in ram:
        if name != "decoupleq.json":  # the run summary: timings, and "streamed"
            assert ram[name] == disk[name], name
    assert json.loads(disk["decoupleq.json"])["streamed"] is True

def test_cli_stream_refuses_self_calibration(tmp_path, capsys):
    from decoupleq import cli

    src = _save_float(tmp_path / "fp", layers=2)
    assert cli.main(["quantize", str(src), "--stream", "--out", str(tmp_path / "x"), "--method", "gptq",
                     "--no-checkpoint", "-q"]) == 2
    assert "--stream needs --calib FILE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
