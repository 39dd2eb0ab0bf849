"""GPTQ column sweep: decoupleQ's integer step (ALGORITHM 2.2) and the GPTQ baseline (2.1).

Both run the same recurrence over the columns in sweep order (act-order or
natural), with U the upper Cholesky factor of the inverse of the factored
matrix H_f (H_f⁻¹ = UᵀU):

    q_i = quantize(w_i)                     w_i: column i, updated by all e_k, k < i
    e_i = (w_i - q_i) / U_ii
    w_j -= e_i U_ij  for every j > i

done in lazy blocks of `blocksize` columns (updates inside the block at once,
the rest with one GEMM per block). With Δ = Q - W: Δ = -E U, so per row
Δ H_f Δᵀ = Σ_i e_i² exactly (in exact arithmetic). The sweep is float32 (W, U,
Q, E), as in the reference code; the factorisation is float64.
"""
from __future__ import annotations

import numpy as np

from . import _checks
from .grid import F32, _row_errors, expand, qrange, quantize_codes, round_rule, safe_div

# decoupleQ's step damps H00 again by t * mean(diag H00), first t that factors.
DECOUPLEQ_LADDER = (0.01, 0.1, 1.0, 10.0, 100.0)
# The baseline factors H00 itself, damping more only when that fails.
BASELINE_LADDER = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0)


class NotPositiveDefinite(ValueError):
    pass


def act_order_perm(H, act_order: bool) -> np.ndarray:
    """π = argsort(diag H, descending); stable, so equal diagonals keep natural order."""
    n = H.shape[0]
    if not act_order:
        return np.arange(n)
    return np.argsort(-np.diag(H), kind="stable")


def inverse_upper_factor(H, ladder) -> tuple[np.ndarray, float]:
    """U (float64, upper) with (H + λ I)⁻¹ = UᵀU, for the first t of the ladder that works.

    λ = t * mean(diag H). For each t: Cholesky H + λI = L Lᵀ, the inverse from
    that factor, (H + λI)⁻¹ = L⁻ᵀ L⁻¹, then the upper Cholesky factor of the
    inverse. A t "works" when every step succeeds and U is finite.

    Returns:
        (U, λ).
    Raises:
        NotPositiveDefinite (a ValueError) when no t works.
    """
    n = H.shape[0]
    mean_diag = float(np.mean(np.diag(H)))
    eye = np.eye(n)
    for t in ladder:
        lam = t * mean_diag
        try:
            L = np.linalg.cholesky(H + lam * eye)
            Linv = np.linalg.solve(L, eye)
            Hinv = Linv.T @ Linv
            U = np.linalg.cholesky((Hinv + Hinv.T) / 2).T
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(U)):
            return U, lam
    raise NotPositiveDefinite(
        "the Hessian is not positive definite even after the largest damping")


class _Sweep:
    """State of a running sweep; `current(lo, hi)` reads columns with every correction so far."""

    def __init__(self, W, U, blocksize):
        self.W = W.copy()
        self.U = U
        self.blocksize = blocksize

    def current(self, lo, hi):
        """Columns [lo, hi) of W with the corrections of all swept columns (< j) applied.

        Only valid for lo >= j, the column about to be quantised. Columns in the
        current block come from W1; later columns still owe this block's lazy
        update for the columns done so far, which is applied here to a copy.
        """
        i1, i2, i = self.i1, self.i2, self.i
        inside = self.W1[:, lo - i1:min(hi, i2) - i1]
        if hi <= i2:
            return inside.copy()
        beyond = self.W[:, max(lo, i2):hi] - self.E1[:, :i] @ self.U[i1:i1 + i, max(lo, i2):hi]
        return np.concatenate([inside, beyond], axis=1)

    def run(self, quantize):
        W, U = self.W, self.U
        m, n = W.shape
        Q = np.empty_like(W)
        E = np.empty_like(W)
        for i1 in range(0, n, self.blocksize):
            i2 = min(i1 + self.blocksize, n)
            self.i1, self.i2 = i1, i2
            self.W1 = W[:, i1:i2].copy()
            self.E1 = np.zeros((m, i2 - i1), F32)
            for i in range(i2 - i1):
                self.i = i
                j = i1 + i
                w = self.W1[:, i]
                q = quantize(j, w, self)
                e = (w - q) / U[j, j]
                self.W1[:, i:] -= np.outer(e, U[j, j:i2])
                Q[:, j] = q
                self.E1[:, i] = e
            E[:, i1:i2] = self.E1
            W[:, i2:] -= self.E1 @ U[i1:i2, i2:]
        return Q, E


