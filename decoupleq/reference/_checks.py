"""Argument checks of the reference, mirroring what the C boundary raises.

The C boundary (csrc/py_common.c) takes arrays with their exact dtype, rank and
C-contiguity and never copies them; the reference demands the same so that both
accept and reject the same calls. TypeError is for a wrong kind of object or
dtype, ValueError for a wrong shape or value. Every message names the argument.
"""
from __future__ import annotations

import numbers

import numpy as np

ROUNDING_RULES = ("half_up", "half_even")
ROUNDINGS = ("gptq", "pgd")


def array(x, name: str, dtype, ndim: int) -> np.ndarray:
    """Return ``x`` unchanged if it is a C-contiguous ndarray of this dtype and rank."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {x.dtype.name}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got {x.ndim} dimensions")
    if not (x.flags.c_contiguous and x.flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    return x


def finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")


def shape(x: np.ndarray, name: str, expected: tuple, what: str) -> None:
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {expected} ({what}), got {x.shape}")


def integer(name: str, value, low=None, high=None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def choice(name: str, value, allowed) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def weight(W) -> tuple[int, int]:
    """W: float32 (m, n), m, n >= 1, finite. Returns (m, n)."""
    array(W, "W", np.float32, 2)
    m, n = W.shape
    if m < 1 or n < 1:
        raise ValueError(f"W must have at least one row and one column, got shape {W.shape}")
    finite(W, "W")
    return m, n


def hessian(H00, n: int) -> None:
    """H00: float64 (n, n), finite (symmetry is assumed, not checked)."""
    array(H00, "H00", np.float64, 2)
    shape(H00, "H00", (n, n), "in_features x in_features of W")
    finite(H00, "H00")


def bits(value) -> int:
    return integer("bits", value, low=2, high=8)


def group_size(value, n: int) -> int:
    """Return the effective group size g (n for per-channel) after checking it."""
    value = integer("group_size", value)
    if value == -1:
        return n
    if value < 1:
        raise ValueError(f"group_size must be -1 (per-channel) or a positive integer, got {value}")
    if n % value != 0:
        raise ValueError(f"group_size {value} does not divide in_features {n}")
    return value


def scale_zero(S, Z, m: int, G: int) -> None:
    """S, Z: float32 (m, G), finite."""
    for x, name in ((S, "S"), (Z, "Z")):
        array(x, name, np.float32, 2)
        shape(x, name, (m, G), "out_features x groups")
        finite(x, name)


def codes(A, m: int, n: int, bits_: int | None = None) -> None:
    """A: int8 (m, n), inside the signed b-bit range when bits is known."""
    array(A, "A", np.int8, 2)
    shape(A, "A", (m, n), "the shape of W")
    if bits_ is not None and A.size:
        lo, hi = -(1 << (bits_ - 1)), (1 << (bits_ - 1)) - 1
        if A.min() < lo or A.max() > hi:
            raise ValueError(f"A has codes outside [{lo}, {hi}] for bits {bits_}")
