"""Binary-coding quantization (BCQ) weights, and their packed layout.

This docstring is the specification of the BCQ packed layout. The C codec
(``csrc/dq_bcq_pack.c``), the kernels (``csrc/dq_kernels_bcq_*.c``), the NumPy
twin (``decoupleq/reference/bcq.py``), ``BCQLinear`` and saved models follow
it; a change here is a new ``FORMAT`` string.

Values
------
A BCQ weight of shape ``(m, n)`` with ``bits`` sign planes and groups of ``g``
columns (``G = n // g``; ``group_size == -1`` means one group per row) is

    w[r, c] = sum_i alpha[r, c // g, i] * beta_i(k) + offset[r, c // g],   k = indices[r, c]

with ``beta_i(k) = +1`` when bit ``bits - 1 - i`` of ``k`` is 0 and ``-1``
when it is 1 (plane 0 is the index's most significant bit). The level table
of a group is therefore ordered by the sign-pattern index: k = 0 is all
``+1``, k = 2**bits - 1 all ``-1``. In float32 the level is computed as
``((0 + s_0 alpha_0) + s_1 alpha_1) + ... + offset`` (``s_i = beta_i``): each
term is exact, every addition rounds once; ``BCQWeight.dequantize``, the C
kernels' level tables and ``BCQLinear.dequantize`` all round this way.

Packed layout "decoupleq-bcq-lanes8-v1"
----------------------------------------
- ``packed``: ``uint32`` ``(m, row_words)``, C order, little-endian words,
  bit 0 least significant; row r of the weight is row r of the array.
- A row's ``n`` columns are cut into steps of 8: column c is lane ``c % 8``
  of step ``t = c // 8``; ``steps = ceil(n / 8)``.
- ``slots = 32 // bits`` steps (32, 16, 10, 8 for 1-4 bits) share one block
  of 8 consecutive words, word j of a block holding lane j. Step t lies in
  block ``t // slots`` at slot ``s = t % slots``, bits
  ``[bits * s, bits * s + bits)`` of its lane's word, holding the index k.
  So the ``bits`` sign planes of a weight sit side by side, plane i at bit
  ``bits - 1 - i`` of the slot. At 3 bits the top 2 bits of every word are
  unused (3.2 stored bits per weight); padding slots past ``n`` are 0.
- ``row_words = 8 * ceil(steps / slots)`` (:func:`row_words`).
- ``alpha``: float32 ``(m, G, bits)``; ``offset``: float32 ``(m, G)``.

Why the planes are interleaved, not stored one plane after another: with a
slot's whole index in adjacent bits, an AVX2 kernel gets the level of 8
weights with one shift and one 8-entry table lookup (``vpermps``), then one
FMA, for 1 to 3 planes alike: the same three operations per 8 weights as the
uniform 2-bit kernel. Separate planes cost one masked sum per plane, i.e.
``bits`` times the work (see ``csrc/dq_kernels_bcq_avx2.c``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _C

__all__ = ["BCQWeight", "FORMAT", "MAX_BITS", "bcq_from_uniform", "bcq_linear", "bits_per_weight", "pack",
           "row_words", "unpack"]

FORMAT = "decoupleq-bcq-lanes8-v1"
MAX_BITS = 4


def level_signs(bits: int) -> np.ndarray:
    """beta_i(k) for every level index k: float32 (2**bits, bits) of +-1."""
    k = np.arange(1 << bits)[:, None]
    shifts = bits - 1 - np.arange(bits)[None, :]
    return np.where((k >> shifts) & 1, -1.0, 1.0).astype(np.float32)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def _check_group(group_size, n: int) -> int:
    """Groups per row for ``group_size`` over ``n`` columns (naming the argument on error)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        return 1
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {n}")
    return n // int(group_size)


