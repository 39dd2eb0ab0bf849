"""A layer's Hessian from its calibration inputs (ALGORITHM 1.1), and its damping.

``HessianAccumulator`` streams token batches into ``H = sum_t w_t x_t x_tᵀ / sum_t w_t``
(the plain mean outer product ``(1/N) sum_t x_t x_tᵀ`` when unweighted) with
symmetric rank-k updates in the C core; ``damp`` turns H into the damped H00
every solver takes.

torch is never imported here: a tensor is recognised through ``sys.modules``,
so the module works (on NumPy input) without torch installed.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from . import _C

#: float32 tokens summed in float32 between two flushes into the float64 sum.
DEFAULT_FLUSH_TOKENS = 4096

__all__ = ["HessianAccumulator", "damp", "DEFAULT_FLUSH_TOKENS"]

# Exactly the dtypes the core reads, in native byte order.
_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _to_numpy(x, name: str) -> np.ndarray:
    """A NumPy view of ``x`` (a float32 copy for torch half types); never writes to it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {x.device}")
        t = x.detach().resolve_conj().resolve_neg()
        # NumPy has no bfloat16: widen both half types to float32 in torch.
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        try:
            return t.numpy()
        except TypeError as exc:
            raise TypeError(f"{name} has an unsupported torch dtype {t.dtype}") from exc
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy.ndarray or a CPU torch.Tensor, got {type(x).__name__}")


def _per_token(x, name: str, lead: tuple, what: str) -> np.ndarray:
    """``x`` (shape ``lead``, or flat with one entry per token) as a flat NumPy array."""
    a = _to_numpy(x, name)
    T = math.prod(lead)
    if a.shape != lead and a.shape != (T,):
        raise ValueError(
            f"{name} must have shape {lead} (one {what} per token of X), got shape {a.shape}"
        )
    return a.reshape(T)


def prepare_batch(X, n_features: int, mask=None, weights=None):
    """Check and convert one ``add`` call's inputs, before any work starts.

    Args:
        X: (T, n) or (batch, seq, n) float16/bfloat16/float32/float64 array or
            CPU torch tensor.
        n_features: the accumulator's n.
        mask: optional per-token boolean (or 0/1 integer) array, shape ``X.shape[:-1]``
            or (T,): False excludes a token.
        weights: optional per-token finite nonnegative floats, same shapes as mask.

    Returns:
        ``(X2, w, seq_len)``: ``X2`` a C-contiguous (T, n) float32 or float64
        array (a view of the caller's data when no conversion is needed; never
        written), ``w`` None or a new float64 (T,) array of effective weights
        (``mask * weights``), and ``seq_len`` (the seq dimension of 3-D input,
        else 0) for error messages.

    Raises:
        TypeError: X, mask or weights of a non-array type or a wrong dtype.
        ValueError: wrong rank or shape, mask values other than 0/1, weights
            negative or not finite. Messages name the argument.
    """
    a = _to_numpy(X, "X")
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"X must hold floats (float16, bfloat16, float32 or float64), got dtype {a.dtype}"
        )
    if a.ndim not in (2, 3):
        raise ValueError(
            f"X must be 2-D (tokens, n_features) or 3-D (batch, seq, n_features), got shape {a.shape}"
        )
    if a.shape[-1] != n_features:
        raise ValueError(
            f"X has {a.shape[-1]} features in its last dimension (shape {a.shape}), "
            f"expected n_features {n_features}"
        )
    lead = tuple(a.shape[:-1])
    T = math.prod(lead)
    X2 = np.require(a.reshape(T, n_features), requirements=["C", "A"])

    w = None
    if mask is not None:
        m = _per_token(mask, "mask", lead, "flag")
        if m.dtype != np.bool_:
            if m.dtype.kind not in "iu":
                raise TypeError(f"mask must be boolean (or 0/1 integers), got dtype {m.dtype}")
            if not ((m == 0) | (m == 1)).all():
                raise ValueError("mask must hold only 0/1 (or True/False) values")
        w = m.astype(np.float64)
    if weights is not None:
        wt = _per_token(weights, "weights", lead, "weight")
        if wt.dtype.kind not in "fiu":
            raise TypeError(f"weights must be a float or integer array, got dtype {wt.dtype}")
        wt = wt.astype(np.float64)
        bad = ~(np.isfinite(wt) & (wt >= 0))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            where = np.unravel_index(k, lead) if len(lead) > 1 else (k,)
            raise ValueError(
                f"weights must be finite and nonnegative, got weights[{', '.join(map(str, where))}]"
                f" = {float(wt[k])!r}"
            )
        w = wt if w is None else w * wt
    seq_len = lead[1] if len(lead) == 2 else 0
    return X2, w, seq_len


