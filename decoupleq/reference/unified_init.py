"""UniQuanF's unified initialisation (ALGORITHM 8), the NumPy twin of ``_C.bcq_init``.

Per row and group of ``W``:

1. min-max uniform quantizer: ``s = (max - min) / (2^b - 1)`` (at least 1e-8),
   ``z = -min / s``;
2. clipping ratios ``k / K`` for ``k = 1..K`` (``K = clip_steps``; the
   reference script uses ``K = 1``, only ratio 1). ``clip_steps = 0`` means no
   search (ratio 1) and the BCQ shift ``delta`` is fitted, as the reference
   does when its grid-search count is 0;
3. for each candidate, a BCQ fit of ``u = w/s + z - c`` (``c = (2^b - 1)/2``):
   greedy start, then ``iters`` refinements (alpha from the normal equations,
   ``|alpha|`` sorted descending, beta by exhaustive nearest level, delta);
4. the candidate with the lowest ``mean |w - w_hat|^2.4`` is kept, with
   ``w_hat = s (level + delta + c - z)``.

Choices where the reference code is loose, written down here:

- sign(0) is +1 in the greedy start, so every beta is +-1 (torch's sign
  gives 0 there, a pattern that is no level);
- the normal equations are solved exactly (Cholesky) instead of by b steps
  of conjugate gradient; a rank-deficient sign matrix (two planes equal or
  opposite, e.g. a constant group) gets a ridge of ``1e-6 g`` on the diagonal;
- the selection error is taken per row *and group* (each group has its own
  s, z and alpha), as the reference's reshaping into groups does.

Beyond the paper: optional column weights ``hdiag`` (the diagonal of the
layer's Hessian) make every mean above a weighted mean, the alpha fit a
weighted least-squares fit and the selection error a weighted mean; the
nearest level of each weight does not change. A group whose weights sum to 0
is fitted unweighted.

Every sum runs sequentially in column order (``np.cumsum``) and every
expression in the C core's order, so the C core returns the same indices and
float32 parameters.
"""
from __future__ import annotations

import numpy as np

from . import _checks

SCALE_FLOOR = 1e-8
PIVOT_TOL = 1e-10
RIDGE = 1e-6
SELECT_P = 2.4
MAX_BITS = 8


def level_signs(bits: int) -> np.ndarray:
    """beta_i of every level index k: float64 (2^bits, bits), +1 where bit (bits-1-i) of k is 0.

    Index 0 is all +1 (the cartesian product of (+1, -1), first factor most significant).
    """
    k = np.arange(1 << bits)[:, None]
    shifts = bits - 1 - np.arange(bits)[None, :]
    return np.where((k >> shifts) & 1, -1.0, 1.0)