def row_words(bits: int, in_features: int) -> int:
    """uint32 words per packed row for ``in_features`` columns at ``bits`` sign planes."""
    bits = _check_bits(bits)
    if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    steps = -(-int(in_features) // 8)
    return 8 * -(-steps // (32 // bits))


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``(m, n)`` level indices (each < 2**bits) -> uint32 ``(m, row_words(bits, n))``."""
    bits = _check_bits(bits)
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices must be a numpy.ndarray, got {type(indices).__name__}")
    return _C.bcq_pack(indices, bits)


def unpack(packed: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 ``(m, in_features)`` level indices."""
    return _C.bcq_unpack(packed, _check_bits(bits), in_features)


def _float_array(name: str, a, shape) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating-point dtype, got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values (NaN or Inf)")
    return arr


@dataclass
class BCQWeight:
    """A BCQ-quantized ``(m, n)`` weight (see the module docstring for the formula).

    Attributes:
        indices: uint8 ``(m, n)``, each in ``[0, 2**bits)``.
        alpha: float32 ``(m, G, bits)``, finite.
        offset: float32 ``(m, G)``, finite.
        bits: number of sign planes, 1..4.
        group_size: columns per group (dividing n), or -1 for one group per row.

    Creation validates everything and raises ``TypeError``/``ValueError``
    naming the field; arrays of another float dtype are converted to float32
    copies (the caller's arrays are never modified).
    """

    indices: np.ndarray
    alpha: np.ndarray
    offset: np.ndarray
    bits: int
    group_size: int

    def __post_init__(self):
        self.bits = _check_bits(self.bits)
        idx = self.indices
        if not isinstance(idx, np.ndarray):
            raise TypeError(f"indices must be a numpy.ndarray, got {type(idx).__name__}")
        if idx.dtype != np.uint8:
            raise TypeError(f"indices must have dtype uint8, got {idx.dtype}")
        if idx.ndim != 2 or idx.shape[1] < 1:
            raise ValueError(f"indices must be 2-D (m, n) with n >= 1, got shape {idx.shape}")
        m, n = idx.shape
        if idx.size and int(idx.max()) >= 1 << self.bits:
            r, c = np.unravel_index(int(np.argmax(idx >= 1 << self.bits)), idx.shape)
            raise ValueError(f"indices[{r}, {c}] = {idx[r, c]} is outside [0, {(1 << self.bits) - 1}] "
                             f"for bits={self.bits}")
        G = _check_group(self.group_size, n)
        self.group_size = int(self.group_size)
        self.indices = np.ascontiguousarray(idx)
        self.alpha = _float_array("alpha", self.alpha, (m, G, self.bits))
        self.offset = _float_array("offset", self.offset, (m, G))

    @property
    def shape(self) -> tuple:
        return tuple(self.indices.shape)

    @property
    def n_groups(self) -> int:
        return self.offset.shape[1]

    def levels(self) -> np.ndarray:
        """float32 ``(m, G, 2**bits)``: the level of each index, rounded as in the module docstring."""
        k = np.arange(1 << self.bits)
        acc = np.zeros(self.offset.shape + (k.size,), np.float32)
        for i in range(self.bits):
            sign = np.where((k >> (self.bits - 1 - i)) & 1, np.float32(-1), np.float32(1)).astype(np.float32)
            acc = acc + self.alpha[:, :, i : i + 1] * sign  # +-alpha exactly, one rounding per add
        return acc + self.offset[:, :, None]

    def dequantize(self) -> np.ndarray:
        """float32 ``(m, n)``: ``w[r, c]`` of the module docstring."""
        m, n = self.shape
        G = self.n_groups
        lv = self.levels()  # (m, G, L)
        idx = self.indices.reshape(m, G, n // G).astype(np.intp)
        return np.take_along_axis(lv, idx, axis=2).reshape(m, n)

    def pack(self) -> np.ndarray:
        """The indices in the packed layout: uint32 ``(m, row_words(bits, n))``."""
        return pack(self.indices, self.bits)

    def stored_bits_per_weight(self) -> float:
        """Bits per weight as packed (layout padding included) plus alpha and offset in float32."""
        return bits_per_weight(self.bits, self.shape[1], self.group_size)


def bits_per_weight(bits: int, in_features: int, group_size: int, param_bits: int = 32) -> float:
    """Bits per weight of a BCQ layer with ``in_features`` columns: its packed words (layout padding
    included) plus ``bits`` alphas and one offset per group at ``param_bits`` bits each (32: as stored)."""
    G = _check_group(group_size, in_features)
    return (32 * row_words(bits, in_features) + param_bits * G * (bits + 1)) / in_features


def bcq_from_uniform(codes, scale, zero, bits: int, group_size: int) -> BCQWeight:
    """A uniform layer ``w = q * s + z`` written as BCQ with fixed alpha.

    With ``u = q - qmin`` (``0 .. 2**b - 1``) and index ``k = qmax - q`` (the bit
    complement of u), ``q * s + z = sum_i (2**(b-2-i) s) beta_i(k) + (z - s/2)``
    exactly in real arithmetic (ALGORITHM section 8 note); in float32 the two
    agree to rounding (a few ulps of the weights' magnitude).

    Args:
        codes: int8 ``(m, n)`` in ``[-2**(bits-1), 2**(bits-1) - 1]``.
        scale, zero: float ``(m, G)`` (zero may be None: symmetric, z = 0).
        bits: 1..4 (the uniform layers use 2-4).
        group_size: as the uniform layer's (-1 per channel).

    Returns:
        ``BCQWeight`` with ``alpha[r, g, i] = 2**(bits-2-i) * scale[r, g]`` and
        ``offset = zero - scale / 2``.
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.int8:
        raise TypeError(f"codes must have dtype int8, got {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (m, n), got shape {codes.shape}")
    m, n = codes.shape
    G = _check_group(group_size, n)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.size and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ValueError(f"codes must lie in [{qmin}, {qmax}] for bits={bits}")
    s = _float_array("scale", scale, (m, G))
    z = np.zeros((m, G), np.float32) if zero is None else _float_array("zero", zero, (m, G))
    powers = np.array([2.0 ** (bits - 2 - i) for i in range(bits)], np.float32)
    alpha = s[:, :, None] * powers  # exact: powers of two
    offset = z - s * np.float32(0.5)
    indices = (qmax - codes.astype(np.int16)).astype(np.uint8)
    return BCQWeight(indices, alpha, offset, bits, group_size)


def bcq_linear(x: np.ndarray, packed: np.ndarray, alpha: np.ndarray, offset: np.ndarray, bits: int,
               group_size: int, *, threads: int = 0, kernel: str | None = None) -> np.ndarray:
    """``y = x @ W_hat.T`` for float32 ``x (batch, n)`` and a packed BCQ weight, by the C kernels.

    ``kernel``: None/"auto" (``DECOUPLEQ_KERNEL=reference`` forces the plain C
    one), "reference", "avx2" or "avx512" (where the CPU has it). Batches of up to 16 rows read the packed words
    directly; larger ones go through dequantized tiles and sgemm.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _C.bcq_packed_matmul(x, packed, alpha, offset, bits, x.shape[1], group_size, threads=threads,
                                kernel=kernel)
