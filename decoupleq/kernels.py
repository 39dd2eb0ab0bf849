"""Inference with packed low-bit weights: ``y = x @ W_hat.T`` on the CPU.

Batches of up to 16 rows are served straight from the packed codes (AVX2 when
the CPU and OS allow it, else plain C); larger batches dequantize tiles of
rows and call OpenBLAS sgemm. ``decoupleq.backend_info()["kernel"]`` names
the kernel in use; ``DECOUPLEQ_KERNEL=reference`` forces the plain-C one.

NumPy arrays and torch CPU tensors are both accepted. torch is never
imported here unless the caller passes a torch tensor (which means torch is
already loaded), and float32 contiguous data crosses between torch and NumPy
without copies (``Tensor.numpy()`` / ``torch.from_numpy`` share memory).
"""
from __future__ import annotations

import sys

import numpy as np

from . import _C
from .packing import PackedWeight

__all__ = ["available_kernels", "default_kernel", "packed_linear"]


def available_kernels() -> list[str]:
    """Names of the kernels runnable on this CPU, ``"reference"`` first."""
    return _C.kernel_names()


def default_kernel() -> str:
    """The kernel used when none is named (see ``DECOUPLEQ_KERNEL``)."""
    return _C.backend_info()["kernel"]


def _is_torch(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _x_numpy(x, in_features: int):
    """x as a float32 C-contiguous (batch, in) array, and the leading shape."""
    if _is_torch(x):
        import torch  # already loaded: x is one of its tensors

        if x.device.type != "cpu":
            raise ValueError(f"x must be on the CPU, got device {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        # No gradient flows through the kernels: callers use them under no_grad.
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        lead = tuple(x.shape[:-1])
        if x.ndim == 0 or x.shape[-1] != in_features:
            raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")
        return x.reshape(-1, in_features).contiguous().numpy(), lead
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"x must have a floating-point dtype, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {x.shape}")
    lead = x.shape[:-1]
    x2 = np.require(x.reshape(-1, in_features), dtype=np.float32, requirements=["C", "A"])
    return x2, lead


def packed_linear(x, packed: PackedWeight, *, bias=None, out=None, threads: int | None = None,
                  kernel: str | None = None):
    """``y = x @ W_hat.T (+ bias)`` with ``W_hat`` the dequantized packed weight.

    Args:
        x: ``(..., in_features)`` NumPy array or torch CPU tensor of any float
            dtype (float16/bfloat16/float64 are converted to float32).
        packed: the weight.
        bias: optional ``(out_features,)`` added to every row (same kind as x).
        out: optional preallocated float32 C-contiguous result
            ``(..., out_features)`` of the same kind as x (written in place,
            must not share memory with x).
        threads: worker threads. None: torch's intra-op thread count for
            torch input (so a ``torch.set_num_threads`` limit is honoured),
            else the library's count; 0: the library's count
            (``DECOUPLEQ_NUM_THREADS``, else OpenBLAS's).
        kernel: ``None``/``"auto"`` for the default, or one of
            :func:`available_kernels`.

    Returns:
        float32 ``(..., out_features)``: a NumPy array for NumPy input, a torch
        tensor for torch input (sharing memory with ``out`` when given).
    """
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 0):
        raise ValueError(f"threads must be None or an int >= 0, got {threads!r}")
    torch_in = _is_torch(x)
    if threads is None:
        threads = sys.modules["torch"].get_num_threads() if torch_in else 0
    x2, lead = _x_numpy(x, packed.in_features)
    shape_out = (*lead, packed.out_features)
    out2 = None
    if out is not None:
        if torch_in != _is_torch(out):
            raise TypeError("out must be of the same kind (NumPy or torch) as x")
        arr = out.numpy() if torch_in else out
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or tuple(arr.shape) != shape_out:
            raise ValueError(f"out must be float32 with shape {shape_out}")
        if not arr.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        out2 = arr.reshape(-1, packed.out_features)
    y = _C.packed_matmul(x2, packed.codes, packed.scale, packed.zero, packed.bits,
                         packed.in_features, packed.group_size, out=out2, threads=int(threads),
                         kernel=kernel)
    if bias is not None:
        b = bias.detach().to("cpu").float().numpy() if _is_torch(bias) else np.asarray(bias, np.float32)
        if b.shape != (packed.out_features,):
            raise ValueError(f"bias must have shape ({packed.out_features},), got {tuple(b.shape)}")
        y += b
    if out is not None:
        return out
    y = y.reshape(shape_out)
    if torch_in:
        import torch

        return torch.from_numpy(y)
    return y
