"""Group sizes that do not divide in_features: the last group of each row is shorter.

Group j covers columns j*g .. j*g + g - 1, cut at n, so a row has ceil(n / g)
groups. Every stage is checked on such layers: the C core against its NumPy
twin (every init with every method, the float step, PGD), packing, the
kernels, QuantLinear forward and backward, save/load, and a tiny model.
"""
import numpy as np
import pytest
import torch
import transformers

import decoupleq
from decoupleq import QuantConfig, quantize_weight
from decoupleq import _C
from decoupleq import reference as R
from decoupleq.kernels import available_kernels
from decoupleq.nn import QuantLinear
from decoupleq.packing import PackedWeight
from decoupleq.reference import packing as ref_packing
from decoupleq.reference.synthetic import synthetic_problem
from decoupleq.sft import quant_linear

from _pipeline_models import token_batches

EPS32 = np.finfo(np.float32).eps
INITS = ("minmax", "shrink", "neuqi", "neuqi_int")


def expand(P, g, n):
    """Each group's value over its columns, the last group cut at n (written here, not imported)."""
    cols = np.arange(n) // g
    return P[:, cols]


def dequant64(A, S, Z, g):
    n = A.shape[1]
    return A.astype(np.float64) * expand(S.astype(np.float64), g, n) + expand(Z.astype(np.float64), g, n)


def h_errors(W, A, S, Z, H, g):
    D = dequant64(A, S, Z, g) - W.astype(np.float64)
    return np.einsum("ri,ij,rj->r", D, H, D)


# ---------------------------------------------------------------- the C core and its twin


