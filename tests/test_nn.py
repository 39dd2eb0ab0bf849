"""QuantLinear / QuantConv2d compute exactly with the fake-quantized weight the solver returns."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decoupleq
from decoupleq.config import QuantConfig
from decoupleq.nn import QuantConv2d, QuantLinear

from _pipeline_models import one_thread, transformers
from test_kernels import exact_and_bound
from decoupleq.packing import PackedWeight


def assert_fp32_close(y, x, q, bias=None):
    """y equals x @ W_hat.T (+ bias) up to float32 rounding of the sums (the
    packed kernel orders them differently from F.linear)."""
    pw = PackedWeight.from_codes(q.codes.numpy(), q.scale.detach().numpy(), q.zero.detach().numpy(),
                                 q.bits, q.group_size, scale_dtype="float32")
    x2 = x.detach().reshape(-1, x.shape[-1]).float().numpy()
    exact, bound, gamma = exact_and_bound(x2, pw)
    if bias is not None:
        exact = exact + bias.detach().double().numpy()
        bound = bound + np.abs(bias.detach().double().numpy())
    err = np.abs(y.detach().reshape(exact.shape).double().numpy() - exact)
    assert np.all(err <= gamma * bound + 1e-30), float(np.max(err / (gamma * bound + 1e-30)))


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _solve(W: torch.Tensor, X: torch.Tensor, cfg: QuantConfig):
    acc = decoupleq.HessianAccumulator(W.shape[1])
    acc.add(X)
    return decoupleq.quantize_weight(W, acc.hessian(), cfg)


def _nasty_weight(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.1
    if m >= 4:
        W[0] = 0.0  # all-zero row
        W[1] = 0.37  # constant row
        W[2, n // 2] = 25.0  # one huge outlier
    return W


@pytest.mark.parametrize(
    "m,n,group_size,symmetric,bits",
    [(7, 33, -1, False, 2), (31, 64, 16, False, 2), (1, 127, -1, True, 3), (33, 64, 32, False, 4), (4, 7, 7, False, 2)],
)
def test_quant_linear_forward_equals_fake_quant_linear(m, n, group_size, symmetric, bits):
    W = _nasty_weight(m, n, seed=m * 1000 + n)
    X = torch.randn(5, 3, n, generator=torch.Generator().manual_seed(7))
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(W)
    cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, iterations=2)
    qw = _solve(W, X, cfg)
    q = QuantLinear.from_quantized(layer, qw)

    w_fq = torch.from_numpy(qw.dequantize())
    assert torch.equal(q.dequantize().detach(), w_fq)
    assert torch.equal(q.codes, torch.from_numpy(qw.codes))
    with torch.no_grad():
        if bits <= 4:  # the packed kernel: the same product up to float32 rounding
            assert_fp32_close(q(X), X, q, layer.bias)
        else:
            assert torch.equal(q(X), F.linear(X, w_fq, layer.bias))
    assert q.scale.shape == (m, 1 if group_size == -1 else n // group_size)


def test_conv1d_origin_is_stored_transposed_and_matches():
    conv = transformers.pytorch_utils.Conv1D(12, 32)  # nf=12 outputs, nx=32 inputs; weight (32, 12)
    torch.manual_seed(3)
    X = torch.randn(2, 9, 32)
    qw = _solve(conv.weight.detach().t().contiguous(), X, QuantConfig(group_size=16))
    q = QuantLinear.from_quantized(conv, qw)
    assert q.origin == "conv1d" and q.codes.shape == (12, 32) and q.scale.shape == (12, 2)
    w_fq = torch.from_numpy(qw.dequantize())
    with torch.no_grad():
        assert_fp32_close(q(X), X, q, conv.bias)
        back = q.to_float()
        assert isinstance(back, transformers.pytorch_utils.Conv1D)
        assert torch.equal(back.weight, w_fq.t())


@pytest.mark.parametrize("padding,padding_mode,stride", [(1, "zeros", 1), (1, "reflect", 2), ("same", "zeros", 1)])
def test_quant_conv2d_forward_equals_fake_quant_conv(padding, padding_mode, stride):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, padding_mode=padding_mode)
    x = torch.randn(2, 3, 9, 9)
    W = conv.weight.detach().reshape(5, 27)
    qw = _solve(W, torch.randn(64, 27), QuantConfig(group_size=9))
    q = QuantConv2d.from_quantized(conv, qw)
    w4 = torch.from_numpy(qw.dequantize()).reshape(5, 3, 3, 3)
    ref = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, padding_mode=padding_mode)
    with torch.no_grad():
        ref.weight.copy_(w4)
        ref.bias.copy_(conv.bias)
        assert torch.equal(q(x), ref(x))
        assert torch.equal(q.to_float()(x), ref(x))


def test_scale_and_zero_get_gradients_codes_do_not():
    layer = nn.Linear(16, 4)
    qw = _solve(layer.weight.detach(), torch.randn(40, 16), QuantConfig(group_size=8))
    q = QuantLinear.from_quantized(layer, qw)
    x = torch.randn(3, 16)
    q(x).square().sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    assert q.zero.grad is not None and q.zero.grad.abs().sum() > 0
    assert not q.codes.requires_grad and q.codes.dtype == torch.int8
    # 4 bits (the default): the codes live packed in a uint32 buffer, never a parameter.
    assert dict(q.named_buffers())["packed"].dtype == torch.uint32
    assert not any("codes" in k or "packed" in k for k in dict(q.named_parameters()))


def test_half_precision_input_gives_half_output():
    layer = nn.Linear(16, 4).to(torch.bfloat16)
    qw = _solve(layer.weight.detach().float(), torch.randn(40, 16), QuantConfig(group_size=8))
    q = QuantLinear.from_quantized(layer, qw)
    assert q.bias.dtype == torch.bfloat16 and q.scale.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.bfloat16
    # Computed in float32 from the float32 weight, then rounded once to bfloat16.
    exact = x.double() @ torch.from_numpy(qw.dequantize()).double().t() + layer.bias.double()
    err = (y.double() - exact).abs()
    bound = 2.0 ** -8 * exact.abs() + 1e-5 * (x.double().abs() @ torch.from_numpy(qw.dequantize()).double().abs().t() + 1)
    assert torch.all(err <= bound), float((err / bound).max())


def test_from_quantized_rejects_mismatches():
    layer = nn.Linear(16, 4)
    qw = _solve(torch.randn(4, 16), torch.randn(40, 16), QuantConfig(group_size=8))
    with pytest.raises(ValueError, match=r"qw.codes has shape \(4, 16\).*\(5, 16\)"):
        QuantLinear.from_quantized(nn.Linear(16, 5), qw)
    with pytest.raises(TypeError, match="layer must be"):
        QuantLinear.from_quantized(nn.Conv2d(1, 4, 4), qw)
    with pytest.raises(ValueError, match="grouped"):
        QuantConv2d.from_quantized(nn.Conv2d(4, 4, 2, groups=2), qw)
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or a positive int, got 0"):
        QuantLinear(16, 4, bits=2, group_size=0)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(16, 4, bits=1, group_size=8)
    assert isinstance(QuantLinear.from_quantized(layer, qw), QuantLinear)


def test_dequantize_matches_numpy_formula_on_extreme_values():
    q = QuantLinear(6, 2, bits=2, group_size=3, bias=False)
    codes = np.array([[-2, -1, 0, 1, -2, 1], [1, 1, 1, -2, 0, -1]], dtype=np.int8)
    scale = np.array([[1e-30, 3.3e4], [0.1, -2.5]], dtype=np.float32)
    zero = np.array([[7.0, -1e-3], [np.float32(1 / 3), 1e20]], dtype=np.float32)
    q._set_from(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zero))
    expected = (codes.reshape(2, 2, 3).astype(np.float32) * scale[:, :, None] + zero[:, :, None]).reshape(2, 6)
    assert np.array_equal(q.dequantize().detach().numpy(), expected)
