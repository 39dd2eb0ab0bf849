"""Binary-coding quantized (BCQ) weights: the storage contract shared by UniQuanF and the BCQ layers.

Minimal copy of the contract: the BCQ storage branch owns this module and its
full version (packing, kernels) replaces this file at merge; names and
semantics here are the contract's, unchanged.

A BCQ weight has ``2**bits`` levels per row and group,
``level(k) = sum_i alpha_i * beta_i(k) + offset``, where ``beta_i(k)`` is +1
if bit ``bits-1-i`` of ``k`` is 0 and -1 otherwise (the cartesian product of
(+1, -1), first factor most significant: index 0 is all +1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def level_signs(bits: int) -> np.ndarray:
    """beta_i(k) for every level index k: float32 (2**bits, bits) of +-1."""
    k = np.arange(1 << bits)[:, None]
    shifts = bits - 1 - np.arange(bits)[None, :]
    return np.where((k >> shifts) & 1, -1.0, 1.0).astype(np.float32)


@dataclass
class BCQWeight:
    """One BCQ weight matrix.

    Attributes:
        indices: uint8 (m, n), each weight's level index in ``[0, 2**bits)``.
        alpha: float32 (m, G, bits), the per row and group scales.
        offset: float32 (m, G), the per row and group offset.
        bits: bit planes per weight.
        group_size: inputs sharing alpha and offset, ``-1`` for one group per
            row (G = n // group_size; the group size must divide n).
    """

    indices: np.ndarray
    alpha: np.ndarray
    offset: np.ndarray
    bits: int
    group_size: int

    def __post_init__(self):
        if self.indices.dtype != np.uint8 or self.indices.ndim != 2:
            raise TypeError(f"indices must be uint8 (m, n), got {self.indices.dtype} {self.indices.shape}")
        m, n = self.indices.shape
        g = n if self.group_size == -1 else self.group_size
        if g < 1 or n % g:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {n}")
        G = n // g
        if self.alpha.dtype != np.float32 or self.alpha.shape != (m, G, self.bits):
            raise ValueError(f"alpha must be float32 {(m, G, self.bits)}, got {self.alpha.dtype} {self.alpha.shape}")
        if self.offset.dtype != np.float32 or self.offset.shape != (m, G):
            raise ValueError(f"offset must be float32 {(m, G)}, got {self.offset.dtype} {self.offset.shape}")
        if self.indices.size and int(self.indices.max()) >= (1 << self.bits):
            raise ValueError(f"indices must be < 2**bits = {1 << self.bits}, got {int(self.indices.max())}")

    @property
    def shape(self) -> tuple:
        return self.indices.shape

    def dequantize(self) -> np.ndarray:
        """float32 (m, n): ``w[r, c] = sum_i alpha[r, c//g, i] * beta_i(indices[r, c]) + offset[r, c//g]``."""
        m, n = self.indices.shape
        G = self.alpha.shape[1]
        g = n // G
        # Levels per row and group, summed in plane order, then looked up.
        levels = np.zeros((m, G, 1 << self.bits), dtype=np.float32)
        signs = level_signs(self.bits)
        for i in range(self.bits):
            levels += self.alpha[:, :, i : i + 1] * signs[None, None, :, i]
        levels += self.offset[:, :, None]
        idx = self.indices.reshape(m, G, g).astype(np.int64)
        return np.take_along_axis(levels, idx, axis=2).reshape(m, n)