@pytest.mark.parametrize("n,g", [(200, 64), (100, 48), (37, 16), (33, 8)])
@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False)])
def test_start_params_c_equals_twin(n, g, bits, symmetric):
    W, H = synthetic_problem(3, n, seed=n + bits)  # few rows: the NeUQI twin is slow
    H00 = _C.damp(H, 0.01)
    G = -(-n // g)
    for init in INITS:
        S, Z = _C.start_params(W, H00, bits, g, symmetric, "half_up", init)
        assert S.shape == Z.shape == (3, G), init
        if init.startswith("neuqi"):
            # NeUQI's start is neuqi_params on diag H00 (in the twin too: start.py).
            hd = np.diag(H00).copy()
            Sc, Zc, obj_c = _C.neuqi_params(W, bits, g, symmetric, hd, init == "neuqi_int")
            S_r, Z_r, obj_r = R.neuqi_params(W, bits, g, symmetric, hd, init == "neuqi_int")
            np.testing.assert_array_equal(S, Sc, err_msg=init)
            np.testing.assert_array_equal(Z, Zc, err_msg=init)
            # The same optimum in every group, the short one included. Its argmin
            # can tie exactly (a zero one step away at 4 bits, any on-grid zero
            # of a one-column group), and the two may break a tie differently.
            np.testing.assert_allclose(obj_c, obj_r, rtol=1e-9, atol=1e-18, err_msg=init)
            assert np.mean((S == S_r) & (Z == Z_r)) >= 0.6, init
            continue
        S_r, Z_r = R.start_params(W, H00, bits, g, symmetric, "half_up", init)
        np.testing.assert_array_equal(S, S_r, err_msg=init)
        np.testing.assert_array_equal(Z, Z_r, err_msg=init)


def test_the_short_group_is_fitted_on_its_own_columns():
    # The last group's min-max range is that of its 8 columns, not of a padded or
    # wrapped slice: a huge value in group 0 must not reach it.
    W = np.zeros((1, 72), np.float32)
    W[0, :64] = np.linspace(-50, 50, 64)
    W[0, 64:] = np.linspace(-1, 1, 8)
    S, Z = _C.minmax_params(W, 2, 64, False)
    assert S.shape == (1, 2)
    np.testing.assert_allclose(S[0, 1], 2.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(S[0, 0], 100.0 / 3.0, rtol=1e-6)


@pytest.mark.parametrize("method", ["rtn", "gptq", "decoupleq"])
@pytest.mark.parametrize("m,n,g", [(6, 200, 64), (2, 576, 128)])  # few rows: the NeUQI twin is slow
def test_every_init_with_every_method_c_matches_twin(method, m, n, g):
    W, H = synthetic_problem(m, n, seed=7)
    for init in INITS:
        config = QuantConfig(method=method, bits=2, group_size=g, init=init, iterations=2)
        c = quantize_weight(W, H, config, impl="c")
        ref = quantize_weight(W, H, config, impl="reference")
        assert c.scale.shape == (m, -(-n // g)) and c.group_size == g
        if method == "rtn":
            np.testing.assert_array_equal(c.codes, ref.codes, err_msg=init)
            np.testing.assert_array_equal(c.scale, ref.scale, err_msg=init)
            np.testing.assert_array_equal(c.zero, ref.zero, err_msg=init)
        # As test_solver's parity test: float32 GEMMs in another order may flip a
        # near-tie; the loss is what both must agree on.
        assert np.mean(c.codes == ref.codes) >= 0.97, init
        assert c.loss.mean() <= ref.loss.mean() * (1 + 1e-3), init
        assert c.loss.mean() >= ref.loss.mean() * (1 - 5e-2), init
        # The reported loss is the H00 error of the returned weight, short group included.
        H00 = _C.damp(H, config.damping)
        np.testing.assert_allclose(c.loss, h_errors(W, c.codes, c.scale, c.zero, H00, g), rtol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_baseline_and_static_groups_match_twin(symmetric):
    W, H = synthetic_problem(10, 200, seed=11)
    H00 = _C.damp(H, 0.01)
    for act in (False, True):
        A, S, Z, err = _C.gptq(W, H00, 3, 64, symmetric, act, "half_up")
        A_r, S_r, Z_r, err_r = R.gptq(W, H00, 3, 64, symmetric, act, "half_up")
        assert S.shape == (10, 4)
        assert np.mean(A == A_r) >= 0.97
        np.testing.assert_allclose(err.mean(), err_r.mean(), rtol=2e-2)
        S0, Z0 = _C.minmax_params(W, 3, 64, symmetric)
        A2, e2 = _C.round_gptq(W, S0, Z0, H00, 3, 64, symmetric, act, "half_up")
        A2_r, e2_r = R.round_gptq(W, S0, Z0, H00, 3, 64, symmetric, act, "half_up")
        assert np.mean(A2 == A2_r) >= 0.97
        np.testing.assert_allclose(e2.mean(), e2_r.mean(), rtol=2e-2)


def test_pgd_matches_twin_with_a_short_group():
    W, H = synthetic_problem(6, 40, seed=5)
    H00 = _C.damp(H, 0.01)
    S, Z = _C.minmax_params(W, 2, 16, False)
    args = (W, S, Z, H00, 2, 16, False, True, "half_up", 4, 2, 1e-3)
    A, err = _C.round_pgd(*args)
    A_r, err_r = R.round_pgd(*args)
    assert np.mean(A == A_r) >= 0.97
    np.testing.assert_allclose(err.mean(), err_r.mean(), rtol=2e-2)


def lstsq_optimum(W, A, H, g):
    """Per row, the least-squares (s_j, z_j) of every group, by an explicit design matrix.

    Column j of B is a ⊙ 1[c in group j] (its scale), column G + j is 1[c in group j]
    (its zero); the error (Bθ - w) H (Bθ - w)ᵀ is ||Lᵀ(Bθ - w)||² with H = L Lᵀ.
    """
    m, n = W.shape
    G = -(-n // g)
    L = np.linalg.cholesky(H)
    S, Z = np.zeros((m, G)), np.zeros((m, G))
    for r in range(m):
        B = np.zeros((n, 2 * G))
        for j in range(G):
            cols = slice(j * g, min(j * g + g, n))
            B[cols, j] = A[r, cols]
            B[cols, G + j] = 1.0
        theta = np.linalg.lstsq(L.T @ B, L.T @ W[r].astype(np.float64), rcond=None)[0]
        S[r], Z[r] = theta[:G], theta[G:]
    return S, Z


@pytest.mark.parametrize("n,g", [(200, 64), (100, 48)])
def test_float_step_solves_the_short_group_exactly(n, g):
    W, H = synthetic_problem(8, n, seed=n)
    H00 = _C.damp(H, 0.01)
    S0, Z0 = _C.minmax_params(W, 3, g, False)
    A = _C.rtn_codes(W, S0, Z0, 3, False, "half_up", group_size=g)
    S, Z, err = _C.float_step(W, A, H00, g, False)
    S_r, Z_r, err_r = R.float_step(W, A, H00, g, False)
    S_o, Z_o = lstsq_optimum(W, A, H00, g)
    e_c = h_errors(W, A, S, Z, H00, g)
    e_o = h_errors(W, A, S_o, Z_o, H00, g)
    e_r = h_errors(W, A, S_r, Z_r, H00, g)
    wHw = np.einsum("ri,ij,rj->r", W.astype(np.float64), H00, W.astype(np.float64))
    # The optimum up to float32 storage of the parameters (relative to the row's energy).
    assert np.all(np.abs(e_c - e_o) <= 1e-5 * wHw + 1e-6 * e_o)
    assert np.all(np.abs(e_r - e_o) <= 1e-5 * wHw + 1e-6 * e_o)
    np.testing.assert_allclose(err, e_c, rtol=1e-4)
    # Worse than the min-max start it is not.
    assert np.all(e_c <= h_errors(W, A, S0, Z0, H00, g) * (1 + 1e-5))


def test_rtn_codes_and_row_errors_need_the_group_size_when_it_is_ambiguous():
    # 200 columns in 4 groups: g = 50 (even split) or 64 (short last group).
    W, H = synthetic_problem(4, 200, seed=1)
    S, Z = _C.minmax_params(W, 2, 64, False)
    A64 = _C.rtn_codes(W, S, Z, 2, False, "half_up", group_size=64)
    A50 = _C.rtn_codes(W, S, Z, 2, False, "half_up")  # no group_size: n / G, the even split
    np.testing.assert_array_equal(A64, R.rtn_codes(W, S, Z, 2, False, "half_up", group_size=64))
    np.testing.assert_array_equal(A50, R.rtn_codes(W, S, Z, 2, False, "half_up"))
    assert not np.array_equal(A64, A50)
    H00 = _C.damp(H, 0.01)
    np.testing.assert_allclose(_C.row_errors(W, A64, S, Z, H00, group_size=64), h_errors(W, A64, S, Z, H00, 64),
                               rtol=1e-4)
    with pytest.raises(ValueError, match=r"S must have shape \(4, 4\) \(rows, groups of group_size 64"):
        _C.rtn_codes(W, S[:, :3].copy(), Z[:, :3].copy(), 2, False, "half_up", group_size=64)
    with pytest.raises(ValueError, match="S must have shape"):
        R.rtn_codes(W, S[:, :3].copy(), Z[:, :3].copy(), 2, False, "half_up", group_size=64)
    with pytest.raises(TypeError, match="group_size must be an int or None"):
        _C.row_errors(W, A64, S, Z, H00, group_size=64.0)


def test_group_size_past_in_features_is_one_group():
    W, H = synthetic_problem(4, 32, seed=2)
    qw = quantize_weight(W, H, QuantConfig(method="gptq", bits=3, group_size=48))
    per_channel = quantize_weight(W, H, QuantConfig(method="gptq", bits=3, group_size=-1))
    assert qw.scale.shape == (4, 1) and qw.group_size == 32
    np.testing.assert_array_equal(qw.codes, per_channel.codes)
    np.testing.assert_array_equal(qw.scale, per_channel.scale)


# ---------------------------------------------------------------- packing and kernels


def random_layer(rng, out, n, bits, g, symmetric=False):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    G = -(-n // g)
    A = rng.integers(qmin, qmax + 1, size=(out, n)).astype(np.int8)
    S = (rng.random((out, G)) * 0.05 + 0.002).astype(np.float32)
    Z = None if symmetric else (rng.standard_normal((out, G)) * 0.05).astype(np.float32)
    S[:, -1] *= 30  # the short group's scale stands out: using a neighbour's would show
    return A, S, Z


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,g", [(200, 64), (576, 128), (100, 24), (37, 16)])
def test_packing_round_trip_and_dequantize(bits, n, g):
    rng = np.random.default_rng(bits * n)
    A, S, Z = random_layer(rng, 7, n, bits, g)
    pw = PackedWeight.from_codes(A, S, Z, bits, g, scale_dtype="float32")
    assert pw.n_groups == -(-n // g) and pw.scale.shape == (7, pw.n_groups)
    np.testing.assert_array_equal(pw.unpack(), A)
    expected = (A.astype(np.float32) * expand(S, g, n)) + expand(Z, g, n)
    for kernel in available_kernels():
        np.testing.assert_array_equal(pw.dequantize(kernel=kernel), expected)
    np.testing.assert_array_equal(ref_packing.dequantize_packed(pw.codes, S, Z, bits, n, g), expected)
    back = PackedWeight.from_arrays(pw.arrays(), pw.meta())
    np.testing.assert_array_equal(back.dequantize(), expected)


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_match_the_dequantized_matmul(kernel, bits):
    rng = np.random.default_rng(bits)
    for n, g in [(200, 64), (576, 128), (100, 24), (37, 16), (72, 64)]:
        for symmetric in (False, True):
            A, S, Z = random_layer(rng, 9, n, bits, g, symmetric)
            pw = PackedWeight.from_codes(A, S, Z, bits, g)
            w = pw.dequantize().astype(np.float64)
            s = expand(pw.scale.astype(np.float64), g, n)
            u = A.astype(np.float64) - (-(2 ** (bits - 1)))
            mag = np.abs(w) + np.abs(s) * (u + 2 ** bits)
            if not symmetric:
                mag += np.abs(expand(pw.zero.astype(np.float64), g, n))
            for batch in (1, 2, 5, 17):
                x = rng.standard_normal((batch, n)).astype(np.float32)
                y = _C.packed_matmul(x, pw.codes, pw.scale, pw.zero, bits, n, g, kernel=kernel)
                exact = x.astype(np.float64) @ w.T
                bound = (n + pw.n_groups + 8) * EPS32 * (np.abs(x.astype(np.float64)) @ mag.T)
                assert np.all(np.abs(y - exact) <= bound + 1e-30), (n, g, symmetric, batch)


# ---------------------------------------------------------------- QuantLinear and SFT


def short_linear(seed=0, n=200, out=24, g=64, bits=3):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n, out)
    W, H = synthetic_problem(out, n, seed=seed)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
    qw = quantize_weight(W, H, QuantConfig(method="gptq", bits=bits, group_size=g))
    return layer, qw, QuantLinear.from_quantized(layer, qw)


def test_quant_linear_forward_and_to_float():
    layer, qw, q = short_linear()
    assert q.group_size == 64 and q.n_groups == 4
    w = torch.from_numpy(qw.dequantize())
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=0)
    torch.testing.assert_close(q.to_float().weight, w, rtol=0, atol=0)
    for batch in (1, 3, 40):
        x = torch.randn(batch, 200)
        with torch.no_grad():
            y = q(x)
        torch.testing.assert_close(y, x @ w.t() + layer.bias, rtol=1e-4, atol=1e-4)


def test_quant_linear_backward_through_the_short_group():
    _, _, small = short_linear(seed=2, n=40, out=6, g=16)  # 16 + 16 + 8
    s, z = small.scale.detach().double().requires_grad_(), small.zero.detach().double().requires_grad_()
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s, z: quant_linear(x, small.codes, s, z, None, 16, tile_rows=4),
                                    (x, s, z))
    _, qw, q = short_linear(seed=1)
    x64 = torch.randn(5, 200, dtype=torch.float64)
    codes = q.codes
    scale = q.scale.detach().double().requires_grad_()
    zero = q.zero.detach().double().requires_grad_()
    bias = q.bias.detach().double()
    # Against autograd through an explicitly expanded weight.
    gy = torch.randn(5, 24, dtype=torch.float64)
    y = quant_linear(x64, codes, scale, zero, bias, 64, tile_rows=5)
    gs, gz = torch.autograd.grad(y, (scale, zero), gy)
    cols = torch.arange(200) // 64
    s2 = scale.detach().clone().requires_grad_()
    z2 = zero.detach().clone().requires_grad_()
    y2 = x64 @ (codes.double() * s2[:, cols] + z2[:, cols]).t() + bias
    gs2, gz2 = torch.autograd.grad(y2, (s2, z2), gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gs, gs2)
    torch.testing.assert_close(gz, gz2)
    # The layer's own training path takes the same route.
    q.scale.requires_grad_(True)
    x = torch.randn(3, 200)
    q(x).sum().backward()
    assert q.scale.grad is not None and q.scale.grad[:, 3].abs().sum() > 0


# ---------------------------------------------------------------- a model: hidden 96, g = 64


def llama96(seed=0):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq", "decoupleq"])
def test_tiny_model_hidden_96_group_64(method, tmp_path):
    calib = token_batches(n=4, seq=16)
    cfg = QuantConfig(method=method, bits=2, group_size=64, iterations=2)
    model = llama96()
    decoupleq.quantize(model, calib, cfg, blockwise=False, verbose=False)
    layers = _quant_layers(model)
    assert len(layers) == 14
    for name, q in layers.items():
        assert q.group_size == 64, name
        assert q.n_groups == (3 if name.endswith("down_proj") else 2), name  # 160 = 64+64+32, 96 = 64+32
    assert model.decoupleq_config["indivisible"] == "short"
    # The old fallback, asked for explicitly: per channel, and a larger layer error.
    fallback = llama96()
    decoupleq.quantize(fallback, calib, cfg, blockwise=False, verbose=False, indivisible="per_channel")
    assert all(q.group_size == -1 for q in _quant_layers(fallback).values())
    if method == "rtn":  # no calibration pass without block tuning: the weights' own error
        fp = dict(llama96().named_modules())
        short_loss = sum(float((q.dequantize() - fp[n].weight).pow(2).sum().detach()) for n, q in layers.items())
        channel_loss = sum(float((q.dequantize() - fp[n].weight).pow(2).sum().detach())
                           for n, q in _quant_layers(fallback).items())
    else:
        short_loss = sum(r.loss for r in model.decoupleq_report.layers)
        channel_loss = sum(r.loss for r in fallback.decoupleq_report.layers)
    assert short_loss < channel_loss
    # Save / load round trip keeps the group size and the outputs.
    ids = token_batches(n=2, seq=12, seed=3)
    with torch.no_grad():
        before = model(ids).logits
    path = tmp_path / "m"
    decoupleq.save(model, path)
    loaded = decoupleq.load(path)
    for name, q in _quant_layers(loaded).items():
        assert q.group_size == 64 and q.n_groups == layers[name].n_groups
        torch.testing.assert_close(q.dequantize(), layers[name].dequantize(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before)


def test_uniquanf_refuses_a_short_group_naming_the_option():
    model = llama96()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="method 'uniquanf'.*indivisible='per_channel'"):
        decoupleq.quantize(model, token_batches(n=2, seq=8), QuantConfig(method="uniquanf", bits=2, group_size=64),
                           verbose=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
