"""MoE models: every expert quantized from its routed tokens, fallbacks, save/load, counts."""
import logging
import math

import numpy as np
import pytest
import torch

import decoupleq
from decoupleq import moe
from decoupleq.config import BlockTuneConfig, ModelQuantConfig, QuantConfig
from decoupleq.nn import QuantLinear

from _moe_models import ListMoENet, starve_last_expert, tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe
from _pipeline_models import one_thread, token_batches


def _config(method="decoupleq", blockwise=False, **kw):
    return ModelQuantConfig(
        quant=QuantConfig(method=method, bits=4, group_size=32, iterations=2),
        blockwise=BlockTuneConfig(enabled=blockwise, epochs=1), verbose=False, **kw,
    )


def _expert_counts(model):
    c = moe.parameter_counts(model)
    return c["experts_quantized"], c["experts_kept"]


# ---------------------------------------------------------------------------
# The per-expert form of fused experts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe])
def test_routed_experts_computes_what_the_fused_module_computes(build):
    model = build()
    fused = model.model.layers[0].mlp.experts
    assert moe.is_fused_experts(fused)
    routed = moe.routed_from_fused(fused)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        want = fused(x, idx, w)
        got = routed(x, idx, w)
    assert torch.equal(got, want)
    # The per-expert weights are the fused tensors' slices, not copies.
    assert routed[2].down_proj.weight.data_ptr() == fused.down_proj[2].data_ptr()


