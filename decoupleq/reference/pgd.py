"""Integer step "train": projected Adam, then column-by-column rounding (ALGORITHM 3.5).

Faithful and slow: O(K1·m·n²) for phase A and O(K2·m·n³/2) for phase B.
Float32 throughout (V, gradients, moments, H00 cast to float32), as the
reference's torch code runs.
"""
from __future__ import annotations

import numpy as np

from . import _checks
from .gptq import act_order_perm
from .grid import F32, _row_errors, expand, qrange, quantize_codes

BETA1, BETA2 = 0.9, 0.999
EPS_PHASE_A = 1e-5
EPS_PHASE_B = 1e-4
LR_PHASE_B = 1e-3      # the reference does not pass --lr on to the inner steps


class _ProjectedAdam:
    """Adam on V (m x n) with bias correction, V clamped to [lo, hi] after each step.

    The moment buffers and the step counter t live for the whole integer step:
    phase B updates the remaining columns' slices of the same buffers and keeps
    counting t from where phase A stopped.
    """

    def __init__(self, V, W, H, lo, hi):
        self.V, self.W, self.H, self.lo, self.hi = V, W, H, lo, hi
        self.m1 = np.zeros_like(V)
        self.m2 = np.zeros_like(V)
        self.t = 0

    def step(self, c0, lr, eps):
        """One step on columns c0..n-1; the gradient (V - W) H[:, c0:] (no factor 2)."""
        V, cols = self.V, slice(c0, None)
        grad = (V - self.W) @ self.H[:, cols]
        self.t += 1
        # m <- β1 m + (1-β1) g, written as the lerp m + (1-β1)(g - m) that torch's Adam uses.
        m1 = self.m1[:, cols]
        self.m1[:, cols] = m1 + (1 - BETA1) * (grad - m1)
        self.m2[:, cols] = BETA2 * self.m2[:, cols] + (1 - BETA2) * grad * grad
        step_size = lr / (1 - BETA1**self.t)
        bc2_sqrt = (1 - BETA2**self.t) ** 0.5
        denom = np.sqrt(self.m2[:, cols]) / bc2_sqrt + eps
        V[:, cols] -= step_size * (self.m1[:, cols] / denom)
        V[:, cols] = np.clip(V[:, cols], self.lo[:, cols], self.hi[:, cols])


def _snap(X, s, z, qmin, qmax, symmetric, rule):
    """Nearest grid value s·clamp(R((x - z) ⊘ s)) + z, float32."""
    return s * quantize_codes(X, s, z, qmin, qmax, symmetric, rule) + z


def _round_pgd(W, S, Z, H00, bits, g, symmetric, act_order, rule, k1, k2, lr):
    m, n = W.shape
    qmin, qmax = qrange(bits)
    if symmetric:
        Z = np.zeros_like(S)
    perm = act_order_perm(H00, act_order)
    Wp = W[:, perm]
    Sp = expand(S, g, n)[:, perm]
    Zp = expand(Z, g, n)[:, perm]
    Hp = H00[np.ix_(perm, perm)].astype(F32)
    # The box of each element; min/max keeps it valid for a negative scale.
    ends = (F32(qmin) * Sp + Zp, F32(qmax) * Sp + Zp)
    lo, hi = np.minimum(*ends), np.maximum(*ends)

    V = Wp.copy()
    adam = _ProjectedAdam(V, Wp, Hp, lo, hi)
    # Phase A: the box relaxation of the whole row.
    for _ in range(k1):
        adam.step(0, lr, EPS_PHASE_A)
    # Phase B: freeze one column on the grid, relax the rest again.
    for c in range(n - 1):
        V[:, c] = _snap(V[:, c], Sp[:, c], Zp[:, c], qmin, qmax, symmetric, rule)
        for _ in range(k2):
            adam.step(c + 1, LR_PHASE_B, EPS_PHASE_B)
    V = _snap(V, Sp, Zp, qmin, qmax, symmetric, rule)

    Q = np.empty_like(V)
    Q[:, perm] = V
    A = quantize_codes(Q, expand(S, g, n), expand(Z, g, n), qmin, qmax, symmetric, rule).astype(np.int8)
    return A, _row_errors(W, A, S, Z, H00, g)


def round_pgd(W, S, Z, H00, bits, group_size, symmetric, act_order, rule,
              steps_before_round, steps_per_column, lr):
    """decoupleQ's PGD integer step with fixed (S, Z) (ALGORITHM 3.5).

    In sweep order (act-order π of diag H00, stable, or natural), V starts at W
    and lives in the box [min(qmin·s+z, qmax·s+z), max(...)] per element.
      Phase A: steps_before_round (K1) projected Adam steps on
        f(V) = Σ_r (v_r - w_r) H00 (v_r - w_r)ᵀ with gradient (V - W) H00,
        β = (0.9, 0.999), ε = 1e-5, learning rate `lr`, bias-corrected:
        V -= (lr / (1 - β1^t)) · m / (√v / √(1 - β2^t) + ε), then clamp.
      Phase B: for c = 0 .. n-2: snap column c to the grid, then
        steps_per_column (K2) projected Adam steps on columns c+1.. with
        gradient (V - W) H00[:, c+1:], ε = 1e-4, lr = 1e-3 (fixed), reusing
        phase A's moments (their slices) and continuing its step counter.
      Finally snap every column; unpermute; A = clamp(R((V - z) ⊘ s)).
    Symmetric: z = 0 throughout (Z is ignored). Cost O(K2·m·n³/2).

    Args:
        W: float32 (m, n). S, Z: float32 (m, G). H00: float64 (n, n).
        bits: 2..8. group_size: -1 or positive (shorter last group). symmetric, act_order: bool.
        rule: "half_up" | "half_even". steps_before_round, steps_per_column:
        int >= 0. lr: float > 0 (phase A).
    Returns:
        A: int8 (m, n); err: float64 (m,) measured with H00.
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    _checks.scale_zero(S, Z, m, _checks.num_groups(n, g))
    symmetric = _checks.flag("symmetric", symmetric)
    act_order = _checks.flag("act_order", act_order)
    rule = _checks.choice("rule", rule, _checks.ROUNDING_RULES)
    k1 = _checks.integer("steps_before_round", steps_before_round, low=0)
    k2 = _checks.integer("steps_per_column", steps_per_column, low=0)
    lr = _checks.positive_float("lr", lr)
    return _round_pgd(W, S, Z, H00, bits, g, symmetric, act_order, rule, k1, k2, lr)
