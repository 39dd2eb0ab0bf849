"""The starting (S, Z) of a layer by initialisation: the twin of ``_C.start_params``."""
from __future__ import annotations

import numpy as np

from . import _checks
from .grid import _minmax_params
from .neuqi import neuqi_params
from .shrink import _shrink_search

INITS = ("minmax", "shrink", "neuqi", "neuqi_int")


def _start_params(W, H00, bits, g, symmetric, rule, init):
    if init == "minmax":
        return _minmax_params(W, bits, g, symmetric)
    if init == "shrink":
        S, Z, _, _ = _shrink_search(W, H00, bits, g, symmetric, rule)
        return S, Z
    hdiag = np.ascontiguousarray(np.diag(H00), dtype=np.float64)
    S, Z, _ = neuqi_params(W, bits, g if g < W.shape[1] else -1, symmetric, hdiag,
                           integer_zero=init == "neuqi_int")
    return S, Z


def start_params(W, H00, bits, group_size, symmetric, rule, init):
    """The starting scale and zero of every row and group.

    init: "minmax" (ALGORITHM 1.2), "shrink" (min-max, then each row's best
    shrunk range by its H00 error, 3.3), "neuqi" or "neuqi_int" (7, with the
    weights diag H00).

    Args:
        W: float32 (m, n). H00: float64 (n, n), damped. bits: 2..8.
        group_size: -1 or positive (shorter last group). symmetric: bool.
        rule: "half_up" | "half_even". init: one of INITS.
    Returns:
        S, Z: float32 (m, G).
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    init = _checks.choice("init", init, INITS)
    return _start_params(W, H00, bits, g, symmetric, rule, init)