def test_pooled_hessian_is_the_mean_over_every_expert_token():
    """The fallback rule: an expert layer with too few own tokens takes the token-weighted
    mean of its stage's Hessians, i.e. the mean outer product over all the stage's tokens."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 8)) for n in (30, 50, 3, 0)]
    accs = {}
    for e, x in enumerate(xs):
        a = decoupleq.HessianAccumulator(8)
        a.add(x)
        accs[("expert", "experts", e, 0)] = a
    names = [f"experts.{e}.gate_up_proj" for e in range(4)]
    be = moe.BlockExperts(
        set(names), [], {n: ("expert", "experts", e, 0) for e, n in enumerate(names)},
        {n: ("experts", 0) for n in names}, min_tokens=10,
    )
    cache = {}
    H0, n0, src0 = be.hessian(names[0], accs, cache)
    assert src0 == "own" and n0 == 30
    np.testing.assert_allclose(H0, xs[0].T @ xs[0] / 30, rtol=1e-12, atol=1e-12)
    everything = np.concatenate(xs)
    pooled = everything.T @ everything / len(everything)
    for e in (2, 3):  # 3 tokens, and none at all
        H, n, src = be.hessian(names[e], accs, cache)
        assert n == len(xs[e]) and src == f"pooled {len(everything)}"
        np.testing.assert_allclose(H, pooled, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Quantizing MoE models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe])
def test_every_expert_is_quantized_from_its_routed_tokens(build):
    model = build()
    E = 4
    with one_thread():
        decoupleq.quantize(model, token_batches(n=6, seq=32), _config())
    report = model.decoupleq_report
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, moe.RoutedExperts)
    for e in range(E):
        assert isinstance(mlp.experts[e].gate_up_proj, QuantLinear)
        assert isinstance(mlp.experts[e].down_proj, QuantLinear)
    q, kept = _expert_counts(model)
    assert kept == 0 and q > 0
    assert q / (q + kept) >= 0.95
    # Each expert's Hessian came from its own routed tokens: top-2 of 4 experts over
    # 6 x 32 tokens gives every expert a share, and the shares add up to 2 per token.
    by_name = {r.name: r for r in report.layers}
    firsts = [by_name[f"model.layers.0.mlp.experts.{e}.gate_up_proj"] for e in range(E)]
    assert sum(r.n_tokens for r in firsts) == 2 * 6 * 32
    assert all(r.hessian == "own" for r in firsts)
    assert report.params["experts_quantized"] == q
    if hasattr(mlp, "shared_expert_gate"):  # Qwen2-MoE's gate of the shared expert: kept
        assert type(mlp.shared_expert_gate) is torch.nn.Linear
        assert "model.layers.0.mlp.shared_expert_gate" in report.skipped
        assert isinstance(mlp.shared_expert.down_proj, QuantLinear)


def test_padding_is_left_out_of_the_experts_hessians():
    model = tiny_mixtral()
    ids = token_batches(n=3, seq=32)
    mask = torch.ones_like(ids)
    mask[:, 24:] = 0  # the last 8 positions of each row are padding
    calib = [{"input_ids": ids[j:j + 1], "attention_mask": mask[j:j + 1]} for j in range(3)]
    with one_thread():
        decoupleq.quantize(model, calib, _config())
    by_name = {r.name: r for r in model.decoupleq_report.layers}
    for layer in (0, 1):
        for stage in ("gate_up_proj", "down_proj"):
            routed = sum(by_name[f"model.layers.{layer}.mlp.experts.{e}.{stage}"].n_tokens for e in range(4))
            assert routed == 2 * 3 * 24  # top-2 of the unmasked tokens only
    assert by_name["model.layers.0.self_attn.q_proj"].n_tokens == 3 * 24


def test_an_expert_that_sees_no_token_falls_back_and_is_reported(caplog):
    model = tiny_mixtral(layers=1, experts=5)
    starve_last_expert(model, layer=0)
    calib = token_batches(n=4, seq=32)
    with caplog.at_level(logging.WARNING, logger="decoupleq"), one_thread():
        # min 1 token: only an expert the router never chose falls back.
        decoupleq.quantize(model, calib, _config(expert_min_tokens=1))
    report = model.decoupleq_report
    starved = [f"model.layers.0.mlp.experts.4.{n}" for n in ("gate_up_proj", "down_proj")]
    fallbacks = {name: (n, src) for name, n, src in report.moe_fallbacks}
    assert set(fallbacks) == set(starved)
    for name in starved:
        n, src = fallbacks[name]
        assert n == 0 and src.startswith("pooled ")
        assert isinstance(model.get_submodule(name), QuantLinear)
    # The first stage's pool is every routed token of that block: 2 per token.
    assert fallbacks[starved[0]][1] == f"pooled {2 * 4 * 32}"
    assert any("fallback Hessian" in r.getMessage() and "experts.4" in r.getMessage() for r in caplog.records)
    assert _expert_counts(model)[1] == 0


def test_block_tuning_runs_on_moe_blocks_and_a_failure_restores_the_fused_experts():
    model = tiny_mixtral()
    calib = token_batches(n=4, seq=32)
    with one_thread():
        decoupleq.quantize(model, calib, _config(blockwise=True))
    tunes = [b.tune for b in model.decoupleq_report.blocks]
    assert all(t is not None for t in tunes)
    assert all(t.loss_after <= t.loss_before or t.restored for t in tunes)

    fresh = tiny_mixtral()
    fused = fresh.model.layers[1].mlp.experts
    with torch.no_grad():
        fused.down_proj[0, 0, 0] = float("nan")  # refused before any work, naming the layer
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.0\.down_proj"):
        decoupleq.quantize(fresh, calib, _config())
    assert fresh.model.layers[1].mlp.experts is fused
    assert fresh.model.layers[0].mlp.experts.__class__.__name__ == "MixtralExperts"


def test_skipped_experts_keep_the_fused_module_and_are_counted_as_kept(tmp_path):
    model = tiny_mixtral()
    with one_thread():
        decoupleq.quantize(model, token_batches(n=2, seq=16), _config(method="rtn", skip=("*.experts.*",)))
    assert moe.is_fused_experts(model.model.layers[0].mlp.experts)
    q, kept = _expert_counts(model)
    assert q == 0 and kept == 2 * 4 * (128 * 64 + 64 * 64)
    counts = model.decoupleq_report.params
    assert counts["quantized"] == 2 * (64 * 64 * 2 + 32 * 64 * 2)  # q, o: 64x64; k, v: 32x64
    # The fused experts are saved as they are, and load back (the file backs 4 experts
    # with 2 blocks: the fused tensors' first dimension counts them).
    path = tmp_path / "attn-only.safetensors"
    decoupleq.save(model, path)
    ids = token_batches(n=1, seq=12, seed=3)
    with torch.no_grad():
        assert torch.equal(decoupleq.load(path)(ids).logits, model(ids).logits)


def test_nothing_planned_leaves_the_model_as_it_was():
    model = tiny_mixtral()
    fused = model.model.layers[0].mlp.experts
    decoupleq.quantize(model, token_batches(n=1, seq=8), _config(method="rtn", skip=("*",)))
    assert model.model.layers[0].mlp.experts is fused
    assert not any(isinstance(m, (QuantLinear, moe.RoutedExperts)) for m in model.modules())


def test_rtn_without_data_quantizes_the_experts_too():
    model = tiny_qwen2_moe()
    with one_thread():
        decoupleq.quantize(model, token_batches(n=1, seq=8), _config(method="rtn"))
    q, kept = _expert_counts(model)
    assert q > 0 and kept == 0


def test_a_list_of_linear_experts_is_quantized_and_its_router_kept():
    model = ListMoENet().eval()
    calib = token_batches(n=4, seq=32)
    with one_thread():
        decoupleq.quantize(model, calib, _config(), blocks="layers")
    m = model.layers[0].moe
    assert type(m.gate) is torch.nn.Linear and "layers.0.moe.gate" in model.decoupleq_report.skipped
    for ex in m.experts:
        assert all(isinstance(getattr(ex, n), QuantLinear) for n in ("w1", "w2", "w3"))
    by_name = {r.name: r for r in model.decoupleq_report.layers}
    # w1 and w3 read the same routed tokens; w2 reads that expert's hidden activations.
    for e in range(4):
        a, b, c = (by_name[f"layers.0.moe.experts.{e}.{n}"] for n in ("w1", "w3", "w2"))
        assert a.n_tokens == b.n_tokens == c.n_tokens
    assert sum(by_name[f"layers.1.moe.experts.{e}.w1"].n_tokens for e in range(4)) == 2 * 4 * 32
    q, kept = _expert_counts(model)
    assert kept == 0 and q == 2 * 4 * 3 * 64 * 64


# ---------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe])
def test_save_pretrained_from_pretrained_gives_the_quantized_models_logits(tmp_path, build):
    # transformers saves Mixtral's experts under the legacy name ``block_sparse_moe`` and renames
    # them back on load: the folder's checks and checksums follow the same renaming.
    from transformers import AutoModelForCausalLM

    model = build()
    with one_thread():
        decoupleq.quantize(model, token_batches(n=4, seq=32), _config(method="rtn"))
        model.save_pretrained(tmp_path / "q")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        ids = token_batches(n=2, seq=20, seed=7)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(loaded.model.layers[1].mlp.experts[3].down_proj, QuantLinear)
    assert moe.parameter_counts(loaded) == moe.parameter_counts(model)


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe])
def test_save_load_gives_the_quantized_models_logits(tmp_path, build):
    model = build()
    calib = token_batches(n=4, seq=32)
    with one_thread():
        decoupleq.quantize(model, calib, _config())
        path = tmp_path / "moe.safetensors"
        decoupleq.save(model, path)
        loaded = decoupleq.load(path)
        ids = token_batches(n=2, seq=20, seed=7)
        with torch.no_grad():
            want = model(ids).logits
            got = loaded(ids).logits
    assert torch.equal(got, want)
    assert isinstance(loaded.model.layers[1].mlp.experts[3].down_proj, QuantLinear)
    assert moe.parameter_counts(loaded) == moe.parameter_counts(model)

    # Into a caller's full-precision model of the same architecture: filled in place.
    target = build(seed=5)
    with one_thread():
        decoupleq.load(path, target)
        with torch.no_grad():
            assert torch.equal(target(ids).logits, want)


def test_a_bad_file_leaves_a_callers_fused_experts_as_they_were(tmp_path):
    model = tiny_mixtral()
    with one_thread():
        decoupleq.quantize(model, token_batches(n=2, seq=16), _config(method="rtn"))
    path = tmp_path / "m.safetensors"
    decoupleq.save(model, path)
    other = tiny_mixtral(layers=3)  # one block more than the file holds
    fused = other.model.layers[0].mlp.experts
    with pytest.raises(ValueError):
        decoupleq.load(path, other)
    assert other.model.layers[0].mlp.experts is fused


# ---------------------------------------------------------------------------
# Perplexity on the model's own text
# ---------------------------------------------------------------------------


def _own_text(model, n=4, length=64, seed=0):
    torch.manual_seed(seed)
    start = torch.zeros(n, 1, dtype=torch.long)
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_length=length, min_length=length, top_k=0,
                              pad_token_id=1, eos_token_id=None)


def _ppl(model, ids):
    with torch.no_grad():
        out = model(ids, labels=ids)
    return math.exp(float(out.loss))


def test_tiny_mixtral_perplexity_on_its_own_text(capsys):
    """A figure, printed: perplexity of the tiny Mixtral on text it sampled itself, full
    precision vs W4 g32 decoupleQ with every expert quantized. The text comes from the
    full-precision model, so no model predicts it better on average (cross-entropy >=
    entropy): the gap is what quantization costs. ``initializer_range`` 0.1 makes the
    random model's predictions far from uniform (at 0.02 they are nearly uniform and
    every model scores about the vocabulary size). ``benchmarks/bench_moe.py`` has the
    larger figure."""
    with one_thread():
        model = tiny_mixtral(seed=0, init=0.1)
        calib = _own_text(model, n=8, length=64, seed=1)
        held_out = _own_text(model, n=4, length=64, seed=2)
        fp = _ppl(model, held_out)
        decoupleq.quantize(model, calib, _config())
        q = _ppl(model, held_out)
    assert _expert_counts(model)[1] == 0
    with capsys.disabled():
        print(f"\ntiny Mixtral, own sampled text (4 x 64 tokens): ppl full precision {fp:.3f}, W4 g32 {q:.3f}")
    assert fp < 0.8 * 96  # the model is far from uniform over its 96 tokens
    assert math.isfinite(q) and q >= fp * 0.98


def test_info_counts_parameters_quantized_and_kept(tmp_path, capsys):
    from decoupleq import cli

    model = tiny_mixtral()
    with one_thread():
        decoupleq.quantize(model, token_batches(n=2, seq=16), _config(method="rtn"))
    path = tmp_path / "model.safetensors"
    decoupleq.save(model, path)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    # Expected from the model's own modules, counted independently of the file header.
    experts = 2 * 4 * (2 * 64 * 64 + 64 * 64)
    attention = 2 * (2 * 64 * 64 + 2 * 32 * 64)
    kept = sum(p.numel() for n, p in model.named_parameters()
               if not n.endswith((".scale", ".zero")))
    assert f"{experts + attention:,} weights quantized" in out
    assert f"{kept:,} parameters kept in floating point" in out
    assert f"MoE experts: {experts:,} of {experts:,} expert weights quantized (100.0%), 0 kept" in out
    assert "24 quantized" in out  # 8 attention layers and 2 x 4 x 2 expert layers


def test_cli_quantizes_a_mixtral_folder_with_its_experts(tmp_path, capsys):
    """``decoupleq quantize DIR`` on a Hugging Face Mixtral folder: the summary and ``info``
    count the experts' weights, all quantized, and the folder loads back."""
    import json

    from decoupleq import cli
    from zoo_helpers import read, text_slice, train_tokenizer

    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=60_000), vocab_size=280)
    model = tiny_mixtral()
    model.resize_token_embeddings(len(tok))
    src = tmp_path / "mixtral"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    calib = text_slice("wikitext-2/valid.txt", tmp_path / "valid.txt")
    out = tmp_path / "q"
    with one_thread():
        assert cli.main(["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32",
                         "--calib", str(calib), "--num-samples", "2", "--seq-len", "32", "--out", str(out),
                         "-q"]) == 0
    printed = capsys.readouterr().out
    experts = 2 * 4 * (2 * 64 * 64 + 64 * 64)
    assert f"MoE experts: {experts:,} of {experts:,} expert weights quantized (100.0%), 0 kept" in printed
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["layers"] == 24 and summary["params"]["experts_kept"] == 0
    assert summary["params"]["experts_quantized"] == experts
    assert cli.main(["info", str(out)]) == 0
    assert "24 quantized" in capsys.readouterr().out
    loaded, _, _ = cli.load_quantized(out)
    assert isinstance(loaded.model.layers[0].mlp.experts[0].gate_up_proj, QuantLinear)
