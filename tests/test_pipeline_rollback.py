"""quantize() checks every weight before work and gives the model back unchanged when it fails."""
import pytest
import torch

import decoupleq
from decoupleq.config import BlockTuneConfig, QuantConfig

from _pipeline_models import one_thread, tiny_llama, token_batches

CFG = QuantConfig(bits=2, group_size=16, iterations=2)


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _snapshot(model):
    """Everything a failed call must leave alone: module types by name, and every tensor's bits."""
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return types, state


def _assert_unchanged(model, snap):
    types, state = snap
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and _same_bits(now[k], v), k


def _same_bits(a, b):
    """Bit-identical (NaN == NaN here, unlike torch.equal)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


@pytest.mark.parametrize("where", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_named_before_any_work(where, value):
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.get_submodule(where).weight[5, 7] = value
    snap = _snapshot(model)
    for method in ("decoupleq", "rtn"):  # the data path and the data-free path
        cfg = QuantConfig(bits=2, group_size=16, iterations=2, method=method)
        with pytest.raises(ValueError, match=rf"layer {where}: weight \(\d+, \d+\) has 1 NaN or Inf"):
            decoupleq.quantize(model, token_batches(n=2, seq=8), cfg, blockwise=False, verbose=False)
        _assert_unchanged(model, snap)
        assert not hasattr(model, "decoupleq_config")


def test_failure_part_way_restores_the_model_and_names_the_layer():
    """up_proj's finite but huge rows (3e38: their min-max range would overflow float32) are
    refused by the solver's input check: by then q, k, v, o and gate of block 0 are quantized."""
    model = tiny_llama(seed=4)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:4].fill_(3e38)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"^layer model\.layers\.0\.mlp\.up_proj: W has an entry of magnitude 3e\+38"):
        decoupleq.quantize(model, token_batches(n=2, seq=8), CFG, blockwise=False, verbose=False)
    _assert_unchanged(model, snap)


def test_failure_after_a_tuned_block_restores_its_float_parts():
    """Block 0 is quantized and tuned (its norms trained in place), then block 1 fails."""
    model = tiny_llama(seed=5)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:4].fill_(3e38)
    snap = _snapshot(model)
    norm = model.model.layers[0].input_layernorm.weight
    tune = BlockTuneConfig(epochs=2, lr=1e-2, train_norms=True)
    with pytest.raises(ValueError, match=r"^layer model\.layers\.1\.mlp\.up_proj: "):
        decoupleq.quantize(model, token_batches(n=2, seq=8), CFG, blockwise=tune, verbose=False)
    _assert_unchanged(model, snap)
    assert model.model.layers[0].input_layernorm.weight is norm  # the same Parameter, its old values
    # The restored model still quantizes once the bad rows are fixed.
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:4].normal_(0, 0.02)
    decoupleq.quantize(model, token_batches(n=2, seq=8), CFG, blockwise=False, verbose=False)
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "QuantLinear"


def test_interrupt_restores_the_model():
    """Ctrl-C during block 1 (raised from a forward hook, as a signal handler would) undoes block 0."""
    model = tiny_llama(seed=6)
    snap = _snapshot(model)
    calls = {"n": 0}

    def interrupt(mod, inp, out):
        calls["n"] += 1
        if any(type(m).__name__ == "QuantLinear" for m in model.model.layers[0].modules()):
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            decoupleq.quantize(model, token_batches(n=2, seq=8), CFG, verbose=False)
    finally:
        handle.remove()
    assert calls["n"] > 0
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("field, value", [
    ("iterations", 1001), ("iterations", 10**12), ("blocksize", (1 << 20) + 1), ("blocksize", 2**62),
    ("group_size", 2**40), ("pgd_steps_before_round", 10**9), ("pgd_steps_per_column", 10**9),
])
def test_quant_config_rejects_absurd_sizes_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be <= \d+, got {value}$"):
        QuantConfig(**{field: value})
    QuantConfig(iterations=1000, blocksize=1 << 20)  # the bounds themselves are accepted