def _seqsum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis, left to right (the C core's order; np.sum is pairwise)."""
    return np.cumsum(x, axis=-1)[..., -1]


def _levels(alpha: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """levels[..., k] = sum_i alpha[..., i] * beta_i(k), summed in i order. alpha (..., b)."""
    out = np.zeros(alpha.shape[:-1] + (signs.shape[0],))
    for i in range(signs.shape[1]):
        out = out + alpha[..., i : i + 1] * signs[None, :, i]
    return out


def _nearest(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """First index of the nearest level. v (U, g), levels (U, L) -> int (U, g)."""
    return np.argmin(np.abs(v[:, :, None] - levels[:, None, :]), axis=-1)


def _chol_solve(A: np.ndarray, rhs: np.ndarray):
    """Cholesky solve of U systems A (U, b, b) x = rhs (U, b).

    Returns (x, ok): ok is False where a pivot is not above PIVOT_TOL times its
    diagonal entry (x is then meaningless for that system).
    """
    U, b, _ = A.shape
    L = np.zeros_like(A)
    ok = np.ones(U, dtype=bool)
    for i in range(b):
        for j in range(i + 1):
            s = A[:, i, j].copy()
            for k in range(j):
                s = s - L[:, i, k] * L[:, j, k]
            if i == j:
                good = s > PIVOT_TOL * A[:, i, i]
                ok &= good
                L[:, i, i] = np.sqrt(np.where(good, s, 1.0))
            else:
                L[:, i, j] = s / L[:, j, j]
    y = np.zeros((U, b))
    for i in range(b):
        s = rhs[:, i].copy()
        for k in range(i):
            s = s - L[:, i, k] * y[:, k]
        y[:, i] = s / L[:, i, i]
    x = np.zeros((U, b))
    for i in range(b - 1, -1, -1):
        s = y[:, i].copy()
        for k in range(i + 1, b):
            s = s - L[:, k, i] * x[:, k]
        x[:, i] = s / L[:, i, i]
    return x, ok


def bcq_fit(u: np.ndarray, d: np.ndarray, bits: int, iters: int, fit_shift: bool):
    """BCQ fit of U independent vectors u float64 (U, g) under weights d float64 (U, g).

    Returns (alpha float64 (U, bits), delta float64 (U,), idx int64 (U, g)).
    """
    U, g = u.shape
    L = 1 << bits
    signs = level_signs(bits)
    sum_d = _seqsum(d)
    # Greedy: each plane takes the residual's signs and (weighted) mean magnitude.
    r = u.copy()
    alpha = np.zeros((U, bits))
    idx = np.zeros((U, g), dtype=np.int64)
    for i in range(bits):
        a = _seqsum(d * np.abs(r)) / sum_d
        alpha[:, i] = a
        neg = r < 0
        r = np.where(neg, r + a[:, None], r - a[:, None])
        idx |= neg.astype(np.int64) << (bits - 1 - i)
    delta = np.zeros(U)

    for _ in range(iters):
        beta = signs[idx]  # (U, g, b)
        v = u - delta[:, None]
        dv = d * v
        rhs = np.stack([_seqsum(beta[:, :, i] * dv) for i in range(bits)], axis=1)
        # B^T D B from the total weight of each sign pattern (bincount adds in element order).
        wsum = np.stack([np.bincount(k, weights=w, minlength=L) for k, w in zip(idx, d)])
        A = np.zeros((U, bits, bits))
        for k in range(L):
            A = A + wsum[:, k, None, None] * np.outer(signs[k], signs[k])[None]
        x, ok = _chol_solve(A, rhs)
        if not ok.all():
            bad = ~ok
            Ar = A[bad] + (RIDGE * sum_d[bad])[:, None, None] * np.eye(bits)[None]
            xr, ok_r = _chol_solve(Ar, rhs[bad])
            x[bad] = np.where(ok_r[:, None], xr, alpha[bad])
        alpha = -np.sort(-np.abs(x), axis=1)
        levels = _levels(alpha, signs)
        idx = _nearest(v, levels)
        if fit_shift:
            delta = _seqsum(d * (u - np.take_along_axis(levels, idx, axis=1))) / sum_d
    return alpha, delta, idx


def bcq_init(W: np.ndarray, bits: int, group_size: int, clip_steps: int = 1, iters: int = 15, hdiag=None):
    """UniQuanF's unified initialisation of every row and group of ``W``.

    Args:
        W: float32 (m, n), finite.
        bits: 2..8.
        group_size: -1 (per-channel) or a divisor of n.
        clip_steps: K >= 0, the clipping ratios k/K tried (0: ratio 1, shift fitted).
        iters: T >= 0 alternating refinements of the BCQ fit.
        hdiag: None, or float32 (n,) finite column weights >= 0.

    Returns:
        S, Z float32 (m, G): uniform scale and zero;
        alpha float32 (m, G, bits): BCQ scales, descending;
        delta float32 (m, G): BCQ shift (0 unless clip_steps == 0);
        idx uint8 (m, n): level index of each weight.
    """
    W = _checks.array(W, "W", np.float32, 2)
    bits = _checks.integer("bits", bits, 2, MAX_BITS)
    clip_steps = _checks.integer("clip_steps", clip_steps, 0)
    iters = _checks.integer("iters", iters, 0)
    m, n = W.shape
    if m < 1 or n < 1:
        raise ValueError(f"W must have at least one row and one column, got shape {W.shape}")
    group_size = _checks.integer("group_size", group_size)
    if group_size == -1:
        g = n
    elif group_size < 1:
        raise ValueError(f"group_size must be -1 (per-channel) or positive, got {group_size}")
    elif n % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {n}")
    else:
        g = group_size
    _checks.finite(W, "W")
    if hdiag is not None:
        hdiag = _checks.array(hdiag, "hdiag", np.float32, 1)
        if hdiag.shape != (n,):
            raise ValueError(f"hdiag must have shape ({n},) to match W's columns, got {hdiag.shape}")
        _checks.finite(hdiag, "hdiag")
        if np.any(hdiag < 0):
            raise ValueError("hdiag must be >= 0")
    G = n // g
    c = float((1 << bits) - 1) / 2.0
    w = W.reshape(m * G, g)
    w64 = w.astype(np.float64)
    lo = w.min(axis=1).astype(np.float64)
    hi = w.max(axis=1).astype(np.float64)
    s0 = np.maximum((hi - lo) / float((1 << bits) - 1), SCALE_FLOOR)
    if hdiag is None:
        d = np.ones((m * G, g))
    else:
        d = np.tile(hdiag.astype(np.float64).reshape(G, g), (m, 1))
        d[_seqsum(d) <= 0] = 1.0  # a group with no weight is fitted unweighted
    sum_d = _seqsum(d)
    K = max(clip_steps, 1)
    fit_shift = clip_steps == 0
    best = None
    for k in range(1, K + 1):
        s = (s0 * float(k) / float(K)).astype(np.float32)
        z = (-lo / s.astype(np.float64)).astype(np.float32)
        s64, z64 = s.astype(np.float64)[:, None], z.astype(np.float64)[:, None]
        u = w64 / s64 + z64 - c
        alpha, delta, idx = bcq_fit(u, d, bits, iters, fit_shift)
        levels = _levels(alpha, level_signs(bits))
        what = s64 * (np.take_along_axis(levels, idx, axis=1) + delta[:, None] + c - z64)
        err = _seqsum(d * np.abs(w64 - what) ** SELECT_P) / sum_d
        if best is None:
            best = [err, s, z, alpha, delta, idx]
            continue
        take = err < best[0]
        best[0] = np.where(take, err, best[0])
        for j, new in enumerate((s, z, alpha, delta, idx), start=1):
            mask = take.reshape((-1,) + (1,) * (new.ndim - 1))
            best[j] = np.where(mask, new, best[j])
    _, s, z, alpha, delta, idx = best
    return (
        s.reshape(m, G),
        z.reshape(m, G),
        alpha.astype(np.float32).reshape(m, G, bits),
        delta.astype(np.float32).reshape(m, G),
        idx.astype(np.uint8).reshape(m, n),
    )
