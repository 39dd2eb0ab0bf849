"""UniQuanF's unified initialisation of one weight matrix: the Python face of ``_C.bcq_init``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _C
from ._arrays import as_float_matrix, to_numpy

IMPLEMENTATIONS = ("c", "reference")


@dataclass
class UnifiedInit:
    """The initial UniQuanF quantizer of one (m, n) weight, G groups per row.

    ``w_hat = s * (level(idx) + delta + c - z)`` per row and group, with
    ``c = (2**bits - 1) / 2`` and ``level(k) = sum_i alpha_i beta_i(k)``.

    Attributes:
        scale: float32 (m, G), the uniform scale s (``delta1 = log s``).
        zero: float32 (m, G), the uniform zero z (float).
        alpha: float32 (m, G, bits), BCQ scales in the transformed domain, descending.
        delta: float32 (m, G), BCQ shift (0 unless the clipping search is off).
        indices: uint8 (m, n), each weight's level index.
        bits, group_size: as requested (group_size -1 for per-channel).
    """

    scale: np.ndarray
    zero: np.ndarray
    alpha: np.ndarray
    delta: np.ndarray
    indices: np.ndarray
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        """float32 (m, n): ``s (level + delta + c - z)`` per row and group."""
        return self.to_bcq().dequantize()

    def to_bcq(self):
        """The same weights as a ``BCQWeight`` (ALGORITHM 8 unification):
        ``alpha' = s alpha``, ``offset' = s (delta + c - z)``."""
        from .bcq import BCQWeight

        c = np.float32(((1 << self.bits) - 1) / 2)
        return BCQWeight(
            indices=self.indices,
            alpha=(self.scale[:, :, None] * self.alpha).astype(np.float32),
            offset=(self.scale * (self.delta + c - self.zero)).astype(np.float32),
            bits=self.bits,
            group_size=self.group_size,
        )


def unified_init(W, bits: int, group_size: int = -1, clip_steps: int = 1, iters: int = 15, hdiag=None,
                 *, impl: str = "c") -> UnifiedInit:
    """Initialise a UniQuanF quantizer for ``W`` (ALGORITHM 8 "Unified initialisation").

    Args:
        W: (m, n) weight, rows are output channels: a NumPy array or a CPU
            torch tensor of any float dtype (computed in float32). Not modified.
        bits: 2..8 (the UniQuanF method uses 2..4).
        group_size: -1 (per-channel) or a divisor of n.
        clip_steps: clipping ratios k/clip_steps tried (1: ratio 1 only; 0:
            ratio 1 with the BCQ shift fitted).
        iters: alternating refinements of the BCQ fit.
        hdiag: None (the paper's unweighted fit), or (n,) non-negative column
            weights, normally the diagonal of the layer's damped Hessian: the
            fit and the candidate choice then weigh each column's error by it.
        impl: ``"c"`` (the C core) or ``"reference"`` (the NumPy twin).

    Returns:
        A ``UnifiedInit``.

    Raises:
        TypeError / ValueError naming the argument (NaN or Inf in W included).
    """
    if impl == "c":
        fn = _C.bcq_init
    elif impl == "reference":
        from .reference.unified_init import bcq_init as fn
    else:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    W32 = as_float_matrix(W, "W", np.float32)
    d32 = None
    if hdiag is not None:
        # A float32 copy when a conversion is needed; the core checks shape, finiteness and sign.
        d32 = np.ascontiguousarray(to_numpy(hdiag, "hdiag"), dtype=np.float32)
    S, Z, alpha, delta, idx = fn(W32, bits, group_size, clip_steps=clip_steps, iters=iters, hdiag=d32)
    return UnifiedInit(S, Z, alpha, delta, idx, int(bits), int(group_size))
