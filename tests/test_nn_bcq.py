"""BCQLinear: storage, the kernel and torch forward paths against float64, the
autograd path's gradients, SFT through prepare_for_sft, and a uniform
QuantLinear served as BCQ."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoupleq.bcq import BCQWeight, bcq_from_uniform, row_words
from decoupleq.nn import SMALL_BATCH_MAX, QuantLinear
from decoupleq.nn_bcq import BCQLinear
from decoupleq.sft import prepare_for_sft, sft_parameter_count

from _pipeline_models import one_thread

EPS = np.finfo(np.float32).eps


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def make_bcq(m, n, bits, gs, seed=0):
    rng = np.random.default_rng(seed)
    G = 1 if gs == -1 else n // gs
    idx = rng.integers(0, 1 << bits, size=(m, n)).astype(np.uint8)
    alpha = (rng.random((m, G, bits)) * 0.05 + 0.001).astype(np.float32)
    offset = (rng.standard_normal((m, G)) * 0.05).astype(np.float32)
    if m >= 3:
        alpha[0] = 0.0
        idx[1] = 0
        alpha[2, 0, 0] = 30.0
    return BCQWeight(idx, alpha, offset, bits, gs)


def make_layer(m, n, bits, gs, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    return BCQLinear.from_bcq(lin, make_bcq(m, n, bits, gs, seed), method="test"), lin


def assert_close(y, x, w_np, bias=None, extra=None):
    """y == x @ w.T (+ bias) up to float32 rounding of n-term sums (any order)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double().numpy()
    w = w_np.astype(np.float64)
    exact = x2 @ w.T
    bound = (np.abs(x2) @ np.abs(w).T) * (x2.shape[1] + 8) * EPS
    if bias is not None:
        b = bias.detach().double().numpy()
        exact, bound = exact + b, bound + 2 * EPS * np.abs(exact + b)
    if extra is not None:
        bound = bound + extra
    err = np.abs(y.detach().reshape(exact.shape).double().numpy() - exact)
    assert np.all(err <= bound + 1e-30), float(np.max(err - bound))


@pytest.mark.parametrize("bits, n, gs", [(2, 64, 16), (3, 33, -1), (4, 96, 32), (1, 40, 8), (2, 127, -1)])
def test_storage_and_dequantize_are_bit_exact(bits, n, gs):
    layer, _ = make_layer(7, n, bits, gs)
    w = make_bcq(7, n, bits, gs)
    assert layer.planes.dtype == torch.uint32 and tuple(layer.planes.shape) == (7, row_words(bits, n))
    assert layer.alpha.dtype == torch.float32 and isinstance(layer.alpha, nn.Parameter)
    np.testing.assert_array_equal(layer.indices.numpy(), w.indices)
    np.testing.assert_array_equal(layer.dequantize().detach().numpy(), w.dequantize())
    back = layer.to_bcq()
    np.testing.assert_array_equal(back.dequantize(), w.dequantize())


@pytest.mark.parametrize("bits, n, gs", [(2, 64, 16), (3, 33, -1), (4, 96, 32), (2, 256, 64)])
def test_kernel_forward_matches_float64_at_every_batch_path(bits, n, gs):
    layer, _ = make_layer(11, n, bits, gs)
    w = make_bcq(11, n, bits, gs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(1, n), (5, n), (SMALL_BATCH_MAX, n), (SMALL_BATCH_MAX + 1, n), (2, 20, n)]:
            x = torch.randn(*shape, generator=g)
            y = layer(x)
            assert y.shape == (*shape[:-1], 11) and y.dtype == torch.float32
            assert_close(y, x, w.dequantize(), layer.bias)
        xb = torch.randn(3, n, generator=g).to(torch.bfloat16)
        yb = layer(xb)
        assert yb.dtype == torch.bfloat16
        ref = F.linear(xb.float(), layer.dequantize(), layer.bias)
        torch.testing.assert_close(yb.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_autograd_path_gradients_of_alpha_and_offset():
    m, n, bits, gs = 5, 32, 3, 8
    layer, _ = make_layer(m, n, bits, gs)
    w = make_bcq(m, n, bits, gs)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, n, generator=g)
    gy = torch.randn(6, m, generator=g)
    y = layer(x)  # parameters require grad: the torch path
    assert y.requires_grad
    assert_close(y, x, w.dequantize(), layer.bias)
    (y * gy).sum().backward()
    # By hand, in float64: gW = gy^T x; d/d alpha_i = sum_group gW * beta_i; d/d offset = sum_group gW.
    gW = (gy.double().T @ x.double()).numpy().reshape(m, n // gs, gs)
    idx = w.indices.astype(np.int64).reshape(m, n // gs, gs)
    for i in range(bits):
        beta = 1.0 - 2.0 * ((idx >> (bits - 1 - i)) & 1)
        np.testing.assert_allclose(layer.alpha.grad[:, :, i].numpy(), (gW * beta).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.offset.grad.numpy(), gW.sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bias.grad.numpy(), gy.sum(0).numpy(), rtol=1e-6, atol=1e-6)


def test_prepare_for_sft_trains_alpha_and_offset_and_the_kernel_uses_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 16))
    model[0] = BCQLinear.from_bcq(model[0], make_bcq(48, 32, 2, 16, seed=3))
    model[2] = BCQLinear.from_bcq(model[2], make_bcq(16, 48, 3, -1, seed=4))
    params = prepare_for_sft(model)
    want = [model[0].alpha, model[0].offset, model[1].weight, model[1].bias, model[2].alpha, model[2].offset]
    assert [id(p) for p in params] == [id(p) for p in want]
    assert not model[0].bias.requires_grad
    assert sft_parameter_count(model)["codes"] == 48 * 32 + 16 * 48
    x = torch.randn(4, 32)
    target = torch.randn(4, 16)
    opt = torch.optim.Adam(params, lr=1e-2)
    before = model[0].alpha.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    assert not torch.equal(model[0].alpha.detach(), before)
    with torch.no_grad():  # the kernel path reads the updated float parts
        h = model[0](x)
        assert_close(h, x, model[0].dequantize().numpy(), model[0].bias)
    with pytest.raises(ValueError, match="BCQLinear"):
        prepare_for_sft(nn.Sequential(nn.Linear(2, 2)))


