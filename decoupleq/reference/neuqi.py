"""NeUQI: near-optimal initial scale and zero per group (ALGORITHM 7), in plain NumPy.

The twin of ``_C.neuqi_params``. Per group, with ``n = 2**bits`` levels and
``x = w / s``, the quantizer is

    ŵ = s · (clamp(round(x − z), 0, n − 1) + z),      z real,

and the objective ``L(s, z) = Σ_c h_c (w_c − ŵ_c)²`` with ``h`` the damped
Hessian diagonal normalised to sum 1 over the group (equal weights without a
Hessian). Written for reading, one group and one scale at a time; the C core
computes the same sweeps from one sort of the group (see csrc/dq_neuqi.c).
"""
from __future__ import annotations

import numpy as np

from . import _checks

COARSE_STEPS = 64      # s0 · k / 64, k = 1..64
FINE_STEPS = 16        # s_best ± j · s0 / 2048, j = 1..16
FINE_DENOM = 2048
INT_STEPS = 2048       # NeUQI_int: s0 · k / 2048


def levels(x, z, n):
    """k = clamp(⌊x − z + ½⌋, 0, n − 1): the level of every element."""
    return np.clip(np.floor(x - z + 0.5), 0, n - 1)


def exact_objective(x, h, z, n):
    """Σ h (x − z − k)² in units of x (multiply by s² for units of w)."""
    r = x - z - levels(x, z, n)
    return float(np.sum(h * r * r))


def phase1_zbar(x, h, n):
    """Phase 1: minimise the piecewise-quadratic bound over z.

    Element c costs (x − (n−1) − z)² while clamped at the top
    (z < x − n + ½), (x − z)² while clamped at the bottom (z > x + ½), and
    the bound ¼ in between. Sweep the sorted 2N breakpoints keeping the
    coefficients of α0 z² − 2 α1 z + α2 and minimise on every interval at
    clamp(α1 / α0); where α0 = 0 (all in range) the bound is flat and the
    middle of the interval is taken. Returns the best z̄.
    """
    top_at = x - n + 0.5       # leaves the top regime as z passes this
    bot_at = x + 0.5           # enters the bottom regime as z passes this
    events = np.concatenate([top_at, bot_at])
    kind = np.concatenate([np.zeros(x.size, int), np.ones(x.size, int)])
    order = np.argsort(events, kind="stable")
    top = np.ones(x.size, bool)
    bot = np.zeros(x.size, bool)
    best, zbar = np.inf, 0.0
    bounds = np.concatenate([[-np.inf], events[order], [np.inf]])
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if i > 0:
            c = order[i - 1] % x.size
            if kind[order[i - 1]] == 0:
                top[c] = False
            else:
                bot[c] = True
        mid = ~top & ~bot
        a0 = np.sum(h[top]) + np.sum(h[bot])
        a1 = np.sum(h[top] * (x[top] - (n - 1))) + np.sum(h[bot] * x[bot])
        a2 = np.sum(h[top] * (x[top] - (n - 1)) ** 2) + np.sum(h[bot] * x[bot] ** 2) + 0.25 * np.sum(h[mid])
        if a0 > 1e-12:
            z = min(max(a1 / a0, lo), hi)
        elif np.isfinite(lo) and np.isfinite(hi):
            z = 0.5 * (lo + hi)
        else:
            z = hi - 0.5 if np.isfinite(hi) else lo + 0.5
        value = a0 * z * z - 2 * a1 * z + a2
        if value < best:
            best, zbar = value, z
    return zbar


