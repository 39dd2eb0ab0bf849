"""NumPy twins of the BCQ entry points of ``decoupleq._C``.

Same names and arguments as the C functions; written from the layout in the
docstring of ``decoupleq/bcq.py`` (steps of 8 columns, blocks of 8 lane-words,
``32 // bits`` slots per word), for clarity rather than speed.
"""
from __future__ import annotations

import numpy as np

__all__ = ["bcq_dequantize_packed", "bcq_pack", "bcq_packed_matmul", "bcq_unpack"]


def _geometry(bits: int, n: int):
    slots = 32 // bits
    steps = -(-n // 8)
    nblk = -(-steps // slots)
    return slots, nblk


def bcq_pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``(m, n)`` indices -> uint32 ``(m, row_words)``."""
    indices = np.asarray(indices)
    if indices.size and int(indices.max()) >= 1 << bits:
        raise ValueError(f"indices outside [0, {(1 << bits) - 1}]")
    m, n = indices.shape
    slots, nblk = _geometry(bits, n)
    # k per (row, block, slot, lane), zero-padded to whole blocks
    k = np.zeros((m, nblk * slots * 8), np.uint32)
    k[:, :n] = indices
    k = k.reshape(m, nblk, slots, 8)
    words = np.zeros((m, nblk, 8), np.uint32)
    for s in range(slots):
        words |= k[:, :, s, :] << np.uint32(bits * s)
    return words.reshape(m, nblk * 8)


def bcq_unpack(packed: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """uint32 packed words -> uint8 ``(m, in_features)`` indices."""
    packed = np.asarray(packed, np.uint32)
    m = packed.shape[0]
    slots, nblk = _geometry(bits, in_features)
    words = packed.reshape(m, nblk, 1, 8)
    shifts = (bits * np.arange(slots, dtype=np.uint32)).reshape(1, 1, slots, 1)
    k = (words >> shifts) & np.uint32((1 << bits) - 1)
    return k.reshape(m, -1)[:, :in_features].astype(np.uint8)


def _levels(alpha: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    k = np.arange(1 << bits)
    acc = np.zeros(offset.shape + (k.size,), np.float32)
    for i in range(bits):
        sign = np.where((k >> (bits - 1 - i)) & 1, -1.0, 1.0).astype(np.float32)
        acc = acc + alpha[:, :, i : i + 1].astype(np.float32) * sign
    return acc + offset.astype(np.float32)[:, :, None]


def bcq_dequantize_packed(packed, alpha, offset, bits: int, in_features: int, group_size: int,
                          threads: int = 0, kernel=None) -> np.ndarray:
    """float32 ``(m, in_features)``: the level of every index (``threads``/``kernel`` ignored)."""
    idx = bcq_unpack(packed, bits, in_features)
    m, n = idx.shape
    G = 1 if group_size == -1 else n // group_size
    lv = _levels(np.asarray(alpha), np.asarray(offset), bits)
    return np.take_along_axis(lv, idx.reshape(m, G, n // G).astype(np.intp), axis=2).reshape(m, n)


def bcq_packed_matmul(x, packed, alpha, offset, bits: int, in_features: int, group_size: int,
                      out=None, threads: int = 0, kernel=None, tile_rows: int = 0) -> np.ndarray:
    """float32 ``(batch, m)``: ``x @ W_hat.T``, summed in float64 then rounded once."""
    w = bcq_dequantize_packed(packed, alpha, offset, bits, in_features, group_size)
    y = (np.asarray(x, np.float64) @ w.astype(np.float64).T).astype(np.float32)
    if out is not None:
        out[...] = y
        return out
    return y