def gptq_sweep(W, U, blocksize, quantize):
    """Run the column recurrence on W (float32 (m, n), already in sweep order).

    Args:
        W: float32 (m, n). U: float32 (n, n) upper factor, H_f⁻¹ = UᵀU.
        blocksize: columns per lazy block.
        quantize: quantize(j, w, sweep) -> dequantised column (float32 (m,)),
            given the sweep position j, the updated column w and the sweep
            (whose current(lo, hi) gives updated later columns).
    Returns:
        Q: dequantised float32 (m, n); E: float32 (m, n), the scaled errors e_i.
    """
    return _Sweep(W, U, blocksize).run(quantize)


# ------------------------------------------------ decoupleQ's step (2.2)


def _round_gptq(W, S, Z, H00, bits, g, symmetric, act_order, rule, blocksize,
                baseline_damping=False):
    m, n = W.shape
    qmin, qmax = qrange(bits)
    if symmetric:
        Z = np.zeros_like(S)
    perm = act_order_perm(H00, act_order)
    # Each column keeps its natural group's (s, z): static groups, no g_idx.
    Sp = expand(S, g, n)[:, perm]
    Zp = expand(Z, g, n)[:, perm]
    if baseline_damping:
        # As the baseline factors: H00 itself first, a zero diagonal counted as 1.
        H = H00.copy()
        dead = np.diag(H) == 0
        H[dead, dead] = 1
        U, _ = inverse_upper_factor(H[np.ix_(perm, perm)], BASELINE_LADDER)
    else:
        U, _ = inverse_upper_factor(H00[np.ix_(perm, perm)], DECOUPLEQ_LADDER)
    U = U.astype(F32)

    def quantize(j, w, sweep):
        s, z = Sp[:, j], Zp[:, j]
        a = quantize_codes(w, s, z, qmin, qmax, symmetric, rule)
        return s * a + z

    Qp, _ = gptq_sweep(W[:, perm], U, blocksize, quantize)
    Q = np.empty_like(Qp)
    Q[:, perm] = Qp
    # Integers recovered from the dequantised weights, as the reference does.
    A = quantize_codes(Q, expand(S, g, n), expand(Z, g, n), qmin, qmax, symmetric, rule).astype(np.int8)
    return A, _row_errors(W, A, S, Z, H00, g)