def phase2_exact(x, h, n, zl, zr):
    """Phase 2: the exact minimum of Σ h (x − k − z)² over z in [zl, zr].

    Between breakpoints every level k is fixed, so with y = x − k the
    objective is H z² − 2 α1 z + α2 (α1 = Σ h y, α2 = Σ h y²). As z rises
    past x − k + ½ an element drops from level k to k − 1 (only while
    k − 1 ≥ 0): y rises by 1, α1 by h and α2 by 2 h z_break. Returns
    (objective in units of x, z).
    """
    k = levels(x, zl, n)
    y = x - k
    H, a1, a2 = np.sum(h), np.sum(h * y), np.sum(h * y * y)
    zb, hb = [], []
    for c in range(x.size):
        kk = k[c]
        while kk >= 1 and x[c] - kk + 0.5 <= zr:
            zb.append(x[c] - kk + 0.5)
            hb.append(h[c])
            kk -= 1
    order = np.argsort(np.array(zb), kind="stable")
    zb = np.array(zb)[order]
    hb = np.array(hb)[order]
    best, zbest, cur = np.inf, zl, zl
    for i in range(len(zb) + 1):
        nxt = zb[i] if i < len(zb) else zr
        z = min(max(a1 / H, cur), nxt)
        value = H * z * z - 2 * a1 * z + a2
        if value < best:
            best, zbest = value, z
        if i < len(zb):
            a1 += hb[i]
            a2 += 2 * hb[i] * nxt
            cur = nxt
    return max(best, 0.0), zbest


def best_zero(w, h, s, n):
    """The best continuous z for scale s: phase 1, then phase 2 on [z̄ − 1, z̄ + 1].

    Returns (objective in units of w, z).
    """
    x = w / s
    zbar = phase1_zbar(x, h, n)
    obj, z = phase2_exact(x, h, n, zbar - 1, zbar + 1)
    return obj * s * s, z


def exhaustive_zero(x, h, n):
    """The global minimum over z of Σ h (x − z − k)², k = clamp(round(x − z), 0, n − 1),
    in units of x, from every breakpoint on the real line (not only NeUQI's window).

    A check on NeUQI's two phases, independent of them: left of all breakpoints every
    element sits at the top level; as z rises past x − k + ½ an element drops from level
    k to k − 1 (y = x − k rises by 1), and on each of the n·(n−1) + 1 intervals the
    objective is H z² − 2 α1 z + α2, minimised at clamp(α1 / H).
    """
    k = np.arange(1, n)
    bps = (x[:, None] - k[None, :] + 0.5).ravel()
    dh = np.repeat(h, n - 1)
    order = np.argsort(bps, kind="stable")
    bps, dh = bps[order], dh[order]
    y0 = x - (n - 1)
    H = h.sum()
    a1 = np.concatenate([[np.sum(h * y0)], np.sum(h * y0) + np.cumsum(dh)])
    a2 = np.concatenate([[np.sum(h * y0 * y0)], np.sum(h * y0 * y0) + np.cumsum(2 * dh * bps)])
    lo = np.concatenate([[-np.inf], bps])
    hi = np.concatenate([bps, [np.inf]])
    z = np.clip(a1 / H, lo, hi)
    v = H * z * z - 2 * a1 * z + a2
    return float(max(v.min(), 0.0))


def best_integer_zero(w, h, s, n):
    """NeUQI_int: the best z in {−(n−1), …, 0} by enumeration. Returns (objective, z)."""
    x = w / s
    best, zbest = np.inf, 0.0
    for z in range(-(n - 1), 1):
        value = exact_objective(x, h, float(z), n) * s * s
        if value < best:
            best, zbest = value, float(z)
    return best, zbest


def minmax_range(w, symmetric):
    """(lo, hi) of ALGORITHM 1.2: the range always holds 0; symmetric: ±max |w|."""
    lo = min(float(w.min()), 0.0)
    hi = max(float(w.max()), 0.0)
    if lo == 0.0 and hi == 0.0:
        lo, hi = -1.0, 1.0
    if symmetric:
        hi = max(-lo, hi)
        if lo < 0:
            lo = -hi
    return lo, hi