def test_uniform_quant_linear_served_as_bcq_gives_the_same_outputs():
    torch.manual_seed(5)
    for bits, n, gs in [(2, 4096 // 16, 64), (3, 96, -1), (4, 128, 32)]:
        m = 24
        lin = nn.Linear(n, m)
        q = QuantLinear(n, m, bits=bits, group_size=gs)
        qmin = -(1 << (bits - 1))
        codes = torch.randint(qmin, -qmin, (m, n)).to(torch.int8)
        scale = torch.rand(m, q.n_groups) * 0.05 + 0.01
        zero = torch.randn(m, q.n_groups) * 0.05
        q._set_from(codes, scale, zero)
        with torch.no_grad():
            q.bias.copy_(lin.bias)
        w = bcq_from_uniform(codes.numpy(), scale.numpy(), zero.numpy(), bits, gs)
        b = BCQLinear.from_bcq(lin, w, method="rtn")
        wq = q.dequantize().detach().numpy()
        # the BCQ levels are the uniform ones up to 4 ulps of |z| + 2^b s (see bcq_from_uniform)
        g = q.group_size if gs != -1 else n
        lev_err = 4 * EPS * (np.abs(np.repeat(zero.numpy(), g, 1)) + (1 << bits) * np.repeat(scale.numpy(), g, 1))
        assert np.all(np.abs(b.dequantize().detach().numpy() - wq) <= lev_err)
        with torch.no_grad():
            for batch in (1, 7, 16, 33):
                x = torch.randn(batch, n)
                y_b, y_q = b(x), q(x)
                extra = np.abs(x.double().numpy()) @ lev_err.T.astype(np.float64)
                assert_close(y_b, x, wq, q.bias, extra=extra)
                assert_close(y_q, x, wq, q.bias)


def test_to_float_dtype_moves_and_quant_info():
    layer, lin = make_layer(6, 24, 2, 8)
    x = torch.randn(3, 24)
    f = layer.to_float()
    assert type(f) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(f(x), F.linear(x, layer.dequantize(), layer.bias))
    layer.to(torch.bfloat16)
    assert layer.alpha.dtype == torch.float32 and layer.offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    info = layer.quant_info()
    assert info["type"] == "bcq_linear" and info["codes"] == "decoupleq-bcq-lanes8-v1"
    assert (info["bits"], info["group_size"], info["in_features"], info["out_features"]) == (2, 8, 24, 6)
    # 24 columns = 3 steps: one block of 8 words per row, 3 groups of 2 alphas + 1 offset.
    assert layer.stored_bits_per_weight() == (32 * 8 + 32 * 3 * 3) / 24


def test_from_bcq_rejects_mismatches():
    lin = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"needs \(4, 16\)"):
        BCQLinear.from_bcq(lin, make_bcq(4, 8, 2, -1))
    with pytest.raises(TypeError, match="layer must be nn.Linear"):
        BCQLinear.from_bcq(nn.Conv2d(1, 1, 1), make_bcq(4, 16, 2, -1))
    with pytest.raises(TypeError, match="weight must be a BCQWeight"):
        BCQLinear.from_bcq(lin, np.zeros((4, 16)))
    with pytest.raises(ValueError, match="group_size 5 does not divide in_features 16"):
        BCQLinear(16, 4, bits=2, group_size=5)


def test_hf_conv1d_origin_and_top_level_names():
    import decoupleq
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    conv = Conv1D(12, 20)  # weight (in=20, out=12)
    w = make_bcq(12, 20, 2, -1, seed=7)
    layer = decoupleq.BCQLinear.from_bcq(conv, w)
    assert layer.origin == "conv1d" and (layer.in_features, layer.out_features) == (20, 12)
    x = torch.randn(4, 20)
    with torch.no_grad():
        assert_close(layer(x), x, w.dequantize(), layer.bias)
        back = layer.to_float()
        assert type(back) is Conv1D
        torch.testing.assert_close(back(x), F.linear(x, layer.dequantize(), layer.bias))
    assert decoupleq.BCQWeight is BCQWeight and decoupleq.bcq_from_uniform is bcq_from_uniform


def test_bcq_function_gradcheck_tiles_and_no_saved_weight():
    from decoupleq.nn_bcq import BCQLinearFunction

    torch.manual_seed(4)
    m, n, bits, gs = 7, 12, 2, 4
    w = make_bcq(m, n, bits, gs, seed=9)
    idx = torch.from_numpy(w.indices)
    alpha = torch.from_numpy(w.alpha).double().requires_grad_()
    offset = torch.from_numpy(w.offset).double().requires_grad_()
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    for tile in (None, 1, 3):
        assert torch.autograd.gradcheck(lambda *a: BCQLinearFunction.apply(a[0], idx, a[1], a[2], a[3], tile),
                                        (x, alpha, offset, bias))
    # the graph of a float32 layer keeps x and the small parameters, never an (out, in) float weight
    layer, _ = make_layer(64, 96, 3, 32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    xf = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(xf)
    assert y.requires_grad
    assert ((64, 96), torch.float32) not in saved and ((96, 64), torch.float32) not in saved
    y.sum().backward()
    assert xf.grad is not None and layer.alpha.grad is not None