def round_gptq(W, S, Z, H00, bits, group_size, symmetric, act_order, rule, blocksize=128,
               baseline_damping=False):
    """decoupleQ's GPTQ integer step with fixed (S, Z) (ALGORITHM 2.2).

    - π = argsort(diag H00, descending, stable) if act_order, else identity;
      S↑, Z↑ are expanded per column and permuted with W (static groups).
    - H_round = H00[π][:, π] + t·mean(diag H00)·I for the first t in
      (0.01, 0.1, 1, 10, 100) whose factorisation works (float64); U, the
      upper Cholesky factor of H_round⁻¹, is cast to float32.
    - Sweep from W in float32: each column is rounded to its fixed grid,
      q = s·clamp(R((w - z) ⊘ s)) + z, and its error fed forward (gptq_sweep).
    - Unpermute Q; A = clamp(R((Q - z) ⊘ s)); err = row_errors with H00.
    Symmetric: z = 0 throughout (Z is ignored).
    baseline_damping: factor H00 as the GPTQ baseline does (t from 0, a zero
    diagonal counted as 1): GPTQ with static groups from an initialisation.

    Args:
        W: float32 (m, n). S, Z: float32 (m, G). H00: float64 (n, n).
        bits: 2..8. group_size: -1 or positive (shorter last group). symmetric, act_order: bool.
        rule: "half_up" | "half_even". blocksize: int >= 1. baseline_damping: bool.
    Returns:
        A: int8 (m, n); err: float64 (m,).
    Raises:
        ValueError: if no rung of the damping ladder factors.
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    _checks.scale_zero(S, Z, m, _checks.num_groups(n, g))
    symmetric = _checks.flag("symmetric", symmetric)
    act_order = _checks.flag("act_order", act_order)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    blocksize = _checks.integer("blocksize", blocksize, low=1)
    baseline_damping = _checks.flag("baseline_damping", baseline_damping)
    return _round_gptq(W, S, Z, H00, bits, g, symmetric, act_order, rule, blocksize,
                       baseline_damping)


# ------------------------------------------------ the GPTQ baseline (2.1)


def gptq_group_params(block, bits, symmetric, rule):
    """Reference GPTQ's min-max quantiser of a block of columns (float32 (m, k)).

    lo = min(min w, 0), hi = max(max w, 0); symmetric: hi = max(|lo|, hi),
    lo = -hi if lo < 0; lo = hi = 0 -> (-1, 1); s = (hi - lo)/(2^b - 1);
    integer zero ζ = R(-lo ⊘ s), or 2^(b-1) when symmetric. Float32.
    Returns (s, ζ), float32 (m,) each.
    """
    maxq = F32(2**bits - 1)
    lo = np.minimum(block.min(axis=1), F32(0))
    hi = np.maximum(block.max(axis=1), F32(0))
    if symmetric:
        hi = np.maximum(np.abs(lo), hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo = np.where(empty, F32(-1), lo)
    hi = np.where(empty, F32(1), hi)
    s = (hi - lo) / maxq
    if symmetric:
        zeta = np.full_like(s, F32(2 ** (bits - 1)))
    else:
        zeta = round_rule(safe_div(-lo, s), rule)
    return s, zeta


def _gptq(W, H00, bits, g, symmetric, act_order, rule, blocksize):
    m, n = W.shape
    G = _checks.num_groups(n, g)
    qmin, _ = qrange(bits)
    maxq = F32(2**bits - 1)
    # Dead inputs: a zero diagonal means the feature never fired.
    Wd = W.copy()
    H = H00.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Wd[:, dead] = 0
    perm = act_order_perm(H, act_order)
    static = act_order and G > 1
    S = np.empty((m, G), F32)
    zeta = np.empty((m, G), F32)
    if static:
        # Natural groups from the original (dead-zeroed) W, so groups stay
        # contiguous in natural order and no g_idx is needed.
        for k in range(G):
            S[:, k], zeta[:, k] = gptq_group_params(Wd[:, k * g:(k + 1) * g], bits, symmetric, rule)
    U, _ = inverse_upper_factor(H[np.ix_(perm, perm)], BASELINE_LADDER)
    U = U.astype(F32)
    codes = np.empty((m, n), F32)

    def quantize(j, w, sweep):
        if static:
            k = perm[j] // g
        else:
            # Without act-order sweep order is natural (per-channel: j = 0 only).
            k = j // g
            if j % g == 0:
                S[:, k], zeta[:, k] = gptq_group_params(sweep.current(j, j + g), bits, symmetric, rule)
        s, z = S[:, k], zeta[:, k]
        q = np.clip(round_rule(safe_div(w, s), rule) + z, F32(0), maxq)
        codes[:, j] = q
        return s * (q - z)

    gptq_sweep(Wd[:, perm], U, blocksize, quantize)
    # Unsigned codes 0..maxq -> signed a = q + qmin; ŵ = s(q - ζ) = s·a + z with z = -s(qmin + ζ).
    A = np.empty((m, n), np.int8)
    A[:, perm] = (codes + F32(qmin)).astype(np.int8)
    Z = np.zeros((m, G), F32) if symmetric else -(S * (zeta + F32(qmin)))
    return A, S, Z, _row_errors(W, A, S, Z, H00, g)


def gptq(W, H00, bits, group_size, symmetric, act_order, rule, blocksize=128):
    """The reference GPTQ method as a baseline (ALGORITHM 2.1), in this library's format.

    - Dead inputs: where diag H00 is 0 the diagonal is set to 1 and the column
      of W to 0 (only possible when H00 was not damped).
    - π = argsort(diag H, descending, stable) if act_order.
    - H00 itself is factored (t = 0), more damping t·mean(diag) only if that
      fails: t in (0, 0.01, 0.1, 1, 10, 100). U = upper factor of the inverse.
    - Unsigned grid 0..2^b-1 with integer zero: q = clamp(R(w ⊘ s) + ζ), the
      sweep feeds back w - s(q - ζ). Group parameters (gptq_group_params):
        act_order with groups: static, from the original W per natural group;
        otherwise: at each group start j (natural order), from the columns
        [j, j+g) with every correction of the columns before j applied. (The
        reference code reads them from W, which inside a lazy block still
        lacks that block's updates when g is not a multiple of blocksize; we
        use the fully updated weights so the result does not depend on
        blocksize except through rounding.)
    - Output in signed codes a = q + qmin, S = s, Z = -s·(qmin + ζ) (float32;
      symmetric: Z = 0), err = row_errors with H00 and the original W.

    Args:
        W: float32 (m, n). H00: float64 (n, n) damped Hessian. bits: 2..8.
        group_size: -1 or positive (shorter last group). symmetric, act_order: bool.
        rule: "half_up" | "half_even" (reference GPTQ is half_even).
        blocksize: int >= 1.
    Returns:
        A: int8 (m, n); S, Z: float32 (m, G); err: float64 (m,).
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    act_order = _checks.flag("act_order", act_order)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    blocksize = _checks.integer("blocksize", blocksize, low=1)
    return _gptq(W, H00, bits, g, symmetric, act_order, rule, blocksize)