def search_group(w, h, bits, symmetric, integer_zero):
    """The scale search of one group (`grid2_s_best_zp`). Returns (objective, s, z).

    Candidates: s0 · k/64 (k = 1..64) with s0 the min-max scale, then
    s_best ± j · s0/2048 (j = 1..16), keeping the lowest L·s². Symmetric:
    z is fixed at qmin (w^ = s·q, q signed). NeUQI_int: s0 · k/2048
    (k = 1..2048) with the integer z enumerated. The continuous search also
    weighs min-max itself (s0, z = lo/s0), so it never ends above it.
    """
    n = 2**bits
    qmin = -(2 ** (bits - 1))
    lo, hi = minmax_range(w, symmetric)
    s0 = (hi - lo) / (n - 1)
    if symmetric:
        def candidate(s):
            return exact_objective(w / s, h, float(qmin), n) * s * s, float(qmin)
    elif integer_zero:
        def candidate(s):
            return best_integer_zero(w, h, s, n)
    else:
        def candidate(s):
            return best_zero(w, h, s, n)

    best, sb, zb = np.inf, s0, 0.0
    coarse = INT_STEPS if integer_zero and not symmetric else COARSE_STEPS
    for k in range(1, coarse + 1):
        s = s0 * k / coarse
        value, z = candidate(s)
        if value < best:
            best, sb, zb = value, s, z
    if integer_zero and not symmetric:
        return best, sb, zb
    centre = sb
    for j in range(-FINE_STEPS, FINE_STEPS + 1):
        s = centre + j * s0 / FINE_DENOM
        if j == 0 or not s > 0:
            continue
        value, z = candidate(s)
        if value < best:
            best, sb, zb = value, s, z
    if not symmetric:
        zmm = lo / s0
        value = exact_objective(w / s0, h, zmm, n) * s0 * s0
        if value < best:
            best, sb, zb = value, s0, zmm
    return best, sb, zb


def neuqi_params(W, bits, group_size, symmetric, hdiag=None, integer_zero=False):
    """NeUQI's (S, Z) of every row and group, in this library's signed convention.

    Args:
        W: float32 (m, n), finite. bits: 2..8. group_size: -1 or positive (a shorter last group
            when it does not divide n).
        symmetric: Z = 0 and only the scale is searched.
        hdiag: float64 (n,), >= 0: per-column weights (the damped Hessian
            diagonal), normalised to sum 1 per group; None: equal weights.
        integer_zero: NeUQI_int.
    Returns:
        S, Z: float32 (m, G), with S = s and Z = s·(z − qmin), so that a code
        q in [qmin, qmax] dequantises to S·q + Z (symmetric: Z = 0);
        obj: float64 (m, G), each group's Σ h (w − ŵ)² at the float64 (s, z).
    """
    m, n = _checks.weight(W)
    bits = _checks.bits(bits)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    integer_zero = _checks.flag("integer_zero", integer_zero)
    if hdiag is not None:
        _checks.array(hdiag, "hdiag", np.float64, 1)
        _checks.shape(hdiag, "hdiag", (n,), "one weight per input feature")
        _checks.finite(hdiag, "hdiag")
        if np.any(hdiag < 0):
            raise ValueError("hdiag must be >= 0")
    G = _checks.num_groups(n, g)
    qmin = -(2 ** (bits - 1))
    S = np.zeros((m, G), np.float32)
    Z = np.zeros((m, G), np.float32)
    obj = np.zeros((m, G), np.float64)
    for j in range(G):
        cols = slice(j * g, min((j + 1) * g, n))  # the last group may be short
        width = cols.stop - cols.start
        h = np.ones(width) if hdiag is None else hdiag[cols].astype(np.float64)
        h = h / h.sum() if h.sum() > 0 else np.full(width, 1.0 / width)
        for r in range(m):
            w = W[r, cols].astype(np.float64)
            value, s, z = search_group(w, h, bits, symmetric, integer_zero)
            S[r, j] = np.float32(s)
            Z[r, j] = 0.0 if symmetric else np.float32(s * (z - qmin))
            obj[r, j] = value
    return S, Z, obj
