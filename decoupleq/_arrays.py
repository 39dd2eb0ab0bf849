"""Turning user inputs (NumPy arrays, CPU torch tensors) into the exact arrays the C core takes.

torch is never imported here: a tensor is recognised by its type's module, so
the package works without torch installed.
"""
from __future__ import annotations

import numpy as np


def is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x, name: str) -> np.ndarray:
    """A NumPy view (or, for torch half types, a float32 copy) of ``x``.

    Raises:
        TypeError: if ``x`` is neither an ndarray nor a CPU torch tensor.
        ValueError: if ``x`` is a torch tensor on another device.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {x.device}")
        t = x.detach()
        # NumPy has no bfloat16; widen the half types in torch before crossing.
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")


def as_float_matrix(x, name: str, dtype, shape=None) -> np.ndarray:
    """``x`` as a C-contiguous 2-D array of ``dtype`` with finite values.

    The result is a copy whenever a conversion is needed, so callers may hand
    it to the C core without any risk of writing into the user's data (the
    core never writes into its inputs anyway).

    Raises:
        TypeError: non-numeric dtype.
        ValueError: wrong rank or shape, NaN or Inf.
    """
    a = to_numpy(x, name)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    # "A": aligned too (ascontiguousarray keeps an unaligned contiguous view,
    # which the C core refuses).
    a = np.require(a, dtype=dtype, requirements=["C", "A"])
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a
