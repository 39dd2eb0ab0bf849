"""The training path of a packed QuantLinear (2-4 bits): W made by the C core from the packed codes.

It must give bit for bit the output and gradients of the int8-codes path
(``quant_linear`` on ``layer.codes``, W made by torch ops), and both must
agree with autograd through a float64 dequantized weight.
"""

import pytest
import torch
import torch.nn.functional as F

from decoupleq.nn import QuantLinear
from decoupleq.sft import QuantLinearFunction, quant_linear

from _pipeline_models import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes gain nothing from threads on a shared 2-core machine.
    with one_thread():
        yield


def packed_layer(in_f, out_f, bits, group_size, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(in_f, out_f, bits=bits, group_size=group_size, symmetric=symmetric, bias=True)
    lo = -(2 ** (bits - 1))
    with torch.no_grad():
        q.set_codes(torch.randint(lo, -lo, (out_f, in_f), generator=g).to(torch.int8))
        q.scale.copy_(torch.rand(q.scale.shape, generator=g) * 0.5 + 0.01)
        if not symmetric:
            q.zero.copy_(torch.randn(q.zero.shape, generator=g))
        q.bias.copy_(torch.randn(out_f, generator=g))
    assert q.is_packed
    q.scale.requires_grad_(True)
    q.zero.requires_grad_(not symmetric)
    return q


def leaves(q, x):
    return [x, q.scale] + ([] if q.symmetric else [q.zero]) + [q.bias]


def float64_reference(q, x):
    """y = x W^T + b through autograd, W dequantized in float64 from the int8 codes."""
    codes = q.codes.to(torch.float64)
    n = q.in_features
    g = n if q.scale.shape[1] == 1 else q.group_size
    s = q.scale.double().repeat_interleave(g, dim=1)[:, :n]
    w = codes * s
    if not q.symmetric:
        w = w + q.zero.double().repeat_interleave(g, dim=1)[:, :n]
    return F.linear(x.double(), w, q.bias.double())


@pytest.mark.parametrize(
    "in_f,out_f,bits,group_size,symmetric",
    [
        (64, 24, 2, 16, False),
        (100, 37, 3, 32, False),  # a short last group (100 = 3 * 32 + 4)
        (96, 40, 4, -1, True),  # per-channel, symmetric
        (72, 9, 2, 8, True),
    ],
)
def test_packed_path_equals_int8_path_bit_for_bit(in_f, out_f, bits, group_size, symmetric):
    q = packed_layer(in_f, out_f, bits, group_size, symmetric)
    x = torch.randn(3, 5, in_f, requires_grad=True)
    y = q(x)
    assert y.grad_fn is not None
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves(q, x), gy)

    zero = None if symmetric else q.zero
    y2 = quant_linear(x, q.codes, q.scale, zero, q.bias, group_size)
    want = torch.autograd.grad(y2, leaves(q, x), gy)
    assert torch.equal(y, y2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    ref = float64_reference(q, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # Gradients of float32 leaves come back in float32, summed in float64.
    want64 = torch.autograd.grad(ref, leaves(q, x), gy.double())
    names = ["x", "scale"] + ([] if symmetric else ["zero"]) + ["bias"]
    for name, a, b in zip(names, got, want64):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("tile_rows", [1, 4, 7])
def test_packed_path_over_several_tiles(tile_rows):
    q = packed_layer(48, 13, 2, 16, False, seed=2)
    x = torch.randn(6, 48, requires_grad=True)
    y = QuantLinearFunction.apply(x, q.packed, q.scale, q.zero, q.bias, tile_rows, 16, 2)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves(q, x), gy)
    y2 = quant_linear(x, q.codes, q.scale, q.zero, q.bias, 16, tile_rows=tile_rows)
    want = torch.autograd.grad(y2, leaves(q, x), gy)
    assert torch.equal(y, y2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_packed_path_in_float64_and_under_bf16_autocast():
    q = packed_layer(32, 8, 2, 8, False, seed=3)
    # float64 input: the arithmetic runs in float64 (from unpacked codes), as for int8 codes.
    x64 = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    y = q(x64)
    assert y.dtype == torch.float64
    ref = float64_reference(q, x64)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # bf16 autocast: output in bf16, the same as the int8 path.
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = q(x)
        yb2 = quant_linear(x, q.codes, q.scale, q.zero, q.bias, 8)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, yb2)


def test_packed_path_saves_no_codes_or_weight_copy():
    q = packed_layer(40, 24, 2, 8, False)
    x = torch.randn(3, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert y.grad_fn is not None
    # Only x, the layer's own packed buffer, scale and zero: nothing of the weight's size.
    assert not [t for t in saved if tuple(t.shape) == (24, 40)]
    assert any(t.data_ptr() == q.packed.data_ptr() for t in saved)


def test_packed_path_rejects_bad_input_naming_x():
    q = packed_layer(16, 4, 2, 8, False)
    with pytest.raises(ValueError, match="x has shape"):
        q(torch.randn(2, 15, requires_grad=True))
