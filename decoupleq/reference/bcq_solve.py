"""decoupleQ over BCQ levels, the NumPy twin of ``_C.bcq_solve`` (issue 13 item 4).

A BCQ weight (``decoupleq/bcq.py``) is, per row r and group j,

    w_hat[c] = sum_i alpha[j, i] beta_i(k_c) + offset[j],   k_c = indices[r, c].

With the indices fixed it is linear in the row's parameters
``theta = (alpha[j, 0..b-1], offset[j])`` for j = 0..G-1, ``w_hat = B theta``, with
the design matrix B (n x (b+1)G) holding in column (j, i) the sign plane
``beta_i`` on group j's columns (zero elsewhere) and in column (j, b) the group's
ones. The objective of decoupleQ, ``e = (w_hat - w) H (w_hat - w)^T``, is then a
least-squares problem in theta that couples the groups through H (the
decoupleQ float step with b planes instead of one code vector):

    P theta = y,   P = B^T H B,   y = B^T H w^T.

It is alternated with a GPTQ-style assignment of the indices (decoupleQ's
integer step): columns in act-order (decreasing diag H, ties by index; or in
natural order), each weight plus the error feedback of the columns before it
(through U, the upper Cholesky factor of (H + lambda I)^-1 in that order) takes
the nearest of its group's levels.

Schedule: a float step, then ``iters`` times (assignment, float step); after
every step each row keeps the state of lowest objective seen, so the returned
objective never exceeds the start's.

Details the C core follows:

- the solve is for the update ``d = theta - theta_cur`` (``P d = y - P theta_cur``);
  a parameter whose column is a linear combination of the group's earlier
  columns on the sign patterns the group uses (tested in the order delta,
  alpha_0, alpha_1, ...) keeps its current value: the objective is the same,
  and the group's unused levels stay where they were for the next assignment;
- the levels are rounded in float32 as the BCQ format specifies, and every
  objective is that of the float32 parameters;
- lambda is the first of decoupleQ's ladder (0.01, 0.1, 1, 10, 100) x mean(diag H)
  for which the factorisations succeed.
"""
from __future__ import annotations

import numpy as np

from . import _checks
from .gptq import DECOUPLEQ_LADDER, act_order_perm, inverse_upper_factor
from .unified_init import level_signs

MAX_BITS = 4


