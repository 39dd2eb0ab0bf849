"""Closed-form float step: the least-squares (S, Z) for fixed codes A (ALGORITHM 3.6).

For one row with codes a and weights w, the dequantised row is B θ, where the
design matrix B (n x 2G) has, for group j, the column a ⊙ 1[γ(c) = j] (its scale)
and the column 1[γ(c) = j] (its zero), and θ = (s_1..s_G, z_1..z_G). Minimising
(Bθ - w) H (Bθ - w)ᵀ gives the normal equations P θ = y with P = Bᵀ H B and
y = Bᵀ H wᵀ, whose blocks are the P11, P12, P22, y1, y2 of the spec. All of it
is float64; only the solution is cast to float32.
"""
from __future__ import annotations

import numpy as np

from . import _checks
from ._checks import num_groups
from .grid import F32, _row_errors, group_starts, safe_div

DET_GUARD = 1e-5        # absolute |det| floor of the 2x2 path (reference value)
RETRY_DAMP = 0.01       # fraction of mean(diag P_r) added when a row's LU solve fails


class _NonFinite(ValueError):
    pass


def _guard_det(det):
    """|det| < 1e-5 -> sign(det) * 1e-5 with sign(0) = +1."""
    small = np.abs(det) < DET_GUARD
    return np.where(small, np.where(det < 0, -DET_GUARD, DET_GUARD), det)


def _per_channel(W64, A64, H, symmetric):
    """G = 1: the 2x2 normal equations in closed form, every row at once."""
    AH = A64 @ H
    WH = W64 @ H
    p1 = np.sum(AH * A64, axis=1)        # a H aᵀ
    p3 = np.sum(WH * A64, axis=1)        # w H aᵀ
    if symmetric:
        return safe_div(p3, p1)[:, None], np.zeros((W64.shape[0], 1))
    p2 = np.sum(AH, axis=1)              # a H 1
    p6 = np.sum(WH, axis=1)              # w H 1
    p5 = np.sum(H)                       # 1ᵀ H 1
    det = _guard_det(p1 * p5 - p2 * p2)
    s = (p3 * p5 - p2 * p6) / det
    z = (p1 * p6 - p2 * p3) / det
    return s[:, None], z[:, None]


def _solve_with_retry(P, y):
    """Symmetrise P, LU-solve; on a singular P add 0.01 * mean(diag P) and solve again."""
    P = (P + P.T) / 2
    try:
        return np.linalg.solve(P, y)
    except np.linalg.LinAlgError:
        pass
    Pd = P + RETRY_DAMP * np.mean(np.diag(P)) * np.eye(P.shape[0])
    try:
        return np.linalg.solve(Pd, y)
    except np.linalg.LinAlgError:
        raise _NonFinite("float_step: the normal equations of a row are singular even after damping")


def normal_equations(W64, A64, H, g):
    """P (m, 2G, 2G) and y (m, 2G) of every row, assembled from the H blocks.

    For group j, U_j = A[:, j] H[j, :] (m x n); P11[:, j, k] is the segment
    sum over group k of U_j ⊙ A, P12[:, j, k] the segment sum of U_j, and
    P22[j, k] = 1ᵀ H_jk 1 (the same for every row). y1, y2 are segment sums of
    V ⊙ A and V with V = W H. This is exactly Bᵀ H B and Bᵀ H wᵀ per row.
    """
    m, n = W64.shape
    G = num_groups(n, g)
    starts = group_starts(n, g)

    def segsum(X):                   # (..., n) -> (..., G): sum over each group's columns
        return np.add.reduceat(X, starts, axis=-1)  # the last group may be short

    P = np.empty((m, 2 * G, 2 * G))
    for j in range(G):
        cols = slice(j * g, min((j + 1) * g, n))
        U = A64[:, cols] @ H[cols, :]
        P[:, j, :G] = segsum(U * A64)
        P[:, j, G:] = segsum(U)
    P22 = segsum(segsum(H).T).T      # (G, G): 1ᵀ H_jk 1
    P[:, G:, :G] = np.transpose(P[:, :G, G:], (0, 2, 1))
    P[:, G:, G:] = P22
    V = W64 @ H
    y = np.concatenate([segsum(V * A64), segsum(V)], axis=1)
    return P, y


def _per_group(W64, A64, H, g, symmetric):
    m, n = W64.shape
    G = num_groups(n, g)
    P, y = normal_equations(W64, A64, H, g)
    S = np.empty((m, G))
    Z = np.zeros((m, G))
    for r in range(m):
        if symmetric:
            # Only the G scales are unknowns (our extension; the reference asserts).
            S[r] = _solve_with_retry(P[r, :G, :G], y[r, :G])
        else:
            theta = _solve_with_retry(P[r], y[r])
            S[r], Z[r] = theta[:G], theta[G:]
    return S, Z


def _float_step(W, A, H00, g, symmetric):
    n = W.shape[1]
    H = (H00 + H00.T) / 2
    W64 = W.astype(np.float64)
    A64 = A.astype(np.float64)
    if g == n:
        S, Z = _per_channel(W64, A64, H, symmetric)
    else:
        S, Z = _per_group(W64, A64, H, g, symmetric)
    with np.errstate(over="ignore"):
        S = np.ascontiguousarray(S, F32)
        Z = np.ascontiguousarray(Z, F32)
    if not (np.all(np.isfinite(S)) and np.all(np.isfinite(Z))):
        raise _NonFinite("float_step: a NaN or Inf appeared in the solution")
    if symmetric:
        Z[:] = 0
    return S, Z, _row_errors(W, A, S, Z, H00, g)


def float_step(W, A, H00, group_size, symmetric):
    """Least-squares scales and zeros for fixed codes, per row (ALGORITHM 3.6).

    Per-channel (G = 1), with H = (H00 + H00ᵀ)/2 in float64:
      asymmetric: p1 = aHaᵀ, p2 = aH1, p5 = 1ᵀH1, p3 = wHaᵀ, p6 = wH1,
        det = p1 p5 - p2², replaced by sign(det)·1e-5 if |det| < 1e-5
        (sign(0) = +1; absolute, as in the reference),
        s = (p3 p5 - p2 p6)/det, z = (p1 p6 - p2 p3)/det;
      symmetric: s = (wHaᵀ) ⊘ (aHaᵀ), z = 0.
    Per-group (G > 1): P θ = y (see normal_equations), P symmetrised, LU solve
      in float64; a row whose LU fails on an exactly singular P is solved again
      with 0.01·mean(diag P_r) added to its diagonal. Symmetric with groups is
      supported (the reference asserts): only the G scales are solved for,
      P11 s = y1 with the same retry, and z = 0.
    The solution is cast to float32 and the row errors are recomputed with
    row_errors (float32 GEMM, float64 sums). P, y and the 2x2 coefficients
    are formed in float64 (the reference forms them in float32 and solves the
    per-group system in float64): the same solution, more accurately.

    Args:
        W: float32 (m, n). A: int8 (m, n). H00: float64 (n, n) damped Hessian.
        group_size: -1 or positive (the last group is shorter when it does not
            divide n; its block of P sums over its own columns). symmetric: bool.
    Returns:
        S, Z: float32 (m, G), G = ceil(n / group_size); err: float64 (m,).
    Raises:
        ValueError: if the solution is not finite (the reference's fatal error)
            or a row stays singular after the retry.
    """
    m, n = _checks.weight(W)
    _checks.codes(A, m, n)
    _checks.hessian(H00, n, W)
    g = _checks.group_size(group_size, n)
    symmetric = _checks.flag("symmetric", symmetric)
    return _float_step(W, A, H00, g, symmetric)