class HessianAccumulator:
    """Streaming mean outer product of a layer's input tokens.

    ``add`` batches of tokens, then ``hessian()`` returns
    ``H = sum_t w_t x_t x_tᵀ / sum_t w_t``, i.e. ``(1/N) sum_t x_t x_tᵀ`` without
    weights, as a new full symmetric float64 (n, n) array. Accumulation keeps
    going after ``hessian()``.

    Precision: float64 batches are summed in float64 (dsyrk). float32 batches
    (and float16/bfloat16, widened to float32) go through ssyrk into a float32
    partial sum that is added into the float64 total before it holds more than
    ``flush_tokens`` tokens; an entry's rounding error is then at most about
    ``(flush_tokens + 8) * 2**-24 * sum_t w_t |x_ti x_tj| / sum_t w_t``
    (typically ``sqrt(flush_tokens)`` times less). Smaller ``flush_tokens``
    is more precise and costs one n² pass per ``flush_tokens`` tokens.
    float32 tokens with an entry ``|x_i| sqrt(w) >= 2**48`` are summed in
    float64 so squares never overflow float32; products below float32's
    normal range (``|x_i x_j| < 1.2e-38``) lose relative precision.

    Non-finite tokens: by default a batch with a NaN/Inf in a counted token
    raises ValueError naming the row and nothing of that batch is
    accumulated; with ``skip_nonfinite=True`` such tokens are skipped and
    counted in ``n_skipped``. Masked (or zero-weight) tokens are neither
    checked nor counted.

    Threads: the heavy work runs without the GIL, so accumulators in different
    threads run in parallel. One accumulator must not be shared by threads
    (a concurrent call raises RuntimeError).

    Args:
        n_features: n, the layer's input width (>= 1).
        skip_nonfinite: skip tokens holding NaN/Inf instead of raising.
        flush_tokens: float32 tokens per flush into float64 (>= 1).
    """

    def __init__(self, n_features: int, *, skip_nonfinite: bool = False,
                 flush_tokens: int = DEFAULT_FLUSH_TOKENS):
        if isinstance(n_features, (bool, np.bool_)) or not isinstance(n_features, (int, np.integer)):
            raise TypeError(f"n_features must be an int, got {type(n_features).__name__}")
        if isinstance(flush_tokens, (bool, np.bool_)) or not isinstance(flush_tokens, (int, np.integer)):
            raise TypeError(f"flush_tokens must be an int, got {type(flush_tokens).__name__}")
        self._state = _C.hessian_new(int(n_features), skip_nonfinite=bool(skip_nonfinite),
                                     flush_tokens=int(flush_tokens))
        self._n = int(n_features)

    def add(self, X, mask=None, weights=None) -> None:
        """Accumulate a batch of tokens.

        Args:
            X: (T, n) or (batch, seq, n) tokens, a NumPy array or CPU torch
                tensor of float16, bfloat16, float32 or float64 (3-D is
                flattened to batch*seq tokens). Any T, including 0 and 1.
                Never modified.
            mask: optional per-token bool (or 0/1 int), shape ``X.shape[:-1]``
                or (T,); False tokens are excluded and not counted.
            weights: optional per-token finite nonnegative weights, same
                shapes as mask; token t contributes ``w_t x_t x_tᵀ`` and
                ``w_t`` to the normaliser. Combined with mask by product.

        Raises:
            TypeError / ValueError: bad input, naming the argument, before
                anything is accumulated; ValueError for a non-finite token
                unless ``skip_nonfinite`` (the accumulator is then unchanged).
        """
        if (mask is None and weights is None and type(X) is np.ndarray and X.ndim == 2
                and X.dtype in _NATIVE_FLOATS and X.flags.c_contiguous and X.flags.aligned):
            # Already what the core takes (it checks the width, naming X):
            # skip the conversions, which would dominate one-token adds.
            _C.hessian_add(self._state, X)
            return
        X2, w, seq_len = prepare_batch(X, self._n, mask, weights)
        _C.hessian_add(self._state, X2, w, seq_len)

    def hessian(self) -> np.ndarray:
        """H as a new float64 (n, n) symmetric array.

        Raises:
            ValueError: if no token has been accumulated (the mean of nothing
                is undefined; returning zeros would hide an unused layer).
        """
        return _C.hessian_mean(self._state)

    def _stats(self) -> dict:
        return _C.hessian_stats(self._state)

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def n_tokens(self) -> int:
        """Tokens accumulated (masked, zero-weight and skipped tokens excluded)."""
        return self._stats()["n_tokens"]

    @property
    def n_skipped(self) -> int:
        """Counted tokens skipped for holding NaN/Inf (``skip_nonfinite=True``)."""
        return self._stats()["n_skipped"]

    @property
    def total_weight(self) -> float:
        """Sum of the accumulated tokens' weights (== n_tokens when unweighted)."""
        return self._stats()["total_weight"]

    @property
    def skip_nonfinite(self) -> bool:
        return self._stats()["skip_nonfinite"]

    @property
    def flush_tokens(self) -> int:
        return self._stats()["flush_tokens"]

    def __repr__(self) -> str:
        s = self._stats()
        return (f"HessianAccumulator(n_features={s['n_features']}, n_tokens={s['n_tokens']}, "
                f"n_skipped={s['n_skipped']})")


def damp(H, percdamp: float = 0.01) -> np.ndarray:
    """Damped Hessian H00 = H + percdamp * mean(diag H) * I (ALGORITHM 1.1).

    Dead inputs (H_cc == 0) thereby get a positive diagonal. If the whole
    diagonal is zero, H + percdamp * I is returned instead.

    Args:
        H: float64 (n, n) C-contiguous, finite, with a nonnegative diagonal
            (e.g. ``HessianAccumulator.hessian()``). Not modified.
        percdamp: finite, >= 0 (decoupleQ uses 0.01).

    Returns:
        A new float64 (n, n) array.

    Raises:
        TypeError: H not a float64 ndarray.
        ValueError: H not square, not finite, or with a negative diagonal
            entry; percdamp negative or not finite; an all-zero diagonal with
            percdamp == 0 (the result would be singular).
    """
    return _C.damp(H, percdamp)
