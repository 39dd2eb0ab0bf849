"""Lightweight distillation of the scales and zeros (decoupleq.distill) on tiny Llama models and real text."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import decoupleq
from decoupleq import QuantConfig
from decoupleq.data import random_windows, tokenize
from decoupleq.distill import DistillReport, lr_at
from decoupleq.nn import QUANT_MODULES
from _pipeline_models import one_thread
from zoo_helpers import read, text_slice, tiny_llama, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes gain nothing from threads on a shared machine; one thread also
    # keeps every run's float arithmetic in the same order (exact comparisons below).
    with one_thread():
        yield


@pytest.fixture(scope="module")
def corpus():
    """(vocab size, training windows (12, 32) from the first half of the text, held-out windows
    (6, 32) cut without overlap from the second half)."""
    text = read("wikitext-2/valid.txt", limit=60_000)
    tok = train_tokenizer(text, vocab_size=280)
    ids = tokenize(tok, text)
    half = ids.numel() // 2
    train = random_windows(ids[:half], num_samples=12, seq_len=32, seed=0)
    held = ids[half:half + 6 * 32].reshape(6, 32)
    return len(tok), train, held


def quantized_pair(vocab, train, method="rtn", bits=2, group_size=16, seed=3):
    """(quantized model, its full-precision teacher), both tiny Llamas of hidden size 64."""
    teacher = tiny_llama(vocab_size=vocab, seed=seed, hidden=64)
    model = copy.deepcopy(teacher)
    cfg = decoupleq.ModelQuantConfig(quant=QuantConfig(method=method, bits=bits, group_size=group_size),
                                     blockwise=False, verbose=False)
    decoupleq.quantize(model, train[:4], cfg)
    return model, teacher


def final_mse(model, teacher, windows) -> float:
    """Mean squared error of the last hidden states (the input of lm_head), computed from the
    causal LMs' own ``output_hidden_states``."""
    with torch.no_grad():
        a = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
        b = teacher(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    return float((a - b).square().mean())


def snapshot(model):
    """Every parameter and buffer, plus every quantized layer's codes and every requires_grad flag."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    codes = {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, codes, flags


def assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert a[2] == b[2]


# ---------------------------------------------------------------------------
# Pieces: schedule, optimizer
# ---------------------------------------------------------------------------


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    lr = 3e-4
    # 20 steps, 10% warm-up = 2 steps: lr/2, lr; then cos from lr over the 18 remaining steps.
    assert lr_at(0, 20, lr) == pytest.approx(lr / 2)
    assert lr_at(1, 20, lr) == pytest.approx(lr)
    assert lr_at(2, 20, lr) == pytest.approx(lr)
    assert lr_at(11, 20, lr) == pytest.approx(lr / 2)  # half way through the cosine
    assert lr_at(19, 20, lr) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 17 / 18)))
    decay = [lr_at(s, 20, lr) for s in range(2, 20)]
    assert all(x > y for x, y in zip(decay, decay[1:]))
    assert lr_at(0, 1, lr) == pytest.approx(lr)  # one step: warm-up of one step reaches lr
    assert lr_at(0, 10, lr, warmup=0.0) == pytest.approx(lr)


def test_decoupled_adam_matches_torch_adamw_under_a_changing_lr():
    from decoupleq.blockwise import _Adam

    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(a.detach().clone())
    ours = _Adam([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decoupled=True)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        target = torch.randn(5, 3)
        lr = 1e-2 * (step + 1) / 6
        ours.lr = lr
        ref.param_groups[0]["lr"] = lr
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            ((p - target) ** 3).sum().backward()
            opt.step()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), step


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "gptq", "decoupleq"])
def test_distillation_lowers_held_out_error_and_trains_only_scales_and_zeros(corpus, method):
    vocab, train, held = corpus
    model, teacher = quantized_pair(vocab, train, method=method)
    teacher_before = snapshot(teacher)
    before = snapshot(model)
    mse_before = final_mse(model, teacher, held)

    report = decoupleq.distill(model, teacher, train, steps=24, eval_data=held, verbose=False)

    mse_after = final_mse(model, teacher, held)
    assert mse_after < 0.9 * mse_before, (mse_before, mse_after)
    # The report's held-out figures are the same quantity as computed here.
    assert report.eval_before == pytest.approx(mse_before, rel=1e-4)
    assert report.eval_after == pytest.approx(mse_after, rel=1e-4)
    assert isinstance(report, DistillReport) and report.steps == 24 and len(report.losses) == 24
    # (loss_start / loss_end are means over a few different windows each: too noisy to compare here.)
    assert report.loss_start > 0 and report.loss_end > 0 and report.seconds > 0 and not report.teacher_cached
    quant = [m for m in model.modules() if isinstance(m, QUANT_MODULES)]
    assert report.n_params == sum(m.scale.numel() + m.zero.numel() for m in quant)

    assert_same(snapshot(teacher), teacher_before)
    after = snapshot(model)
    assert after[2] == before[2]  # requires_grad flags as they were
    for name, codes in before[1].items():
        assert torch.equal(after[1][name], codes), name  # integer codes untouched
    changed = {k for k in before[0] if not torch.equal(before[0][k], after[0][k])}
    trained = {k for k in before[0] if k.endswith((".scale", ".zero"))}
    assert changed and changed <= trained
    assert not model.training and not teacher.training


def test_default_is_one_epoch_and_training_flags_are_restored(corpus):
    vocab, train, _ = corpus
    model, teacher = quantized_pair(vocab, train[:3])
    model.train()
    report = decoupleq.distill(model, teacher, train[:5], verbose=False)
    assert report.steps == 5 and model.training and not teacher.training


def test_teacher_cache_on_disk_gives_the_on_the_fly_result(corpus, tmp_path):
    vocab, train, _ = corpus
    model, teacher = quantized_pair(vocab, train)
    twin = copy.deepcopy(model)
    # 10 steps over 6 windows: a second epoch reuses the cached outputs.
    a = decoupleq.distill(model, teacher, train[:6], steps=10, seed=7, verbose=False)
    b = decoupleq.distill(twin, teacher, train[:6], steps=10, seed=7, verbose=False,
                          teacher_cache_mb=0, tmpdir=tmp_path)
    assert b.teacher_cached and a.losses == b.losses
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert list(tmp_path.iterdir()) == []  # the spill files are gone


def test_a_failure_part_way_puts_the_scales_and_zeros_back(corpus):
    vocab, train, _ = corpus
    model, teacher = quantized_pair(vocab, train)
    before = snapshot(model)
    calls = []

    def fail_on_third_call(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher stopped")

    handle = teacher.model.register_forward_pre_hook(fail_on_third_call, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="teacher stopped"):
            decoupleq.distill(model, teacher, train, steps=6, verbose=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # two optimizer steps had been taken
    assert_same(snapshot(model), before)


def test_bad_arguments_raise_before_any_change(corpus, tmp_path):
    vocab, train, _ = corpus
    model, teacher = quantized_pair(vocab, train)
    fp = tiny_llama(vocab_size=vocab, seed=1, hidden=64)
    narrow = tiny_llama(vocab_size=vocab, seed=1, hidden=32)
    cases = [
        (dict(model=fp), ValueError, "no QuantLinear"),
        (dict(model="model"), TypeError, "model must be"),
        (dict(teacher=None), TypeError, "teacher must be"),
        (dict(teacher=model), ValueError, "teacher is the model"),
        (dict(teacher=narrow), ValueError, "hidden_size"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(steps=True), ValueError, "steps"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr="3e-4"), ValueError, "lr"),
        (dict(betas=(1.0, 0.95)), ValueError, "betas"),
        (dict(betas=0.9), ValueError, "betas"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(warmup=1.5), ValueError, "warmup"),
        (dict(seed=None), TypeError, "seed"),
        (dict(teacher_cache_mb=-1), ValueError, "teacher_cache_mb"),
        (dict(tmpdir=tmp_path / "missing"), ValueError, "tmpdir"),
        (dict(verbose="yes"), TypeError, "verbose"),
        (dict(data=[]), ValueError, "data"),
        (dict(data=torch.full((2, 8), vocab + 5)), ValueError, "data"),
        (dict(eval_data="text"), TypeError, "eval_data"),
    ]
    states = {"model": snapshot(model), "teacher": snapshot(teacher), "fp": snapshot(fp)}
    for override, exc, match in cases:
        kwargs = dict(model=model, teacher=teacher, data=train, verbose=False)
        kwargs.update(override)
        with pytest.raises(exc, match=match):
            decoupleq.distill(kwargs.pop("model"), kwargs.pop("teacher"), kwargs.pop("data"), **kwargs)
        assert_same(snapshot(model), states["model"])
        assert_same(snapshot(teacher), states["teacher"])
        assert_same(snapshot(fp), states["fp"])


def mlp(seed, width=32, out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, width), nn.GELU(), nn.Linear(width, out)).eval()


def test_plain_module_is_distilled_on_its_output():
    torch.manual_seed(0)
    x = torch.randn(40, 6, 24)
    teacher = mlp(1)
    model = copy.deepcopy(teacher)
    decoupleq.quantize(model, x[:8], QuantConfig(method="rtn", bits=2, group_size=8, init="minmax"),
                       blockwise=False, verbose=False)
    held = x[32:]
    with torch.no_grad():
        before = float((model(held) - teacher(held)).square().mean())
    report = decoupleq.distill(model, teacher, x[:32], steps=64, lr=1e-2, verbose=False)
    with torch.no_grad():
        after = float((model(held) - teacher(held)).square().mean())
    assert report.steps == 64 and after < 0.9 * before, (before, after)

    # A teacher whose output differs in shape fails at the first step, before any update.
    state = snapshot(model)
    with pytest.raises(ValueError, match="differ in shape"):
        decoupleq.distill(model, mlp(2, out=12), x[:4], verbose=False)
    assert_same(snapshot(model), state)


def test_public_name_is_the_function_in_a_fresh_process():
    code = ("import inspect, decoupleq; f = decoupleq.distill; import decoupleq.distill; "
            "assert inspect.isfunction(f) and decoupleq.distill is f, decoupleq.distill")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # Imported as a module first, the package attribute is the module; it calls the function.
    assert callable(sys.modules["decoupleq.distill"])


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def test_cli_quantize_with_distill(tmp_path, corpus):
    from decoupleq import cli

    text = text_slice("wikitext-2/valid.txt", tmp_path / "valid.txt")
    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=60_000), vocab_size=280)
    folder = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok), seed=5, hidden=64).save_pretrained(folder)
    tok.save_pretrained(folder)
    base = ["quantize", str(folder), "--method", "rtn", "--bits", "2", "--group-size", "16", "--calib", str(text),
            "--num-samples", "3", "--seq-len", "16", "-q"]
    assert cli.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "distilled"), "--distill", "2"]) == 0
    summary = json.loads((tmp_path / "distilled" / cli.SUMMARY_FILE).read_text())
    assert summary["distill"]["steps"] == 2 and summary["distill"]["loss_start"] > 0
    assert json.loads((tmp_path / "plain" / cli.SUMMARY_FILE).read_text())["distill"] is None
    plain, _, _ = cli.load_quantized(tmp_path / "plain")
    distilled, _, _ = cli.load_quantized(tmp_path / "distilled")
    pq = dict((n, m) for n, m in plain.named_modules() if isinstance(m, QUANT_MODULES))
    dq = dict((n, m) for n, m in distilled.named_modules() if isinstance(m, QUANT_MODULES))
    assert pq.keys() == dq.keys()
    assert all(torch.equal(pq[n].codes, dq[n].codes) for n in pq)
    assert any(not torch.equal(pq[n].scale, dq[n].scale) for n in pq)  # the saved folder holds the distilled scales
    with pytest.raises(SystemExit):
        cli.main(base + ["--out", str(tmp_path / "x"), "--distill", "0"])
