"""quantize(model, calibration, config) end to end on tiny models built from configs."""
import copy
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

import decoupleq
from decoupleq.capture import ActivationCache, MemoryBudget
from decoupleq.config import BlockTuneConfig, ModelQuantConfig, QuantConfig
from decoupleq.models import find_blocks, get_adapter, quantizable_layers
from decoupleq.nn import QuantConv2d, QuantLinear

from _pipeline_models import (
    TinyCNN, logits, one_thread, rel_err, tiny_bert, tiny_gpt2, tiny_llama, token_batches, transformers,
)


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


W4 = QuantConfig(bits=4, group_size=32, iterations=2)
RTN4 = QuantConfig(method="rtn", bits=4, group_size=32)


def _quant_linears(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# End to end on the three families
# ---------------------------------------------------------------------------


def test_llama_end_to_end():
    model = tiny_llama(seed=0)
    fp = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    calib, held_out = token_batches(n=8, seq=24, seed=1), token_batches(n=4, seq=24, seed=2)

    out = decoupleq.quantize(model, calib, W4, verbose=False)
    assert out is model and not model.training

    names = sorted(_quant_linears(model))
    expected = sorted(
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert names == expected
    # Embeddings and the head stay full precision and untouched.
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, fp.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    # True-sequential groups, in the Llama order.
    assert model.decoupleq_report.blocks[0].groups == [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"],
    ]
    assert [l.n_tokens for l in model.decoupleq_report.layers] == [8 * 24] * 14
    assert model.decoupleq_config["quant"]["bits"] == 4

    # Closeness, judged against the plain baseline at the same bit width: rounding every
    # weight to the nearest point of the same 4-bit min-max grid (no Hessian, no tuning).
    # decoupleQ solves a superset of that problem per layer (RTN is its starting point and
    # every step keeps the best per row) and then tunes the float parts, so on data it has
    # not seen its logits must still be nearer the full-precision ones than RTN's.
    decoupleq.quantize(rtn, calib, RTN4, blockwise=False, verbose=False)
    ref = logits(fp, held_out)
    err_dq, err_rtn = rel_err(logits(model, held_out), ref), rel_err(logits(rtn, held_out), ref)
    assert err_dq < err_rtn
    # And 4-bit groups of 32 leave about 1/15 of a group's range per step: the RTN
    # weight error is a few percent of the weights, which bounds the logits' too.
    assert err_rtn < 0.1


def test_rtn_without_block_tuning_runs_no_calibration_batch():
    # RTN rounds each weight on its own grid (min-max or NeUQI with every weight
    # counted equally): quantize() must not run the model at all, and must give
    # exactly the codes of the layer-level RTN without a Hessian.
    model = tiny_llama(seed=0)
    fp = copy.deepcopy(model)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    decoupleq.quantize(model, token_batches(n=4, seq=16, seed=1), RTN4, blockwise=False, verbose=False)
    assert calls == []
    report = model.decoupleq_report
    assert len(report.layers) == 14 and all(l.n_tokens == 0 for l in report.layers)
    assert all(l.loss != l.loss and l.rel_loss != l.rel_loss for l in report.layers)  # NaN: no Hessian
    for name, q in _quant_linears(model).items():
        W = fp.get_submodule(name).weight.detach().float().numpy()
        expected = decoupleq.quantize_weight(W, None, RTN4)
        np.testing.assert_array_equal(q.codes.numpy(), expected.codes)
        np.testing.assert_array_equal(q.scale.detach().numpy(), expected.scale)
        np.testing.assert_array_equal(q.zero.detach().numpy(), expected.zero)


class _Unreadable:
    """A calibration source that fails the moment anything reads it."""

    def __iter__(self):
        raise AssertionError("calibration data was read")

    def __len__(self):
        raise AssertionError("calibration data was read")


def test_rtn_without_block_tuning_needs_and_reads_no_data():
    # Data-free means the caller need not build anything (None), and what is given is not read.
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    decoupleq.quantize(a, None, RTN4, blockwise=False, verbose=False)
    decoupleq.quantize(b, _Unreadable(), RTN4, blockwise=False, verbose=False)
    qa, qb = _quant_linears(a), _quant_linears(b)
    assert len(qa) == 14 and qa.keys() == qb.keys()
    assert all(torch.equal(qa[n].codes, qb[n].codes) for n in qa)
    assert ModelQuantConfig(quant=RTN4, blockwise=False).needs_calibration is False


@pytest.mark.parametrize("config,blockwise,what", [
    (W4, False, "method 'decoupleq' needs"),
    (RTN4, True, "method 'rtn' with block tuning needs"),
])
def test_calibration_none_is_refused_when_data_is_needed(config, blockwise, what):
    model = tiny_llama(seed=6, layers=1)
    before = _state(model)
    assert ModelQuantConfig(quant=config, blockwise=blockwise).needs_calibration is True
    with pytest.raises(ValueError, match=f"calibration is None, but {what}"):
        decoupleq.quantize(model, None, config, blockwise=blockwise, verbose=False)
    assert not _quant_linears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rtn_with_block_tuning_still_uses_the_data():
    model = tiny_llama(seed=0)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    decoupleq.quantize(model, token_batches(n=2, seq=16, seed=1), RTN4,
                       blockwise=BlockTuneConfig(epochs=1), verbose=False)
    assert calls and all(l.n_tokens == 2 * 16 for l in model.decoupleq_report.layers)


@pytest.mark.parametrize("policy,what", [("per_channel", "quantized per channel"), ("skip", "left in full precision")])
def test_indivisible_layers_are_reported_once_per_width(policy, what, caplog):
    # Group 48 divides down_proj's 96 inputs but not the 64 of the other six layers
    # of each block: one warning for the width 64, naming how many layers.
    model = tiny_llama(seed=0)
    cfg = QuantConfig(method="rtn", bits=4, group_size=48)
    with caplog.at_level(logging.WARNING, logger="decoupleq"):
        decoupleq.quantize(model, token_batches(n=2, seq=8), cfg, blockwise=False, indivisible=policy, verbose=False)
    warnings = [r.getMessage() for r in caplog.records if "does not divide" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("group_size 48 does not divide in_features 64 of 12 layers (model.layers.0.")
    assert warnings[0].endswith(what)
    quant = _quant_linears(model)
    assert {n.rsplit(".", 1)[1] for n, q in quant.items() if q.group_size == 48} == {"down_proj"}
    if policy == "skip":
        assert len(quant) == 2 and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    else:
        assert len(quant) == 14 and all(q.group_size == -1 for n, q in quant.items() if "down_proj" not in n)


def test_gpt2_conv1d_layers_are_quantized_transposed():
    model = tiny_gpt2(seed=0)
    fp = copy.deepcopy(model)
    calib, held_out = token_batches(n=8, seq=24, seed=3), token_batches(n=4, seq=24, seed=4)
    decoupleq.quantize(model, calib, QuantConfig(bits=4, group_size=16, iterations=2), verbose=False)
    qs = _quant_linears(model)
    assert sorted(qs) == sorted(
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    for name, q in qs.items():
        orig = fp.get_submodule(name)  # Conv1D, weight (in, out)
        assert q.origin == "conv1d" and q.codes.shape == orig.weight.t().shape
        # The stored (out, in) weight is a quantization of the transposed Conv1D weight.
        assert rel_err(q.dequantize().detach(), orig.weight.t()) < 0.2
    assert torch.equal(model.transformer.wte.weight, fp.transformer.wte.weight)
    rtn = copy.deepcopy(fp)
    decoupleq.quantize(rtn, calib, QuantConfig(method="rtn", bits=4, group_size=16), blockwise=False, verbose=False)
    ref = logits(fp, held_out)
    assert rel_err(logits(model, held_out), ref) < rel_err(logits(rtn, held_out), ref) < 0.1


def test_bert_with_padding_mask_counts_only_real_tokens():
    model = tiny_bert(seed=0)
    fp = copy.deepcopy(model)
    ids = token_batches(n=6, seq=20, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[4, 5:] = 0
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 6, 2)]
    decoupleq.quantize(model, batches, QuantConfig(bits=4, group_size=16, iterations=2), verbose=False)
    qs = _quant_linears(model)
    assert len(qs) == 12 and all(n.startswith("encoder.layer.") for n in qs)
    assert type(model.pooler.dense) is nn.Linear and torch.equal(model.pooler.dense.weight, fp.pooler.dense.weight)
    assert [l.n_tokens for l in model.decoupleq_report.layers] == [int(mask.sum())] * 12
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fp(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert rel_err(a[real], b[real]) < 0.1


def test_true_sequential_off_makes_one_group():
    model = tiny_llama(seed=1, layers=1)
    decoupleq.quantize(model, token_batches(n=4, seq=16), W4, true_sequential=False, blockwise=False, verbose=False)
    groups = model.decoupleq_report.blocks[0].groups
    assert len(groups) == 1 and len(groups[0]) == 7


# ---------------------------------------------------------------------------
# Other models, blocks, skipping
# ---------------------------------------------------------------------------


def test_cnn_with_conv2d_quantizes():
    model = TinyCNN(seed=0).eval()
    fp = copy.deepcopy(model)
    images = torch.randn(12, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=24, iterations=2)
    decoupleq.quantize(model, images, cfg, batch_size=4, verbose=False)
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.conv2, QuantConv2d)
    assert isinstance(model.head, QuantLinear)
    rep = {l.name: l for l in model.decoupleq_report.layers}
    assert rep["conv1"].group_size == 24  # 3*3*3 = 27 inputs: groups of 24 and 3
    assert model.conv1.n_groups == 2
    assert rep["conv2"].group_size == 24 and rep["conv2"].shape == (16, 72)
    assert rep["conv1"].n_tokens == 12 * 12 * 12 and rep["conv2"].n_tokens == 12 * 6 * 6
    test = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(test), fp(test)) < 0.15

    skipped = copy.deepcopy(fp)
    decoupleq.quantize(skipped, images, cfg, indivisible="skip", verbose=False)
    assert type(skipped.conv1) is nn.Conv2d and isinstance(skipped.conv2, QuantConv2d)


def test_skip_filter_leaves_layers_untouched():
    model = tiny_llama(seed=2)
    fp = copy.deepcopy(model)
    skip = ("*.mlp.down_proj", r"re:layers\.1\.self_attn\.(q|k)_proj")
    decoupleq.quantize(model, token_batches(n=4, seq=16), W4, skip=skip, blockwise=False, verbose=False)
    kept = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    for name in kept:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear and torch.equal(m.weight, fp.get_submodule(name).weight), name
    assert sorted(model.decoupleq_report.skipped) == sorted(kept)
    assert len(_quant_linears(model)) == 14 - len(kept)

    by_callable = copy.deepcopy(fp)
    decoupleq.quantize(by_callable, token_batches(n=4, seq=16), W4, blockwise=False, verbose=False,
                       skip=lambda name, module: module.out_features == 32)  # k and v: 64 -> 32
    assert {n.rsplit(".", 1)[1] for n in by_callable.decoupleq_report.skipped} == {"k_proj", "v_proj"}


class _Block(nn.Module):
    def __init__(self, index, d=32):
        super().__init__()
        self.index = index
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x, *, index, scale):
        # The block insists on its own arguments: a pipeline that replays block 0's
        # arguments for every block fails here.
        assert index == self.index, (index, self.index)
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) * scale, dim=-1) @ self.v(h)
        return x + self.out(a)


