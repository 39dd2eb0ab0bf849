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
    weight_range(W)
    return m, n


# Tolerances of the checks below, the same as the C boundary's (csrc/dq_checks.h).
SYM_RTOL = 1e-5  # |H_ij - H_ji| <= SYM_RTOL * sqrt(H_ii H_jj)
PSD_RTOL = 1e-5  # H + PSD_RTOL * max(diag H) * I must have a Cholesky factor
F32_MAX = float(np.finfo(np.float32).max)


def weight_range(W: np.ndarray, name: str = "W") -> None:
    """|w| < FLT_MAX / 2, so that max - min of any group stays finite in float32."""
    big = float(np.abs(W).max(initial=0.0))
    if big >= F32_MAX / 2:
        raise ValueError(
            f"{name} has an entry of magnitude {big:.6g}: weights must stay below 1.7e38 in "
            "magnitude (FLT_MAX / 2), or the min-max scale of their group overflows float32")


def hessian(H00, n: int, W=None) -> None:
    """H00: float64 (n, n), finite, symmetric and positive semi-definite within
    the tolerances above, with entries (and, given W, W H00) within float32."""
    array(H00, "H00", np.float64, 2)
    shape(H00, "H00", (n, n), "in_features x in_features of W")
    finite(H00, "H00")
    d = np.diag(H00)
    neg = np.flatnonzero(d < 0)
    if neg.size:
        i = int(neg[0])
        raise ValueError(f"H00 is not positive semi-definite: H00[{i}, {i}] = {d[i]:.6g} < 0")
    hmax = float(np.abs(H00).max())
    if hmax > F32_MAX:
        raise ValueError(
            f"H00 has an entry of magnitude {hmax:.6g}, beyond float32 (3.4e38), in which the "
            "solver works; scale H00 down (the codes do not depend on its scale)")
    tol = SYM_RTOL * np.sqrt(np.outer(d, d))
    bad = np.argwhere(np.triu(~(np.abs(H00 - H00.T) <= tol), 1))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(
            f"H00 must be symmetric: H00[{i}, {j}] = {H00[i, j]:.6g} but H00[{j}, {i}] = "
            f"{H00[j, i]:.6g} (beyond a tolerance of 1e-5 * sqrt(H00[i, i] * H00[j, j]))")
    if W is not None:
        bound = float(np.abs(W).max(initial=0.0)) * float(np.abs(H00).sum(axis=1).max())
        if bound > F32_MAX:
            raise ValueError(
                f"W and H00 are too large together: max|W| * max row sum |H00| = {bound:.6g} "
                "overflows float32, in which the solver computes W H00; scale H00 down "
                "(the codes do not depend on its scale)")
    dmax = float(d.max())
    shift = PSD_RTOL * dmax if dmax > 0 else 1.0
    # Only the lower triangle is read, as LAPACK's factorisation in C does.
    L = np.tril(H00) + np.tril(H00, -1).T + shift * np.eye(n)
    try:
        np.linalg.cholesky(L)
    except np.linalg.LinAlgError:
        raise ValueError(
            "H00 is not positive semi-definite: its Cholesky factorisation with a shift of "
            "1e-5 * max(diag H00) fails") from None


def bits(value) -> int:
    return integer("bits", value, low=2, high=8)


def group_size(value, n: int) -> int:
    """Return the effective group size g (n for per-channel) after checking it.

    Any positive size is allowed: when it does not divide n the last group is
    shorter (n - (G - 1) g columns); a size past n is one group per row.
    """
    value = integer("group_size", value)
    if value == -1:
        return n
    if value < 1:
        raise ValueError(f"group_size must be -1 (per-channel) or a positive integer, got {value}")
    return min(value, n)


def num_groups(n: int, g: int) -> int:
    """G = ceil(n / g): the groups of g columns over n, the last one possibly short."""
    return -(-n // g)


def params_group_size(S, n: int, group_size) -> int:
    """The group size of parameters S (m, G) over n columns, checked.

    group_size None infers n / G, which needs G to divide n (several sizes give
    the same G when the last group is short, so such callers pass it).
    """
    array(S, "S", np.float32, 2)
    G = S.shape[1]
    if group_size is None:
        if G < 1 or n % G != 0:
            raise ValueError(f"S must have shape (m, G) with G dividing in_features {n}, got {S.shape} "
                             "(pass group_size for a shorter last group)")
        return n // G
    g = globals()["group_size"](group_size, n)
    if G != num_groups(n, g):
        raise ValueError(f"S must have shape (m, {num_groups(n, g)}) (groups of group_size {group_size} over "
                         f"in_features {n}), got {S.shape}")
    return g


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
