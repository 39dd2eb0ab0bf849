"""UniQuanF: the flexible-mapping quantizer, its unification to BCQ, block training and method='uniquanf'."""
import math

import numpy as np
import pytest
import torch

from _pipeline_models import one_thread, tiny_gpt2, tiny_llama, token_batches

import decoupleq
from decoupleq import HessianAccumulator, QuantConfig, damp, quantize_weight
from decoupleq.bcq import BCQWeight, level_signs
from decoupleq.capture import ActivationCache, MemoryBudget, catch_block_inputs
from decoupleq.config import ModelQuantConfig, UniQuanFConfig
from decoupleq.models import find_blocks
from decoupleq.nn_bcq import BCQLinear
from decoupleq.uniquanf import UniQuanFLinear, UniQuanFQuantizer
from decoupleq.uniquanf_init import unified_init
from decoupleq.uniquanf_train import make_trainable, train_block, unify

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def layer_hessians(model, ids):
    """Hessian of every block linear's inputs over ``ids``, by hooks on the full-precision model."""
    accs, hooks = {}, []
    for name, mod in linears(model).items():
        accs[name] = HessianAccumulator(mod.in_features)
        hooks.append(mod.register_forward_hook(
            lambda mod, inp, out, n=name: accs[n].add(inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}


def hessian_error(W, What, H00):
    D = (What.astype(np.float64) - W.astype(np.float64))
    return float(np.sum((D @ H00) * D))


def rounding_bound(q: UniQuanFQuantizer) -> np.ndarray:
    """A few float32 ulps of the magnitudes that enter w_hat = s (level + delta + c - z), per element."""
    with torch.no_grad():
        s = torch.exp(q.delta1)[:, :, None]
        mag = q.alpha.abs().sum(-1, keepdim=True) + q.shift.abs()[:, :, None] + q.c + q.zero.abs()[:, :, None]
        bound = 8 * EPS32 * s * mag
        g = q.weight.shape[1] // q.groups
        return bound.expand(-1, -1, g).reshape(q.weight.shape).numpy()


# ---------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------


def test_quantizer_starts_from_the_unified_init():
    W = torch.randn(24, 64) * 0.05
    q = UniQuanFQuantizer(W, 2, 16)
    init = unified_init(W, 2, 16)
    # delta1 = log s, held in float32: exp(delta1) is s to float32 rounding.
    np.testing.assert_allclose(torch.exp(q.delta1).detach().numpy(), init.scale, rtol=4 * EPS32, atol=0)
    assert torch.all(q.delta2 == 0) and torch.all(q.delta3 == 0)
    np.testing.assert_array_equal(q.alpha.detach().numpy(), init.alpha)
    # The first assignment is a full search in float32: the float64 init's choice except near ties.
    assert np.mean(q.idx.reshape(24, 64).numpy() == init.indices) > 0.99
    np.testing.assert_allclose(q().detach().numpy(), init.dequantize(), atol=float(rounding_bound(q).max()) * 4 + 1e-3 * 0.05)


def test_mapping_is_periodic_and_local():
    torch.manual_seed(0)
    q = UniQuanFQuantizer(torch.randn(16, 48), 3, -1, period=2, local_mapping=True)
    q.updating = True
    start = q.idx.clone()
    with torch.no_grad():
        q.alpha.mul_(torch.linspace(0.2, 3.0, 16)[:, None, None])  # levels move far
    q()  # call 1: reuse
    assert torch.equal(q.idx, start)
    q()  # call 2: local reassignment
    step = (q.idx - start).abs()
    assert step.max() == 1 and step.sum() > 0
    # A full search would have moved some indices further than one step.
    lev = q.levels().detach()
    u = q._transformed()[1].detach()
    full = torch.argmin((u[..., None] - lev[:, :, None, :]).abs(), dim=-1)
    assert (full - start).abs().max() > 1
    q.local_mapping = False
    q()
    q()
    assert torch.equal(q.idx, full)


def test_straight_through_gradients_and_filtering():
    torch.manual_seed(1)
    W = torch.randn(4, 32)
    q = UniQuanFQuantizer(W, 2, -1, grad_filter=True)
    with torch.no_grad():
        q.delta2[0, :8] = 3.0  # sigma e^3 times larger: u moves far from its (frozen) level
    x, u = q._transformed()
    lev = q.levels()
    qv = torch.gather(lev, 2, q.idx)
    far = ((u - qv).abs() > q.alpha.abs().min(-1).values[:, :, None]).reshape(4, 32)
    assert far[0, :8].sum() >= 4 and (~far).sum() >= 16
    q().sum().backward()
    g2 = q.delta2.grad
    assert torch.all(g2[far] == 0)
    assert torch.all(g2[~far] != 0)
    # The STE gradient of w_hat wrt delta2 is s * d(W/sigma)/d delta2 = -s * W / sigma.
    with torch.no_grad():
        s = torch.exp(q.delta1)[:, :, None].reshape(4, 1)
        sigma = torch.exp(q.delta1 + q.delta2 + q.delta3)
        expect = -s * W / sigma
    torch.testing.assert_close(g2[~far], expect[~far], rtol=1e-5, atol=1e-7)
    # alpha gets s * beta_i summed over the unfiltered elements of each row.
    signs = torch.from_numpy(level_signs(2))
    idx = q.idx.reshape(4, 32)
    want = torch.stack([(s[r] * signs[idx[r]][~far[r]]).sum(0) for r in range(4)])[:, None, :]
    torch.testing.assert_close(q.alpha.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_filter", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_fused_forward_matches_autograd_specification(grad_filter, group_size):
    torch.manual_seed(2)
    W = torch.randn(12, 48) * 0.1
    qs = [UniQuanFQuantizer(W, 3, group_size, grad_filter=grad_filter) for _ in range(2)]
    with torch.no_grad():
        for q in qs:  # a trained-looking state: every parameter moved, some elements filtered
            torch.manual_seed(3)
            q.delta2.add_(torch.randn_like(q.delta2) * 0.3)
            q.delta3.add_(torch.randn_like(q.delta3) * 0.1)
            q.alpha.mul_(1 + 0.1 * torch.randn_like(q.alpha))
    g = torch.randn(12, 48)
    w_fused = qs[0]()
    w_spec = qs[1].forward_autograd()
    assert torch.equal(w_fused, w_spec)
    (w_fused * g).sum().backward()
    (w_spec * g).sum().backward()
    for name in ("delta1", "delta2", "delta3", "alpha"):
        a, b = getattr(qs[0], name).grad, getattr(qs[1], name).grad
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if grad_filter:
        assert torch.any(qs[0].delta2.grad == 0)


def test_without_filtering_every_element_passes_gradient():
    torch.manual_seed(1)
    q = UniQuanFQuantizer(torch.randn(4, 32), 2, -1, grad_filter=False)
    with torch.no_grad():
        q.delta2[0, :8] = 3.0
    q().sum().backward()
    assert torch.all(q.delta2.grad != 0)


def test_bcq_weight_contract():
    bits = 3
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, (5, 12)).astype(np.uint8)
    alpha = rng.standard_normal((5, 3, bits)).astype(np.float32)
    offset = rng.standard_normal((5, 3)).astype(np.float32)
    w = BCQWeight(idx, alpha, offset, bits, 4).dequantize()
    r, c = 2, 9
    k = int(idx[r, c])
    beta = [1.0 if ((k >> (bits - 1 - i)) & 1) == 0 else -1.0 for i in range(bits)]
    assert w[r, c] == pytest.approx(sum(alpha[r, 2, i] * beta[i] for i in range(bits)) + offset[r, 2], rel=1e-6)
    with pytest.raises(ValueError, match=r"indices\[0, 0\] = 8 is outside \[0, 7\]"):
        BCQWeight(np.full((5, 12), 8, np.uint8), alpha, offset, bits, 4)


# ---------------------------------------------------------------------------
# Layer level, on a tiny Llama's layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("weighted", [False, True])
def test_unified_init_beats_minmax_uq_under_the_hessian(bits, group_size, weighted):
    model = tiny_llama(layers=2)
    hs = layer_hessians(model, token_batches(16, 32))
    for name, layer in linears(model).items():
        W = layer.weight.detach().numpy()
        H00 = damp(hs[name], 0.01)
        hdiag = np.diag(H00).astype(np.float32) if weighted else None
        init = unified_init(W, bits, group_size, hdiag=hdiag)
        e_bcq = hessian_error(W, init.dequantize(), H00)
        # Min-max UQ with UniQuanF's own scale and zero, weights rounded to the nearest integer level.
        g = W.shape[1] if group_size == -1 else group_size
        u = W.reshape(W.shape[0], -1, g) / init.scale[..., None] + init.zero[..., None]
        qi = np.clip(np.floor(u + 0.5), 0, (1 << bits) - 1)
        W_uq = (init.scale[..., None] * (qi - init.zero[..., None])).reshape(W.shape)
        e_uq = hessian_error(W, W_uq, H00)
        # The library's min-max RTN (range widened to contain 0): the same grids on these layers.
        e_rtn = float(quantize_weight(W, hs[name], QuantConfig(method="rtn", bits=bits, group_size=group_size,
                                                               init="minmax")).loss.sum())
        assert e_bcq <= e_uq, (name, e_bcq, e_uq)
        assert e_bcq <= e_rtn * (1 + 1e-6), (name, e_bcq, e_rtn)


# ---------------------------------------------------------------------------
# Block training and exact unification
# ---------------------------------------------------------------------------


def _block_setup(model, ids, blocks_wanted=1):
    spec = find_blocks(model)
    budget = MemoryBudget(1 << 30)
    cache = ActivationCache(budget, name="t")
    caught = catch_block_inputs(model, spec.blocks, list(torch.split(ids, 1)), cache)
    return spec, cache, caught.calls[0], budget


def test_training_lowers_block_mse_and_unification_is_exact():
    model = tiny_llama(layers=1)
    ids = token_batches(8, 24)
    spec, inputs, calls, budget = _block_setup(model, ids)
    block = spec.blocks[0]
    with torch.no_grad():
        labels = ActivationCache(budget, name="l")
        for j in range(len(inputs)):
            labels.append(decoupleq.capture.run_block(block, calls[j], inputs[j]))
    originals = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = UniQuanFConfig(epochs=6)
    make_trainable(block, originals, 2, 32, cfg)
    res = train_block(block, inputs, None, calls, labels, cfg)
    assert res.steps == 6 * len(inputs)
    assert res.loss_after < 0.9 * res.loss_before, res
    trained = {}
    for name in originals:
        mod = block.get_submodule(name)
        assert isinstance(mod, UniQuanFLinear)
        q = mod.quantizer
        assert torch.any(q.delta2 != 0) and torch.any(q.delta3 != 0)  # all the deltas moved
        with torch.no_grad():
            w = q().numpy()
        bcq = q.to_bcq()
        # The unification theorem: the exported BCQ weight is the trained quantizer's weight.
        np.testing.assert_array_less(np.abs(bcq.dequantize() - w), rounding_bound(q) + 1e-30)
        assert bcq.indices.dtype == np.uint8 and bcq.alpha.shape == (q.weight.shape[0], q.groups, 2)
        trained[name] = bcq.dequantize()
    bcqs = unify(block, originals)
    for name in originals:
        mod = block.get_submodule(name)
        assert isinstance(mod, BCQLinear)
        np.testing.assert_array_equal(mod.dequantize().detach().numpy(), trained[name])
        np.testing.assert_array_equal(bcqs[name].dequantize(), trained[name])
    inputs.close()
    labels.close()


def test_training_is_deterministic():
    outs = []
    for _ in range(2):
        model = tiny_llama(layers=1)
        decoupleq.quantize(model, token_batches(4, 16),
                           QuantConfig(method="uniquanf", bits=2, group_size=32, uniquanf=UniQuanFConfig(epochs=2)),
                           verbose=False)
        outs.append(model.model.layers[0].mlp.down_proj.dequantize().detach().clone())
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------
# method="uniquanf" end to end
# ---------------------------------------------------------------------------


def own_data(model, n, seq, seed):
    """Sequences sampled from the full-precision model itself: its loss on them is meaningful."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (n, 1), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(seq - 1):
            p = torch.softmax(model(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def structured_llama():
    """A tiny Llama with larger weights than the default init, so its next-token distributions are peaked."""
    model = tiny_llama(layers=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 0.08)
    return model


def test_quantize_uniquanf_end_to_end_beats_rtn():
    base = structured_llama()
    calib = own_data(base, 16, 32, seed=10)
    test = own_data(base, 16, 32, seed=20)
    fp = nll(base, test)
    losses = {}
    for method in ("rtn", "uniquanf"):
        model = structured_llama()
        cfg = QuantConfig(method=method, bits=2, group_size=32)
        decoupleq.quantize(model, calib, ModelQuantConfig(quant=cfg, blockwise=False), verbose=False)
        assert torch.isfinite(model(test).logits).all()
        losses[method] = nll(model, test)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, BCQLinear) and q.bits == 2 and q.group_size == 32
    rep = model.decoupleq_report
    assert len(rep.layers) == 14 and all(b.tune.loss_after < b.tune.loss_before for b in rep.blocks)
    assert model.decoupleq_config["quant"]["uniquanf"]["epochs"] == UniQuanFConfig().epochs
    assert fp < losses["uniquanf"] < losses["rtn"], (fp, losses)


def test_uniquanf_config_is_validated():
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4 with method 'uniquanf'"):
        QuantConfig(method="uniquanf", bits=5)
    with pytest.raises(ValueError, match="symmetric"):
        QuantConfig(method="uniquanf", symmetric=True)
    with pytest.raises(ValueError, match="input_prob"):
        UniQuanFConfig(input_prob=1.5)
    with pytest.raises(ValueError, match="period"):
        UniQuanFConfig(period=0)
    with pytest.raises(TypeError, match="epochs"):
        UniQuanFConfig(epochs=1.5)
    with pytest.raises(ValueError, match="init_weighting"):
        UniQuanFConfig(init_weighting="full")
    with pytest.raises(TypeError, match="uniquanf must be"):
        QuantConfig(method="uniquanf", uniquanf=3)
    assert QuantConfig(method="uniquanf", uniquanf={"epochs": 1}).uniquanf.epochs == 1


def test_non_linear_layers_are_refused_before_any_work():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nn.Linear layers only.*Conv1D"):
        decoupleq.quantize(model, token_batches(2, 8), QuantConfig(method="uniquanf", bits=2, group_size=32),
                           verbose=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_weight_is_rejected_by_name():
    W = torch.randn(4, 8)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN"):
        UniQuanFQuantizer(W, 2, -1)


def test_uniquanf_model_saves_and_loads_with_identical_logits(tmp_path):
    model = tiny_llama(layers=2)
    cfg = QuantConfig(method="uniquanf", bits=2, group_size=32, uniquanf=UniQuanFConfig(epochs=1))
    decoupleq.quantize(model, token_batches(4, 16), cfg, verbose=False)
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    assert len(layers) == 14
    ids = token_batches(1, 16, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    decoupleq.save(model, tmp_path / "m.safetensors")
    loaded = decoupleq.load(tmp_path / "m.safetensors")
    assert sum(isinstance(m, BCQLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hessian_diagonal_matches_the_damped_hessian():
    from decoupleq.uniquanf_train import _DiagHessian

    layer = torch.nn.Linear(24, 8)
    acc, ref = _DiagHessian(layer), HessianAccumulator(24)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 5, generator=g) > 0.3
    for _ in range(3):
        x = torch.randn(2, 5, 24, generator=g) * torch.linspace(0.1, 3, 24)
        acc.add(x, mask)
        ref.add(x[mask])
    want = np.diag(damp(ref.hessian(), 0.01)).astype(np.float32)
    np.testing.assert_allclose(acc.damped(0.01), want, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "hessian_diag"])
def test_init_weighting_choices_run_end_to_end(weighting):
    model = tiny_llama(layers=1)
    cfg = QuantConfig(method="uniquanf", bits=3, group_size=-1,
                      uniquanf=UniQuanFConfig(epochs=1, init_weighting=weighting, clip_steps=0))
    decoupleq.quantize(model, token_batches(4, 16), cfg, verbose=False)
    b = model.decoupleq_report.blocks[0].tune
    assert b.steps == 4 and math.isfinite(b.loss_after) and b.loss_after < b.loss_before
    assert torch.any(model.model.layers[0].mlp.up_proj.offset != 0)


def test_quantize_weight_refuses_uniquanf_instead_of_solving_another_method():
    W = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="method 'uniquanf' trains whole blocks"):
        quantize_weight(W, np.eye(8), QuantConfig(method="uniquanf", bits=2, group_size=8))