def levels(alpha: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float64 (m, G, 2^b) of the float32 levels ``((0 + s_0 a_0) + s_1 a_1) + ... + offset``."""
    b = alpha.shape[-1]
    signs = level_signs(b).astype(np.float32)
    acc = np.zeros(offset.shape + (1 << b,), np.float32)
    for i in range(b):
        acc = acc + alpha[:, :, i : i + 1] * signs[None, None, :, i]
    return (acc + offset[:, :, None]).astype(np.float64)


def dequantize(indices, alpha, offset) -> np.ndarray:
    """float64 (m, n): each weight's level."""
    m, n = indices.shape
    G = offset.shape[1]
    lv = levels(alpha, offset)
    return np.take_along_axis(lv, indices.reshape(m, G, n // G).astype(np.intp), axis=2).reshape(m, n)


def objective(W, H, indices, alpha, offset) -> np.ndarray:
    """float64 (m,): ``(w_hat - w) H (w_hat - w)^T`` per row."""
    D = dequantize(indices, alpha, offset) - W.astype(np.float64)
    return np.sum((D @ H) * D, axis=1)


def design_matrix(k: np.ndarray, bits: int, G: int) -> np.ndarray:
    """B (n, (bits+1) G) of one row with level indices k (n,): column j (bits+1) + i is
    beta_i(k) on group j's columns (i = bits: ones)."""
    n = k.shape[0]
    g = n // G
    signs = np.concatenate([level_signs(bits)[k], np.ones((n, 1))], axis=1)  # (n, bits+1)
    B = np.zeros((n, (bits + 1) * G))
    for j in range(G):
        cols = slice(j * g, (j + 1) * g)
        B[cols, j * (bits + 1) : (j + 1) * (bits + 1)] = signs[cols]
    return B


def undetermined(k: np.ndarray, bits: int, G: int) -> np.ndarray:
    """bool ((bits+1) G,): parameters the used sign patterns leave undetermined.

    Per group, over the distinct patterns it uses, the columns are tested in the
    order delta, alpha_0, alpha_1, ...; one that does not raise the rank is fixed.
    """
    g = k.shape[0] // G
    fixed = np.zeros((bits + 1) * G, dtype=bool)
    table = np.concatenate([level_signs(bits), np.ones((1 << bits, 1))], axis=1)
    for j in range(G):
        used = table[np.unique(k[j * g : (j + 1) * g])]  # (patterns, bits+1)
        kept = []
        for i in [bits] + list(range(bits)):
            if np.linalg.matrix_rank(used[:, kept + [i]]) > len(kept):
                kept.append(i)
            else:
                fixed[j * (bits + 1) + i] = True
    return fixed


def float_step(W, H, indices, alpha, offset):
    """Least-squares alpha and offset of every row for fixed indices (see the module docstring).

    Returns new float32 alpha (m, G, b) and offset (m, G); a row whose system
    cannot be solved, or whose result is not finite in float32, keeps its own.
    """
    m, n = W.shape
    G, b = alpha.shape[1], alpha.shape[2]
    V = W.astype(np.float64) @ H  # row r: (H w_r^T)^T
    alpha, offset = alpha.copy(), offset.copy()
    for r in range(m):
        B = design_matrix(indices[r].astype(np.intp), b, G)
        P = B.T @ H @ B
        y = B.T @ V[r]
        theta = np.concatenate([alpha[r], offset[r][:, None]], axis=1).reshape(-1).astype(np.float64)
        free = ~undetermined(indices[r].astype(np.intp), b, G)
        d = np.zeros_like(theta)
        try:
            d[free] = np.linalg.solve(P[np.ix_(free, free)], (y - P @ theta)[free])
        except np.linalg.LinAlgError:
            continue
        with np.errstate(over="ignore"):
            new = (theta + d).astype(np.float32).reshape(G, b + 1)
        if not np.all(np.isfinite(new)):
            continue
        alpha[r], offset[r] = new[:, :b], new[:, b]
    return alpha, offset


def assign(W, U, perm, alpha, offset) -> np.ndarray:
    """GPTQ sweep over the columns in the order ``perm`` (U in that order): uint8 (m, n)
    indices of the nearest level, with error feedback through U."""
    m, n = W.shape
    G = offset.shape[1]
    g = n // G
    lv = levels(alpha, offset)  # (m, G, L)
    w = W[:, perm].astype(np.float64)  # sweep order
    idx = np.empty((m, n), np.uint8)
    for c in range(n):
        L = lv[:, perm[c] // g, :]
        k = np.argmin(np.abs(w[:, c : c + 1] - L), axis=1)  # first index of the nearest level
        idx[:, perm[c]] = k
        e = (w[:, c] - L[np.arange(m), k]) / U[c, c]
        w[:, c + 1 :] = w[:, c + 1 :] - e[:, None] * U[c, c + 1 :]
    return idx


def bcq_solve(W, H00, indices, alpha, offset, bits: int, group_size: int, iters: int = 4, act_order: bool = True):
    """decoupleQ over BCQ levels from a start (indices, alpha, offset); see the module docstring.

    Args:
        W: float32 (m, n). H00: float64 (n, n), the damped Hessian.
        indices: uint8 (m, n), each < 2**bits. alpha: float32 (m, G, bits). offset: float32 (m, G).
        bits: 2..4. group_size: -1 or a divisor of n. iters: assignment + float step rounds.
        act_order: the sweep visits columns by decreasing diag H00 (else in natural order).

    Returns:
        indices, alpha, offset (the best state per row), err float64 (m,) its
        objective, history float64 (iters + 2,) of the summed best objective at
        the start, after the first float step and after each round.
    """
    m, n = _checks.weight(W)
    _checks.hessian(H00, n, W)
    bits = _checks.integer("bits", bits, 2, MAX_BITS)
    g = _checks.group_size(group_size, n)
    iters = _checks.integer("iters", iters, 0)
    G = n // g
    indices = np.asarray(indices)
    if indices.dtype != np.uint8 or indices.shape != (m, n):
        raise ValueError(f"indices must be uint8 of shape {(m, n)}, got {indices.dtype} {indices.shape}")
    if int(indices.max()) >= 1 << bits:
        raise ValueError(f"indices must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    alpha = np.array(alpha, dtype=np.float32)
    offset = np.array(offset, dtype=np.float32)
    if alpha.shape != (m, G, bits) or offset.shape != (m, G):
        raise ValueError(f"alpha must have shape {(m, G, bits)} and offset {(m, G)}, got {alpha.shape}, {offset.shape}")
    _checks.finite(alpha, "alpha")
    _checks.finite(offset, "offset")
    act_order = _checks.flag("act_order", act_order)
    H = np.asarray(H00, dtype=np.float64)
    perm = act_order_perm(H, act_order)
    U, _ = inverse_upper_factor(H[np.ix_(perm, perm)], DECOUPLEQ_LADDER)

    best = [indices.copy(), alpha.copy(), offset.copy()]
    best_err = objective(W, H, *best)
    history = [best_err.sum()]
    cur = [indices.copy(), alpha, offset]

    def keep_best():
        e = objective(W, H, *cur)
        better = e < best_err
        best_err[better] = e[better]
        for b_arr, c_arr in zip(best, cur):
            b_arr[better] = c_arr[better]

    for t in range(iters + 1):
        if t > 0:
            cur[0] = assign(W, U, perm, cur[1], cur[2])
            keep_best()
        cur[1], cur[2] = float_step(W, H, *cur)
        keep_best()
        history.append(best_err.sum())
    return best[0], best[1], best[2], best_err, np.array(history)
