"""Per-row shrink grid search of the min-max range (ALGORITHM 3.3, search part)."""
from __future__ import annotations

import numpy as np

from . import _checks
from .grid import _minmax_params, _row_errors, _rtn_codes

GRID = 200
MAXSHRINK = 0.8
# i = 0 .. 159: p = 1 - i/200 runs from 1.000 down to 0.205.
N_CANDIDATES = int(MAXSHRINK * GRID)


def shrink_factor(i: int) -> np.float32:
    """Candidate i's range factor: float32(1 - i/200), computed in float64 then rounded."""
    return np.float32(1.0 - i / GRID)


def _shrink_search(W, H00, bits, g, symmetric, rule):
    m = W.shape[0]
    S, Z = _minmax_params(W, bits, g, symmetric)
    err = _row_errors(W, _rtn_codes(W, S, Z, bits, symmetric, rule, g), S, Z, H00, g)
    p_row = np.ones(m, np.float32)
    # All candidates are evaluated (no early exit); i = 0 is p = 1, the
    # starting point itself, which the strict < keeps from ever winning.
    for i in range(N_CANDIDATES):
        p = np.full(m, shrink_factor(i), np.float32)
        Sp, Zp = _minmax_params(W, bits, g, symmetric, p)
        ep = _row_errors(W, _rtn_codes(W, Sp, Zp, bits, symmetric, rule, g), Sp, Zp, H00, g)
        better = ep < err
        S[better], Z[better], p_row[better], err[better] = Sp[better], Zp[better], p[better], ep[better]
    return S, Z, p_row, err


def shrink_search(W, H00, bits, group_size, symmetric, rule):
    """Best shrunk min-max range per output row, judged by the row's H00 error.

    For i = 0..159, p = float32(1 - i/200): every group of every row gets the
    range (p*lo, p*hi) (minmax_params with p_row = p), RTN codes and row errors
    are computed, and a row takes candidate p when its error is strictly below
    its best so far. The best starts at the min-max RTN error (p = 1), so p = 1
    never "wins" and rows that no candidate improves keep p = 1. One p per row,
    shared by all its groups. No float solve here (the solver does that).

    Args:
        W: float32 (m, n). H00: float64 (n, n) damped Hessian. bits: 2..8.
        group_size: -1 or positive (shorter last group). symmetric: bool.
        rule: "half_up" or "half_even".
    Returns:
        S, Z: float32 (m, G) of the best range; p_row: float32 (m,);
        err: float64 (m,) RTN error under (S, Z).
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    return _shrink_search(W, H00, bits, g, symmetric, rule)