class _Custom(nn.Module):
    """Not a transformers model: blocks with per-block arguments, a smaller list of heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.inp = nn.Linear(8, 32)
        self.layers = nn.ModuleList(_Block(i) for i in range(3))
        self.heads = nn.ModuleList(nn.Linear(32, 4) for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for i, b in enumerate(self.layers):
            h = b(h, index=i, scale=0.25)
        return sum(head(h) for head in self.heads)


def test_custom_model_blocks_found_and_grouped_automatically():
    model = _Custom().eval()
    fp = copy.deepcopy(model)
    spec = find_blocks(model)
    assert spec.prefix == "layers" and len(spec.blocks) == 3 and get_adapter(model) is None
    data = torch.randn(6, 10, 8, generator=torch.Generator().manual_seed(0))
    decoupleq.quantize(model, data, QuantConfig(bits=4, group_size=16, iterations=2), batch_size=2, verbose=False)
    assert sorted(_quant_linears(model)) == sorted(f"layers.{i}.{n}" for i in range(3) for n in ("q", "k", "v", "out"))
    # q, k, v read the same normalised input: one group; out comes after.
    assert model.decoupleq_report.blocks[2].groups == [["q", "k", "v"], ["out"]]
    assert type(model.inp) is nn.Linear and type(model.heads[0]) is nn.Linear
    with torch.no_grad():
        assert rel_err(model(data), fp(data)) < 0.1


def test_blocks_given_by_path_or_modules():
    model = _Custom().eval()
    data = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(0))
    decoupleq.quantize(model, data, W4, blocks=[model.layers[1]], blockwise=False, verbose=False, batch_size=2)
    assert sorted(_quant_linears(model)) == ["layers.1.k", "layers.1.out", "layers.1.q", "layers.1.v"]
    other = _Custom().eval()
    decoupleq.quantize(other, data, W4, blocks="heads", blockwise=False, verbose=False, batch_size=2)
    assert sorted(_quant_linears(other)) == ["heads.0", "heads.1"]


@pytest.mark.parametrize(
    "family,make",
    [
        ("qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))),
        ("mistral", lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))),
        ("opt", lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64))),
        ("gpt_neox", lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64))),
    ],
)
def test_family_adapters_resolve(family, make):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = make().eval()
    spec = find_blocks(model)
    assert spec.adapter is not None and spec.adapter.name in (family, "llama")
    assert len(spec.blocks) == 2
    inside = set(quantizable_layers(spec.blocks[0]))
    for group in spec.adapter.groups:
        assert set(group) <= inside, (group, inside)
    decoupleq.quantize(model, token_batches(n=2, seq=12, vocab=64), QuantConfig(bits=4, group_size=16, iterations=1),
                       blockwise=False, verbose=False)
    assert [g for g in model.decoupleq_report.blocks[1].groups] == [list(g) for g in spec.adapter.groups]


def test_per_layer_masks_are_caught_for_each_block():
    """Qwen2 with sliding-window layers passes each layer its own mask: every block
    must be replayed with the mask the model gives it, not block 0's."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)).eval()
    ids = token_batches(n=3, seq=10, vocab=64)
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, kwargs.get("attention_mask"))

        return hook

    handles = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids[:1])
    for h in handles:
        h.remove()
    assert seen[0] is None and isinstance(seen[1], torch.Tensor)  # the two layers really differ

    from decoupleq.capture import catch_block_inputs

    cache = ActivationCache(1 << 30)
    caught = catch_block_inputs(model, list(model.model.layers), [ids[i : i + 1] for i in range(3)], cache)
    assert caught.chained and len(cache) == 3
    for j in range(3):
        assert caught.calls[0][j].kwargs["attention_mask"] is None
        assert torch.equal(caught.calls[1][j].kwargs["attention_mask"], seen[1])
    fp = copy.deepcopy(model)
    decoupleq.quantize(model, ids, QuantConfig(bits=4, group_size=16, iterations=2), verbose=False)
    assert len(_quant_linears(model)) == 14
    assert rel_err(logits(model, ids), logits(fp, ids)) < 0.1


