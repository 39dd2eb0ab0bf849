"""NumPy twin of the C Hessian accumulator and of ``damp`` (ALGORITHM 1.1).

Everything is summed in float64 from the inputs widened to float64, so the
products are exact and this is the yardstick the C float32 path is held to.
Input checking is shared with the C-backed class (``decoupleq.hessian.prepare_batch``)
so both accept and reject exactly the same inputs.
"""
from __future__ import annotations

import numpy as np

from ..hessian import DEFAULT_FLUSH_TOKENS, prepare_batch


class HessianAccumulator:
    """Same interface and semantics as ``decoupleq.HessianAccumulator``.

    ``flush_tokens`` is accepted for signature parity and ignored: the
    reference has no float32 partial sum.
    """

    def __init__(self, n_features: int, *, skip_nonfinite: bool = False,
                 flush_tokens: int = DEFAULT_FLUSH_TOKENS):
        if isinstance(n_features, (bool, np.bool_)) or not isinstance(n_features, (int, np.integer)):
            raise TypeError(f"n_features must be an int, got {type(n_features).__name__}")
        if not 1 <= n_features <= 2**28:
            raise ValueError(f"n_features must be in [1, 2^28], got {n_features}")
        if isinstance(flush_tokens, (bool, np.bool_)) or not isinstance(flush_tokens, (int, np.integer)):
            raise TypeError(f"flush_tokens must be an int, got {type(flush_tokens).__name__}")
        if not 1 <= flush_tokens <= 2**31 - 1:
            raise ValueError(f"flush_tokens must be in [1, {2**31 - 1}], got {flush_tokens}")
        self._n = int(n_features)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.flush_tokens = int(flush_tokens)
        self._S = np.zeros((self._n, self._n))
        self.n_tokens = 0
        self.n_skipped = 0
        self.total_weight = 0.0

    @property
    def n_features(self) -> int:
        return self._n

    def add(self, X, mask=None, weights=None) -> None:
        """Accumulate ``sum_t w_t x_t x_tᵀ`` over the counted tokens (w_t > 0)."""
        X2, w, seq_len = prepare_batch(X, self._n, mask, weights)
        X64 = X2.astype(np.float64)
        if w is None:
            w = np.ones(X64.shape[0])
        counted = w > 0
        bad = counted & ~np.isfinite(X64).all(axis=1)
        if bad.any() and not self.skip_nonfinite:
            k = int(np.flatnonzero(bad)[0])
            where = f"at token [{k // seq_len}, {k % seq_len}]" if seq_len else f"in row {k}"
            raise ValueError(f"X contains NaN or Inf {where}; nothing was accumulated")
        keep = counted & ~bad
        Xk, wk = X64[keep], w[keep]
        self._S += (Xk * wk[:, None]).T @ Xk
        self.n_tokens += int(keep.sum())
        self.n_skipped += int(bad.sum())
        self.total_weight += float(wk.sum())

    def hessian(self) -> np.ndarray:
        """``sum_t w_t x_t x_tᵀ / sum_t w_t`` as a new float64 (n, n) array."""
        if self.n_tokens == 0:
            raise ValueError(
                f"the accumulator holds no tokens (n_tokens = 0, n_skipped = {self.n_skipped}): "
                "the mean Hessian is undefined; add() some inputs first"
            )
        H = self._S / self.total_weight
        # Symmetric by construction up to rounding of the two triangles.
        return np.triu(H) + np.triu(H, 1).T


def damp(H, percdamp):
    """H00 = H + percdamp * mean(diag H) * I, or H + percdamp * I if diag H is all zero.

    Same checks as the C ``damp``: H a float64 ndarray, square, finite, with a
    nonnegative diagonal; percdamp finite and >= 0; not both an all-zero
    diagonal and percdamp == 0.
    """
    percdamp = float(percdamp)
    if not (np.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp must be finite and >= 0, got {percdamp!r}")
    if not isinstance(H, np.ndarray):
        raise TypeError(f"H must be a numpy.ndarray, got {type(H).__name__}")
    if H.dtype != np.float64:
        raise TypeError(f"H must have dtype float64, got {H.dtype}")
    if H.ndim != 2:
        raise ValueError(f"H must be 2-dimensional, got {H.ndim} dimensions")
    if H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square matrix, got shape {H.shape}")
    if not np.isfinite(H).all():
        raise ValueError("H contains NaN or Inf")
    d = np.diag(H)
    if (d < 0).any():
        k = int(np.flatnonzero(d < 0)[0])
        raise ValueError(f"H has a negative diagonal entry H[{k}, {k}] = {d[k]:g}: not a Hessian")
    if not d.any():
        if percdamp == 0:
            raise ValueError("H has an all-zero diagonal and percdamp is 0: the damped matrix "
                             "would be singular (give percdamp > 0)")
        lam = percdamp
    else:
        lam = percdamp * d.mean()
    return H + lam * np.eye(H.shape[0])
