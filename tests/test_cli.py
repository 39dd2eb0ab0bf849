"""The command line, end to end on tiny models saved as Hugging Face folders and real text."""
import json
import subprocess
import sys

import pytest
import torch

import decoupleq
from decoupleq import cli, evaluate
from zoo_helpers import read, saved_tiny_llama, text_slice, tiny_bert, train_tokenizer

needs_solver = pytest.mark.skipif(not hasattr(decoupleq, "quantize_weight"),
                                  reason="the layer solver (decoupleq.quantize_weight) has not landed")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return text_slice("wikitext-2/valid.txt", d / "valid.txt"), text_slice("wikitext-2/test.txt", d / "test.txt")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    saved_tiny_llama(path, text_chars=60_000, vocab_size=280, seed=5, hidden=64)
    return path


def test_models_lists_packaged(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm-l6" in out


def test_python_dash_m_runs():
    res = subprocess.run([sys.executable, "-m", "decoupleq", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    for cmd in ("quantize", "eval", "info", "models"):
        assert cmd in res.stdout


def test_bad_arguments_fail_before_work(tmp_path, capsys):
    assert cli.main(["quantize", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert "smollm2-135m" in capsys.readouterr().err  # names what would have been accepted
    assert cli.main(["quantize", "smollm2-135m", "--bits", "9", "--out", str(tmp_path / "o")]) == 2
    assert "bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", "x", "--group-size", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["quantize", "x", "--indivisible", "pad", "--out", str(tmp_path)])
    assert cli.main(["info", str(tmp_path)]) == 2
    assert not (tmp_path / "o").exists()


def test_eval_full_precision_folder(llama_dir, texts, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(llama_dir), "--text", str(texts[1]), "--seq-len", "32", "--max-windows", "3",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    from decoupleq.zoo import load_model

    lm = load_model(llama_dir)
    direct = evaluate.perplexity(lm.model, texts[1], lm.tokenizer, seq_len=32, max_windows=3)
    assert res["perplexity"]["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert res["perplexity"]["windows"] == 3 and "3 x 32 tokens" in printed


def test_eval_encoder_needs_a_reference(tmp_path, texts, capsys):
    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=40_000), vocab_size=260, encoder=True)
    tiny_bert(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert cli.main(["eval", str(tmp_path), "--text", str(texts[1])]) == 2
    assert "encoder" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--text", str(texts[1]), "--reference", str(tmp_path),
                     "--max-windows", "2"]) == 0
    assert "cosine mean 1.0000" in capsys.readouterr().out


@needs_solver
def test_quantize_eval_info_round_trip(llama_dir, texts, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "16",
            "--init", "neuqi_int", "--calib", str(texts[0]), "--num-samples", "4", "--seq-len", "32", "--out", str(out),
            "--eval-text", str(texts[1]), "--eval-windows", "2", "--eval-seq-len", "32", "-q"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "before: ppl" in printed and "after:  ppl" in printed
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["kind"] == "causal-lm" and summary["layers"] == 14  # 7 linears x 2 blocks
    assert summary["config"]["quant"]["bits"] == 4 and summary["config"]["blockwise"]["enabled"] is False
    assert summary["config"]["quant"]["init"] == "neuqi_int"
    assert summary["config"]["indivisible"] == "short"
    assert summary["file_mb"] > 0 and summary["packed_mb"] < summary["fp_mb"]

    model, tok, _ = cli.load_quantized(out)
    assert sum(isinstance(m, decoupleq.QuantLinear) for m in model.modules()) == 14
    assert cli.main(["eval", str(out), "--text", str(texts[1]), "--seq-len", "32", "--max-windows", "2",
                     "--compare", "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    # The folder re-loaded from disk scores what the in-memory model scored right after quantizing.
    assert res["perplexity"]["ppl"] == pytest.approx(summary["eval"]["quantized"]["ppl"], rel=1e-5)
    assert res["fidelity"]["kl"] > 0 and 0 <= res["fidelity"]["top1"] <= 1
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "rtn W4 group 16" in info and "14 quantized" in info


def test_shards_flag_reaches_the_config(llama_dir, texts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(llama_dir), "--shards", "0", "--out", str(tmp_path / "bad")])
    assert "--shards" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "q"
    assert cli.main(["quantize", str(llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "16",
                     "--no-blockwise", "--shards", "3", "--calib", str(texts[0]), "--num-samples", "3",
                     "--seq-len", "16", "--no-checkpoint", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["config"]["shards"] == 3


def test_rtn_without_block_tuning_builds_no_calibration_data(llama_dir, tmp_path, capsys):
    # A calibration source that cannot be read at all: the data-free run never reaches it,
    # while any run that needs data fails on it, naming it.
    unreadable = tmp_path / "no-such-calibration.txt"
    out = tmp_path / "q"
    assert cli.main(["quantize", str(llama_dir), "--method", "rtn", "--no-blockwise", "--bits", "4",
                     "--group-size", "16", "--calib", str(unreadable), "--out", str(out), "-q"]) == 0
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["calibration"] == {"source": None} and summary["layers"] == 14
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    assert "calib:     none (data-free)" in capsys.readouterr().out
    for extra in (["--method", "gptq", "--no-blockwise"], ["--method", "rtn", "--blockwise"],
                  ["--method", "rtn", "--no-blockwise", "--distill", "1"]):
        assert cli.main(["quantize", str(llama_dir), *extra, "--bits", "4", "--group-size", "16",
                         "--calib", str(unreadable), "--out", str(tmp_path / "q2"), "-q"]) == 2
        assert "no-such-calibration.txt" in capsys.readouterr().err
        assert not (tmp_path / "q2").exists()


@needs_solver
def test_quantize_self_calibrated_with_block_tuning(llama_dir, tmp_path):
    out = tmp_path / "q2"
    assert cli.main(["quantize", str(llama_dir), "--method", "gptq", "--bits", "2", "--group-size", "-1",
                     "--blockwise", "--blockwise-epochs", "1", "--blockwise-target", "fp_inputs",
                     "--num-samples", "2", "--seq-len", "16", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["calibration"]["source"] == "self"
    assert summary["config"]["blockwise"]["enabled"] is True and summary["config"]["quant"]["group_size"] == -1
    assert summary["config"]["blockwise"]["target"] == "fp_inputs"
    assert summary["config"]["quant"]["init"] == "neuqi"  # the method's default, stored
    model, _, _ = cli.load_quantized(out)
    codes = torch.cat([m.codes.flatten() for m in model.modules() if isinstance(m, decoupleq.QuantLinear)])
    assert int(codes.min()) >= -2 and int(codes.max()) <= 1


@needs_solver
def test_out_folder_is_replaced_whole_and_foreign_folders_refused(llama_dir, texts, tmp_path):
    out = tmp_path / "q"
    base = ["quantize", str(llama_dir), "--method", "rtn", "--group-size", "16", "--calib", str(texts[0]),
            "--num-samples", "2", "--seq-len", "16", "--out", str(out), "-q"]
    assert cli.main(base + ["--bits", "4"]) == 0
    (out / "stale-extra.txt").write_text("from the first run")
    assert cli.main(base + ["--bits", "3"]) == 0
    # The second run's folder replaced the first one as a whole: its summary and its model agree,
    # nothing of the first run is left, and no hidden temporary folder stays beside it.
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    model, _, _ = cli.load_quantized(out)
    assert summary["config"]["quant"]["bits"] == 3
    assert {m.bits for m in model.modules() if isinstance(m, decoupleq.QuantLinear)} == {3}
    assert not (out / "stale-extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    # A failing save leaves the previous folder as it was, and no temporary folder.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TypeError, match="model must be"):
        cli.save_folder(out, "not a model", None, {})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(base[:-3] + ["--out", str(foreign), "-q", "--bits", "4"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


@needs_solver
def test_interrupted_quantize_resumes_to_the_same_model_file(llama_dir, texts, tmp_path, monkeypatch, capsys):
    import decoupleq.solver

    base = ["quantize", str(llama_dir), "--method", "gptq", "--bits", "2", "--group-size", "16", "--blockwise",
            "--blockwise-epochs", "1", "--calib", str(texts[0]), "--num-samples", "4", "--seq-len", "16", "-q"]
    assert cli.main(base + ["--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole.run").exists()  # removed once the output is saved

    real, calls = decoupleq.solver.quantize_weight, []

    def interrupted(*a, **kw):  # Ctrl-C in block 1's third layer
        if len(calls) == 9:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(decoupleq.solver, "quantize_weight", interrupted)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        cli.main(base + ["--out", str(out)])
    assert json.loads((tmp_path / "q.run" / "progress.json").read_text()) == {"done": 0}
    capsys.readouterr()
    assert cli.main(base + ["--out", str(out)]) != 0  # the folder holds a run: never silently redone
    assert "holds a run with 1 finished block(s)" in capsys.readouterr().err
    monkeypatch.setattr(decoupleq.solver, "quantize_weight", real)
    assert cli.main(base + ["--out", str(out), "--resume"]) == 0
    assert (out / cli.MODEL_FILE).read_bytes() == (tmp_path / "whole" / cli.MODEL_FILE).read_bytes()
    assert not (tmp_path / "q.run").exists()


def test_eval_no_window_bos_keeps_the_plain_slices(llama_dir, texts, tmp_path):
    # This tokenizer adds no BOS: both layouts are the same windows, and the JSON says which ran.
    outs = []
    for extra in ([], ["--no-window-bos"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert cli.main(["eval", str(llama_dir), "--text", str(texts[1]), "--seq-len", "32", "--max-windows", "2",
                         "--json", str(out), *extra]) == 0
        outs.append(json.loads(out.read_text())["perplexity"])
    assert outs[0]["bos"] is False and outs[1]["bos"] is False
    assert outs[0]["ppl"] == outs[1]["ppl"]