# ---------------------------------------------------------------------------
# Activation cache
# ---------------------------------------------------------------------------


def test_activation_cache_spills_to_a_private_temp_dir(tmp_path):
    entries = [torch.randn(3, 5, 8) for _ in range(4)]
    cache = ActivationCache(MemoryBudget(int(1.5 * 3 * 5 * 8 * 4)), tmpdir=tmp_path, name="t")
    for e in entries:
        cache.append(e)
    assert cache.n_on_disk == 3 and cache.bytes_in_memory == 3 * 5 * 8 * 4
    spill = cache.directory
    assert os.path.dirname(spill) == str(tmp_path) and len(os.listdir(spill)) == 3
    assert all(torch.equal(cache[i], entries[i]) for i in range(4))
    new = torch.randn(3, 5, 8)
    cache[2] = new  # written through to its file
    files = sorted(os.listdir(spill), key=lambda f: int(f.rsplit("-", 1)[1].split(".")[0]))
    on_disk = torch.from_file(os.path.join(spill, files[1]), size=new.numel(), dtype=torch.float32)
    assert torch.equal(on_disk.view(3, 5, 8), new) and torch.equal(cache[2], new)
    cache[3] = torch.ones(2, 2, dtype=torch.bfloat16)  # another shape and dtype
    assert cache[3].dtype == torch.bfloat16 and torch.equal(cache[3], torch.ones(2, 2, dtype=torch.bfloat16))
    # The small replacement fits the budget: its old spill file is gone.
    assert len(os.listdir(spill)) == 2 and cache.n_on_disk == 2
    cache.close()
    assert not os.path.exists(spill) and os.listdir(tmp_path) == []


