"""The integer grid: rounding rule, safe division, min-max parameters, RTN, row errors.

ALGORITHM.md 1.1-1.4. Every quantity that the C core must reproduce bit for bit
(scales, zeros, codes) is computed here in float32 with one NumPy operation per
arithmetic step, in the order written in the docstrings, so a C loop compiled
with ``-ffp-contract=off`` that performs the same steps gets the same bits.
Errors are float64 sums of a float32 GEMM (H00 cast to float32, as the
reference code keeps H in float32).
"""
from __future__ import annotations

import numpy as np

from . import _checks

F32 = np.float32
# Floor of |divisor| in the safe division (ALGORITHM 1.4); float32 paths divide
# by float32(1e-15), the float64 paths by 1e-15.
TINY32 = F32(1e-15)
TINY64 = 1e-15


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range of b bits: (qmin, qmax) = (-2^(b-1), 2^(b-1)-1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def round_rule(x: np.ndarray, rule: str) -> np.ndarray:
    """R(x) of ALGORITHM 1.3, in the dtype of x (integer-valued floats).

    half_up: floor(x) + 1 if x - floor(x) >= 0.5 else floor(x); x - floor(x) is
    exact for every float, so ties are found exactly (ties go toward +inf).
    half_even: IEEE nearest-even (np.rint). Infinities map to themselves.
    """
    if rule == "half_even":
        return np.rint(x)
    f = np.floor(x)
    with np.errstate(invalid="ignore"):  # inf - inf at infinities: the comparison is False
        return np.where(x - f >= 0.5, f + 1, f)


def safe_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x ⊘ y = x / (sign(y) * max(|y|, 1e-15)) with sign(0) = +1 (ALGORITHM 1.4).

    Works in the dtype of the operands: float32 operands use float32(1e-15).
    """
    tiny = TINY32 if np.result_type(x, y) == np.float32 else TINY64
    ay = np.maximum(np.abs(y), tiny)
    return x / np.where(y < 0, -ay, ay)


def expand(P: np.ndarray, g: int, n: int) -> np.ndarray:
    """S↑: (m, G) -> (m, n), every group's value repeated over its columns.

    Group j covers columns j·g .. j·g + g - 1; the last one stops at n (it is
    shorter when g does not divide n).
    """
    return np.repeat(P, g, axis=1)[:, :n]


def group_starts(n: int, g: int) -> np.ndarray:
    """First column of every group: 0, g, 2g, ... below n."""
    return np.arange(0, n, g)


def quantize_codes(X, S_up, Z_up, qmin: int, qmax: int, symmetric: bool, rule: str) -> np.ndarray:
    """clamp(R((X - Z) ⊘ S), qmin, qmax) elementwise, float32 (symmetric: R(X ⊘ S)).

    Steps in float32: t = X - Z; t = t ⊘ S; R(t); clamp. The safe division is
    plain division whenever |S| >= 1e-15 (every min-max scale); it keeps codes
    defined when a float solve returned a zero scale.
    """
    t = X if symmetric else X - Z_up
    t = safe_div(t, S_up)
    return np.clip(round_rule(t, rule), F32(qmin), F32(qmax))


def dequantize(A, S, Z, g: int) -> np.ndarray:
    """Ŵ = A ⊙ S↑ + Z↑ in float32 (one rounding for the product, one for the sum)."""
    n = A.shape[1]
    return A.astype(F32) * expand(S, g, n) + expand(Z, g, n)


# ---------------------------------------------------------------- public API


def _minmax_params(W, bits, g, symmetric, p_row=None):
    m, n = W.shape
    qmin, _ = qrange(bits)
    starts = group_starts(n, g)  # the last group may be short
    lo = np.minimum(np.minimum.reduceat(W, starts, axis=1), F32(0))
    hi = np.maximum(np.maximum.reduceat(W, starts, axis=1), F32(0))
    if symmetric:
        hi = np.maximum(np.abs(lo), hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo = np.where(empty, F32(-1), lo)
    hi = np.where(empty, F32(1), hi)
    if p_row is not None:
        lo = p_row[:, None] * lo
        hi = p_row[:, None] * hi
    S = (hi - lo) / F32(2**bits - 1)
    if symmetric:
        Z = np.zeros_like(S)
    else:
        Z = lo - S * F32(qmin)
    return np.ascontiguousarray(S, F32), np.ascontiguousarray(Z, F32)


def minmax_params(W, bits, group_size, symmetric, p_row=None):
    """Min-max scale and zero of every group (ALGORITHM 1.2), optionally shrunk per row.

    Per row r and group j, in float32:
      lo = min(min w, 0), hi = max(max w, 0);
      symmetric: hi = max(|lo|, hi) and lo = -hi if lo < 0;
      lo = hi = 0 (an all-zero group): lo, hi = -1, 1;
      shrink: lo = p_row[r] * lo, hi = p_row[r] * hi;
      s = (hi - lo) / (2^b - 1);  z = lo - s * qmin (symmetric: z = 0).

    Args:
        W: float32 (m, n), C-contiguous, finite.
        bits: int in 2..8.
        group_size: -1 (per-channel, G = 1) or positive; G = ceil(n / group_size),
            the last group shorter when group_size does not divide n.
        symmetric: bool.
        p_row: optional float32 (m,), each in (0, 1]: the range factor of each row.
    Returns:
        (S, Z): float32 (m, G) each.
    """
    m, n = _checks.weight(W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    if p_row is not None:
        _checks.array(p_row, "p_row", np.float32, 1)
        _checks.shape(p_row, "p_row", (m,), "one factor per row of W")
        _checks.finite(p_row, "p_row")
        if np.any(p_row <= 0) or np.any(p_row > 1):
            raise ValueError("p_row must lie in (0, 1]")
    return _minmax_params(W, bits, g, symmetric, p_row)


def _rtn_codes(W, S, Z, bits, symmetric, rule, g):
    n = W.shape[1]
    qmin, qmax = qrange(bits)
    q = quantize_codes(W, expand(S, g, n), expand(Z, g, n), qmin, qmax, symmetric, rule)
    return q.astype(np.int8)


def rtn_codes(W, S, Z, bits, symmetric, rule, group_size=None):
    """Round to the grid: A = clamp(R((W - Z↑) ⊘ S↑), qmin, qmax) (symmetric: R(W ⊘ S↑)).

    Args:
        W: float32 (m, n). S, Z: float32 (m, G) (Z is ignored when
            symmetric). bits: 2..8. symmetric: bool.
        rule: "half_up" or "half_even".
        group_size: columns per group, G = ceil(n / group_size); None infers
            n / G (G must divide n then).
    Returns:
        A: int8 (m, n), signed codes in [-2^(b-1), 2^(b-1) - 1].
    """
    m, n = _checks.weight(W)
    g = _checks.params_group_size(S, n, group_size)
    _checks.scale_zero(S, Z, m, S.shape[1])
    bits = _checks.bits(bits)
    symmetric = _checks.flag("symmetric", symmetric)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    return _rtn_codes(W, S, Z, bits, symmetric, rule, g)


def _row_errors(W, A, S, Z, H00, g):
    D = dequantize(A, S, Z, g) - W
    DH = D @ H00.astype(F32)
    return np.sum(DH.astype(np.float64) * D.astype(np.float64), axis=1)


def row_errors(W, A, S, Z, H00, group_size=None):
    """Per-row error e_r = (ŵ_r - w_r) H00 (ŵ_r - w_r)ᵀ (ALGORITHM 1.1).

    D = A ⊙ S↑ + Z↑ - W in float32, DH = D @ float32(H00) (float32 GEMM), then
    e_r = Σ_c DH[r, c] * D[r, c] accumulated in float64.

    Args:
        W: float32 (m, n). A: int8 (m, n). S, Z: float32 (m, G).
        H00: float64 (n, n), the damped Hessian.
        group_size: as rtn_codes (None: n / G, G dividing n).
    Returns:
        err: float64 (m,).
    """
    m, n = _checks.weight(W)
    g = _checks.params_group_size(S, n, group_size)
    _checks.scale_zero(S, Z, m, S.shape[1])
    _checks.codes(A, m, n)
    _checks.hessian(H00, n, W)
    return _row_errors(W, A, S, Z, H00, g)
