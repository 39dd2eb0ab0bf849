"""NumPy twins of the packed-format entry points of ``decoupleq._C``.

Same names and arguments as the C functions; written from the layout in
``decoupleq/packing.py`` (steps of 8 columns, lane-words of 8 uint32, slots
per bit width), for clarity rather than speed.
"""
from __future__ import annotations

import numpy as np

__all__ = ["dequantize_packed", "pack_codes", "packed_matmul", "unpack_codes"]


def _lane_words(bits: int, steps: int) -> int:
    if bits == 2:
        return -(-steps // 16)
    if bits == 4:
        return -(-steps // 8)
    r = steps % 32
    return 3 * (steps // 32) + (0 if r == 0 else 3 if r > 30 else -(-r // 10))


def _slot_bit_3(k: int) -> int:
    """First bit of slot k (0..9) of a 3-bit word: 5 slots per 16-bit half."""
    return 3 * k if k < 5 else 16 + 3 * (k - 5)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int8 ``(out, in)`` codes -> uint32 ``(out, row_words)`` packed words."""
    codes = np.asarray(codes)
    out, n = codes.shape
    qmin = -(2 ** (bits - 1))
    if codes.size and (codes.min() < qmin or codes.max() > -qmin - 1):
        raise ValueError(f"codes outside [{qmin}, {-qmin - 1}]")
    steps = -(-n // 8)
    lanes = _lane_words(bits, steps)
    per_block = {2: 16, 4: 8, 3: 32}[bits]
    nblk = -(-steps // per_block)
    # u per (row, step, lane), padded with zeros to whole blocks
    u = np.zeros((out, nblk * per_block * 8), np.uint32)
    u[:, :n] = (codes.astype(np.int16) - qmin).astype(np.uint32)
    u = u.reshape(out, nblk, per_block, 8)
    if bits in (2, 4):
        words = np.zeros((out, nblk, 8), np.uint32)
        for i in range(per_block):
            words |= u[:, :, i, :] << np.uint32(bits * i)
        words = words.reshape(out, nblk, 1, 8)
    else:
        words = np.zeros((out, nblk, 3, 8), np.uint32)
        for a in range(3):
            for k in range(10):
                words[:, :, a, :] |= u[:, :, 10 * a + k, :] << np.uint32(_slot_bit_3(k))
            words[:, :, a, :] |= ((u[:, :, 30, :] >> np.uint32(a)) & 1) << np.uint32(15)
            words[:, :, a, :] |= ((u[:, :, 31, :] >> np.uint32(a)) & 1) << np.uint32(31)
    words = words.reshape(out, -1, 8)[:, :lanes, :]
    return np.ascontiguousarray(words.reshape(out, lanes * 8))


def unpack_codes(packed: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """uint32 packed words -> int8 ``(out, in_features)`` codes."""
    packed = np.asarray(packed, np.uint32)
    out = packed.shape[0]
    qmin = -(2 ** (bits - 1))
    steps = -(-in_features // 8)
    lanes = _lane_words(bits, steps)
    if packed.shape[1] != 8 * lanes:
        raise ValueError(f"packed has {packed.shape[1]} words per row, expected {8 * lanes}")
    per_block = {2: 16, 4: 8, 3: 32}[bits]
    words_per_block = 3 if bits == 3 else 1
    nblk = -(-steps // per_block)
    w = np.zeros((out, nblk * words_per_block, 8), np.uint32)
    w[:, :lanes, :] = packed.reshape(out, lanes, 8)
    w = w.reshape(out, nblk, words_per_block, 8)
    u = np.zeros((out, nblk, per_block, 8), np.uint32)
    mask = np.uint32(2**bits - 1)
    if bits in (2, 4):
        for i in range(per_block):
            u[:, :, i, :] = (w[:, :, 0, :] >> np.uint32(bits * i)) & mask
    else:
        for a in range(3):
            for k in range(10):
                u[:, :, 10 * a + k, :] = (w[:, :, a, :] >> np.uint32(_slot_bit_3(k))) & mask
            u[:, :, 30, :] |= ((w[:, :, a, :] >> np.uint32(15)) & 1) << np.uint32(a)
            u[:, :, 31, :] |= ((w[:, :, a, :] >> np.uint32(31)) & 1) << np.uint32(a)
    u = u.reshape(out, -1)[:, :in_features]
    return (u.astype(np.int16) + qmin).astype(np.int8)


def dequantize_packed(packed, scale, zero, bits: int, in_features: int, group_size: int) -> np.ndarray:
    """float32 ``(out, in_features)``: ``code * s + z``, product and sum rounded in float32."""
    codes = unpack_codes(packed, bits, in_features).astype(np.float32)
    g = in_features if group_size == -1 else group_size
    # Group j covers columns j*g .. j*g + g - 1; the last one stops at in_features.
    s = np.repeat(np.asarray(scale).astype(np.float32), g, axis=1)[:, :in_features]
    w = codes * s
    if zero is not None:
        w = w + np.repeat(np.asarray(zero).astype(np.float32), g, axis=1)[:, :in_features]
    return w.astype(np.float32)


def packed_matmul(x, packed, scale, zero, bits: int, in_features: int, group_size: int) -> np.ndarray:
    """float32 ``(batch, out)``: ``x @ dequantize_packed(...).T`` summed in float64."""
    w = dequantize_packed(packed, scale, zero, bits, in_features, group_size)
    return (np.asarray(x, np.float64) @ w.astype(np.float64).T).astype(np.float32)