def test_memory_mapped_cache_gives_identical_results(tmp_path, caplog):
    a, b = tiny_llama(seed=5), tiny_llama(seed=5)
    calib = token_batches(n=4, seq=16)
    cfg = ModelQuantConfig(quant=W4, blockwise=BlockTuneConfig(epochs=1), verbose=False)
    decoupleq.quantize(a, calib, cfg)
    with caplog.at_level(logging.INFO, logger="decoupleq.capture"):
        decoupleq.quantize(b, calib, cfg, cache_budget_mb=0, tmpdir=tmp_path)
    assert any("spills to" in r.getMessage() and str(tmp_path) in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path) == []  # cleaned up
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------
# Arguments and modes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(calibration=[]), ValueError, "calibration is empty"),
        (dict(calibration="some text"), TypeError, "calibration"),
        (dict(calibration=torch.full((2, 8), 96)), ValueError, r"calibration token ids must be in \[0, 96\)"),
        (dict(calibration=[torch.zeros(2, 3, 4, dtype=torch.long)]), ValueError, r"calibration\[0\]"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(cache_budget_mb=-1), ValueError, "cache_budget_mb"),
        (dict(skip=3), TypeError, "skip"),
        (dict(skip="re:("), ValueError, "skip pattern"),
        (dict(blocks="model.nope"), ValueError, "blocks"),
        (dict(config="W2"), TypeError, "config"),
        (dict(indivisible="maybe"), ValueError, "indivisible"),
        (dict(blockwise="yes"), TypeError, "blockwise"),
        (dict(verbose=1), TypeError, "verbose"),
        (dict(tmpdir="/nonexistent/decoupleq"), ValueError, "tmpdir"),
        (dict(config=QuantConfig(group_size=48), indivisible="error"), ValueError,
         r"group_size 48 does not divide in_features 64 of layer model\.layers\.0\.self_attn"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, exc, match):
    model = tiny_llama(seed=6, layers=1)
    before = _state(model)
    args = dict(calibration=token_batches(n=2, seq=8), config=W4, verbose=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        decoupleq.quantize(model, **args)
    assert not _quant_linears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be"):
        decoupleq.quantize("llama", token_batches(n=2, seq=8))
    with pytest.raises(ValueError, match="lr"):
        BlockTuneConfig(lr=-1.0)


def test_quiet_and_verbose_modes(capsys, caplog):
    model = tiny_llama(seed=7, layers=1)
    with caplog.at_level(logging.INFO, logger="decoupleq"):
        decoupleq.quantize(model, token_batches(n=2, seq=8), W4, blockwise=False, verbose=False)
    err = capsys.readouterr()
    assert err.out == "" and err.err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]

    caplog.clear()
    loud = tiny_llama(seed=7, layers=1)
    with caplog.at_level(logging.INFO, logger="decoupleq"):
        decoupleq.quantize(loud, token_batches(n=2, seq=8), W4, blockwise=False, verbose=True)
    err = capsys.readouterr().err
    assert "layers" in err and "blocks" in err  # the two progress bars
    assert any("quantized 7 layers" in r.getMessage() for r in caplog.records)


def test_calibration_forms_are_equivalent():
    ids = token_batches(n=4, seq=12)
    models = [tiny_llama(seed=8, layers=1) for _ in range(3)]
    cfg = ModelQuantConfig(quant=W4, blockwise=BlockTuneConfig(epochs=1), verbose=False)
    decoupleq.quantize(models[0], ids, cfg)                          # tensor, 1 row per batch
    decoupleq.quantize(models[1], [row for row in ids], cfg)         # list of 1-D rows
    decoupleq.quantize(models[2], [{"input_ids": ids[i : i + 1]} for i in range(4)], cfg)  # dicts
    s0 = models[0].state_dict()
    for m in models[1:]:
        s = m.state_dict()
        assert all(torch.equal(s0[k], s[k]) for k in s0)


def test_training_flag_is_restored():
    model = tiny_llama(seed=9, layers=1).train()
    decoupleq.quantize(model, token_batches(n=2, seq=8), W4, blockwise=False, verbose=False)
    assert model.training
