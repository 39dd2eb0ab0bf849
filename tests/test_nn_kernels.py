"""QuantLinear's two forward paths: the packed kernel (no autograd, CPU, 2-4
bits) and the torch/autograd path, both against F.linear on the dequantized
float32 weight; the packed buffer as the layer's storage; SFT-tuned float
parts used by the kernel."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decoupleq import _C
from decoupleq.nn import SMALL_BATCH_MAX, QuantLinear
from decoupleq.packing import row_words

from _pipeline_models import one_thread
from test_nn import assert_fp32_close


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def make_layer(out_f, in_f, bits, group_size, bias=True, seed=0, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(in_f, out_f, bits=bits, group_size=group_size, bias=bias, symmetric=symmetric)
    qmin = -(2 ** (bits - 1))
    codes = torch.randint(qmin, -qmin, (out_f, in_f), generator=g).to(torch.int8)
    if out_f >= 3:
        codes[0] = qmin  # every stored u = 0
        codes[1] = 0     # a constant row
    G = q.n_groups
    scale = torch.rand(out_f, G, generator=g) * 0.05 + 0.01
    if out_f >= 3:
        scale[2, 0] = 30.0  # one huge scale
    zero = torch.zeros(out_f, G) if symmetric else torch.randn(out_f, G, generator=g) * 0.05
    q._set_from(codes, scale, zero)
    if bias:
        with torch.no_grad():
            q.bias.copy_(torch.randn(out_f, generator=g))
    return q


def kernel_result(q, x):
    """What the packed path gives for x (float32), straight from the C boundary: the
    packed kernel up to SMALL_BATCH_MAX rows, else the C core's dequantized weight times torch's GEMM."""
    x2 = x.detach().reshape(-1, q.in_features).float().contiguous().numpy()
    parts = (q.packed.numpy(), q.scale.detach().numpy(), q.zero.detach().numpy(), q.bits, q.in_features,
             q.group_size)
    if x2.shape[0] > SMALL_BATCH_MAX:
        w = _C.dequantize_packed(*parts, threads=torch.get_num_threads())
        y = torch.from_numpy(x2) @ torch.from_numpy(w).t()
    else:
        y = torch.from_numpy(_C.packed_matmul(x2, *parts, threads=torch.get_num_threads()))
    if q.bias is not None:
        y += q.bias.detach().float()
    return y.reshape(*x.shape[:-1], q.out_features)


CASES = [(bits, gs) for bits in (2, 3, 4) for gs in (-1, 32)]


@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (7,), (33,), (128,), (3, 5)])
def test_kernel_and_autograd_paths_agree_with_f_linear(bits, group_size, bias, lead):
    in_f, out_f = 96, 37
    q = make_layer(out_f, in_f, bits, group_size, bias=bias, seed=bits * 10 + len(lead))
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(sum(lead)))
    with torch.no_grad():
        y_kernel = q(x)
    assert y_kernel.shape == (*lead, out_f) and y_kernel.dtype == torch.float32
    # It is the kernel's result, bit for bit, and right up to float32 rounding.
    assert torch.equal(y_kernel, kernel_result(q, x))
    assert_fp32_close(y_kernel, x, q, q.bias)

    xg = x.clone().requires_grad_(True)
    y_grad = q(xg)  # autograd: decoupleq.sft's path
    assert y_grad.requires_grad
    assert_fp32_close(y_grad, x, q, q.bias)
    y_grad.sum().backward()
    assert xg.grad is not None and q.scale.grad is not None


def test_no_grad_parameters_use_the_kernel_even_in_grad_mode():
    q = make_layer(20, 64, 2, 16)
    for p in q.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 64)
    y = q(x)  # grad mode on, but nothing needs a gradient
    assert not y.requires_grad and torch.equal(y, kernel_result(q, x))


def test_inference_mode_noncontiguous_and_half_inputs():
    q = make_layer(24, 64, 3, 32, seed=4)
    base = torch.randn(64, 6)
    x = base.t()  # (6, 64), not contiguous
    with torch.inference_mode():
        y = q(x)
    assert torch.equal(y, kernel_result(q, x.contiguous()))
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        with torch.no_grad():
            yh = q(xh)
        # converted to float32, computed, cast back once
        assert yh.dtype == dtype and torch.equal(yh, kernel_result(q, xh.float()).to(dtype))


def test_thread_count_does_not_change_the_result():
    q = make_layer(301, 576, 2, 64, seed=5)
    x = torch.randn(3, 576)
    with torch.no_grad():
        y1 = q(x)
        old = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            y2 = q(x)
        finally:
            torch.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_sft_steps_are_seen_by_the_kernel_path():
    torch.manual_seed(0)
    q = make_layer(33, 64, 2, 16, seed=6)
    x = torch.randn(16, 64)
    target = torch.randn(16, 33)
    with torch.no_grad():
        before = q(x).clone()
    opt = torch.optim.Adam([q.scale, q.zero], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(q(x), target).backward()  # autograd path
        opt.step()
    with torch.no_grad():
        after = q(x)  # packed kernel, reading the updated scale and zero
    assert not torch.allclose(after, before)
    assert torch.equal(after, kernel_result(q, x))
    trained = q(x)  # autograd forward with the same float parts
    assert trained.requires_grad
    assert_fp32_close(after, x, q, q.bias)
    assert_fp32_close(trained, x, q, q.bias)


def test_packed_buffer_is_the_storage_and_codes_are_read_only():
    out_f, in_f = 40, 96
    q = make_layer(out_f, in_f, 2, 32, seed=7)
    buffers = dict(q.named_buffers())
    assert list(buffers) == ["packed"]
    assert buffers["packed"].dtype == torch.uint32 and buffers["packed"].shape == (out_f, row_words(2, in_f))
    assert buffers["packed"].nbytes == out_f * 8 * 4  # 96 columns at 2 bits: one 32-byte lane-word a row
    assert "packed" in q.state_dict() and not any(k.endswith("codes") for k in q.state_dict())
    codes = q.codes
    assert codes.dtype == torch.int8 and codes.shape == (out_f, in_f)
    codes.fill_(1)  # a fresh tensor: the layer is unchanged
    assert not torch.equal(q.codes, codes)
    with pytest.raises(AttributeError):
        q.codes = codes
    new = torch.full((out_f, in_f), -1, dtype=torch.int8)
    q.set_codes(new)
    assert torch.equal(q.codes, new)
    with pytest.raises(ValueError, match=r"codes\[0, 0\] = 5 is outside \[-2, 1\]"):
        q.set_codes(torch.full((out_f, in_f), 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="expected"):
        q.set_codes(new[:, :10])
    with pytest.raises(TypeError, match="int8"):
        q.set_codes(new.float())


def test_high_bits_keep_int8_codes_and_the_torch_path():
    q = make_layer(12, 40, 6, 8, seed=8)
    assert list(dict(q.named_buffers())) == ["codes"] and q.codes.dtype == torch.int8
    x = torch.randn(5, 40)
    with torch.no_grad():
        # torch path: exactly F.linear with the dequantized weight
        assert torch.equal(q(x), F.linear(x, q.dequantize(), q.bias))
    q.set_codes(torch.full((12, 40), 31, dtype=torch.int8))
    assert int(q.codes.min()) == 31


def test_symmetric_layer_and_state_dict_round_trip():
    q = make_layer(18, 64, 4, -1, seed=9, symmetric=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = q(x)
    assert_fp32_close(y, x, q, q.bias)
    twin = QuantLinear(64, 18, bits=4, group_size=-1, symmetric=True)
    twin.load_state_dict(q.state_dict())
    assert torch.equal(twin.codes, q.codes)
    with torch.no_grad():
        assert torch.equal(twin(x), y)


def test_copies_do_not_share_or_carry_the_kernel_views():
    import copy
    import io

    q = make_layer(16, 64, 2, 16, seed=10)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = q(x)  # builds the cached views
    twin = copy.deepcopy(q)
    assert "_views" not in twin.__dict__
    with torch.no_grad():
        twin.scale.mul_(2.0)  # only the copy changes
        assert torch.equal(q(x), y)
        assert torch.equal(twin(x), kernel_result(twin, x)) and not torch.equal(twin(x), y)
    # torch.save, not plain pickle: torch 2.13 cannot unpickle a uint32 tensor with pickle.loads.
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert "_views" not in back.__dict__
    with torch.no_grad():
        assert torch.equal(back(x), y)
