"""Whole-layer methods: min-max RTN and decoupleQ's alternating loop (ALGORITHM 3.2-3.4)."""
from __future__ import annotations

import logging

import numpy as np

from . import _checks
from .float_step import _float_step, _NonFinite
from .gptq import _round_gptq
from .grid import _minmax_params, _row_errors, _rtn_codes
from .pgd import _round_pgd
from .shrink import _shrink_search
from .start import INITS, _start_params

log = logging.getLogger(__name__)

EARLY_STOP_RATE = 1e-4


def _rtn(W, H00, bits, g, symmetric, rule):
    S, Z = _minmax_params(W, bits, g, symmetric)
    A = _rtn_codes(W, S, Z, bits, symmetric, rule, g)
    return A, S, Z, _row_errors(W, A, S, Z, H00, g)


def rtn(W, H00, bits, group_size, symmetric, rule):
    """Min-max round-to-nearest (ALGORITHM 3.2 step 1, no shrink).

    Args:
        W: float32 (m, n). H00: float64 (n, n) damped Hessian (only for err).
        bits: 2..8. group_size: -1 or positive (shorter last group). symmetric: bool.
        rule: "half_up" | "half_even".
    Returns:
        A: int8 (m, n); S, Z: float32 (m, G); err: float64 (m,).
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    return _rtn(W, H00, bits, g, symmetric, rule)


def _keep_better(err_new, err):
    """Rows whose new error is strictly lower (a NaN never counts as lower)."""
    return err_new < err


def _decoupleq(W, H00, bits, g, symmetric, act_order, rule, iterations, rounding,
               blocksize, k1, k2, lr, init="shrink"):
    def integer_step(S, Z):
        if rounding == "gptq":
            return _round_gptq(W, S, Z, H00, bits, g, symmetric, act_order, rule, blocksize)
        return _round_pgd(W, S, Z, H00, bits, g, symmetric, act_order, rule, k1, k2, lr)

    m = W.shape[0]
    # 3.2: RTN with the starting parameters (min-max for the reference's
    # start, which shrinks them in iteration 0), then a GPTQ pass from them.
    if init in ("shrink", "minmax"):
        A, S, Z, err = _rtn(W, H00, bits, g, symmetric, rule)
    else:
        S, Z = _start_params(W, H00, bits, g, symmetric, rule, init)
        A = _rtn_codes(W, S, Z, bits, symmetric, rule, g)
        err = _row_errors(W, A, S, Z, H00, g)
    trace = [err.copy()]
    Ag, eg = _round_gptq(W, S, Z, H00, bits, g, symmetric, act_order, rule, blocksize)
    better = _keep_better(eg, err)
    A[better], err[better] = Ag[better], eg[better]
    trace.append(err.copy())

    for it in range(iterations - 1):
        if it == 0:
            # 3.3: the float solve of RTN codes is iteration 0's candidate:
            # under each row's best shrunk range for the reference's start,
            # else under the starting parameters (still S, Z: the GPTQ pass
            # only took codes). The search's and the solve's errors are not used.
            if init == "shrink":
                Ss, Zs, _, _ = _shrink_search(W, H00, bits, g, symmetric, rule)
            else:
                Ss, Zs = S.copy(), Z.copy()
            As = _rtn_codes(W, Ss, Zs, bits, symmetric, rule, g)
            try:
                Sc, Zc, _ = _float_step(W, As, H00, g, symmetric)
            except _NonFinite as exc:
                # Like the reference's out-of-memory fallback: keep (s_p, z_p).
                log.warning("initial float solve failed (%s); using the shrunk range", exc)
                Sc, Zc = Ss, Zs
        else:
            Sc, Zc = S, Z
        Ac, ec = integer_step(Sc, Zc)
        better = _keep_better(ec, err)
        A[better], S[better], Z[better], err[better] = Ac[better], Sc[better], Zc[better], ec[better]
        trace.append(err.copy())
        rate = np.count_nonzero(better) / m
        log.debug("iteration %d integer step: %.4f of rows improved", it, rate)
        if rate < EARLY_STOP_RATE:
            break

        try:
            Sf, Zf, ef = _float_step(W, A, H00, g, symmetric)
        except _NonFinite as exc:
            # Like the reference's out-of-memory fallback: abandon the rest of
            # the alternation and keep the current best.
            log.warning("float step failed (%s); stopping the alternation", exc)
            break
        better = _keep_better(ef, err)
        S[better], Z[better], err[better] = Sf[better], Zf[better], ef[better]
        trace.append(err.copy())
        rate = np.count_nonzero(better) / m
        log.debug("iteration %d float step: %.4f of rows improved", it, rate)
        if rate < EARLY_STOP_RATE:
            break

    if np.any(err < 0):
        log.warning("%d rows have a negative error (rounding in float32)", int(np.sum(err < 0)))
    return A, S, Z, err, np.array(trace, dtype=np.float64)


def decoupleq(W, H00, bits, group_size, symmetric, act_order, rule, iterations, rounding,
              blocksize, steps_before_round, steps_per_column, lr, init="shrink"):
    """decoupleQ on one layer: alternate integer and float steps, keeping the best per row.

    1. RTN with the starting (S, Z) of ``init`` (S, Z, A, err): min-max for
       "shrink" (the reference) and "minmax", NeUQI's for "neuqi"/"neuqi_int".
    2. decoupleQ's GPTQ step from those (S, Z) (always "gptq", as in
       the reference); rows whose error drops take its codes.
    3. For it = 0 .. iterations-2:
         candidate (Sc, Zc) = it == 0: float solve of the RTN codes under the
           per-row best shrunk range (init "shrink": shrink_search then
           float_step), or under the starting (S, Z) (other inits);
           otherwise the current best (S, Z);
         integer step ("gptq": round_gptq, "pgd": round_pgd) with (Sc, Zc);
           rows with a strictly lower error take (A, S, Z, err) from it;
           stop if fewer than 1e-4 of the rows improved;
         float step on the current A; rows with a strictly lower error take
           (S, Z, err); stop if fewer than 1e-4 of the rows improved.
    Each row's error never increases. Symmetric: Z = 0.
    A float step whose solution is not finite (fatal in float_step) is
    handled like the reference's out-of-memory fallback (ALGORITHM 3.3, 3.8):
    in iteration 0 the candidate stays the shrunk (S, Z); later, the
    alternation stops and the current best is returned. Unlike the reference,
    a float step that returns a zero error (an all-zero row fitted exactly) is
    not an error: the reference raises on err <= 0 there.

    Args:
        W: float32 (m, n). H00: float64 (n, n) damped Hessian. bits: 2..8.
        group_size: -1 or positive (shorter last group). symmetric, act_order: bool.
        rule: "half_up" | "half_even". iterations: int >= 1 (max_iter_num).
        rounding: "gptq" | "pgd". blocksize: int >= 1 (GPTQ lazy blocks).
        steps_before_round, steps_per_column: int >= 0, lr: float > 0 (PGD).
        init: "shrink" | "minmax" | "neuqi" | "neuqi_int".
    Returns:
        A: int8 (m, n); S, Z: float32 (m, G); err: float64 (m,);
        trace: float64 (k, m): row 0 the min-max error, row 1 after the
        initial GPTQ pass, then one row after each integer and each float
        step of the loop (the step that triggers the early stop included),
        so k <= 2·iterations.
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    act_order = _checks.flag("act_order", act_order)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    iterations = _checks.integer("iterations", iterations, low=1)
    rounding = _checks.choice("rounding", rounding, _checks.ROUNDINGS)
    blocksize = _checks.integer("blocksize", blocksize, low=1)
    k1 = _checks.integer("steps_before_round", steps_before_round, low=0)
    k2 = _checks.integer("steps_per_column", steps_per_column, low=0)
    lr = _checks.positive_float("lr", lr)
    init = _checks.choice("init", init, INITS)
    return _decoupleq(W, H00, bits, g, symmetric, act_order, rule, iterations, rounding,
                      blocksize, k1, k2, lr, init)
