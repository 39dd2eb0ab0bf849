"""Packed 2/3/4-bit weights: the one description of the format.

This docstring is the specification of the packed layout. The C codec
(``csrc/dq_pack.c``), the kernels (``csrc/dq_kernels_*.c``), the NumPy twin
(``decoupleq/reference/packing.py``) and saved models all follow it; a change
here is a new ``FORMAT`` string. ``QuantLinear`` keeps its 2-4-bit codes in this
layout (its ``packed`` buffer) with float32 ``scale`` and ``zero`` (the
float32 option below; they are trained by SFT), and ``decoupleq.save`` stores
that buffer as it is (``decoupleq/io.py``, format version 2).

Values
------
The solver's codes are signed int8 ``code`` in ``[qmin, qmax]`` with
``qmin = -2**(bits-1)`` and ``qmax = 2**(bits-1) - 1``. The packed words hold
the unsigned ``u = code - qmin`` (``0 .. 2**bits - 1``) as a ``bits``-wide
field. The dequantized weight of row r, column c in group ``g = c // group_size``
is ``w = code * s[r, g] + z[r, g] = (u + qmin) * s + z``; in symmetric mode
there is no zero array and z = 0.

Arrays
------
- ``codes``: ``uint32``, shape ``(out_features, row_words)``, C order,
  little-endian words; bit 0 is the least significant bit. Row r of the
  weight is row r of the array (rows are independent, so a row range is a
  slice). ``row_words`` depends only on ``(bits, in_features)``
  (:func:`row_words`) and is a multiple of 8 (32 bytes).
- ``scale``: shape ``(out_features, G)`` with ``G = ceil(in_features / group_size)``
  (when ``group_size`` does not divide ``in_features`` the last group is
  shorter: columns ``(G-1)*group_size .. in_features-1``), or ``G = 1`` when
  ``group_size == -1`` (per-channel). ``float16`` by
  default, ``float32`` as an option.
- ``zero``: the same shape and dtype as ``scale``, or absent (symmetric).
- Alignment: the kernels need only the natural 4-byte alignment of uint32
  (they use unaligned vector loads). :func:`pack` returns 64-byte-aligned
  arrays, so every row starts on a 32-byte boundary.

Steps, lanes and lane-words
---------------------------
Column c of a row is **lane** ``j = c % 8`` of **step** ``t = c // 8``; a row
has ``T = ceil(in_features / 8)`` steps, and the columns after
``in_features`` in the last step are padding with ``u = 0``. A **lane-word**
is 8 consecutive uint32, word j holding lane j: lane-word w of a row is
``codes[r, 8*w : 8*w + 8]``. Each step lives in one **slot** (a bit field) of
the same position in all 8 words of one lane-word, so one 256-bit load brings
8 consecutive columns of every step the lane-word holds.

Where step t goes, per bit width:

- **4 bits**: lane-word ``t // 8``, slot ``i = t % 8`` at bits ``4i .. 4i+3``
  (nibbles, lowest first).
- **2 bits**: lane-word ``t // 16``, slot ``i = t % 16`` at bits ``2i .. 2i+1``.
- **3 bits**: blocks of 32 steps (256 columns) use 3 lane-words
  ``3B, 3B+1, 3B+2`` with ``B = t // 32``; let ``i = t % 32``.

  - ``i < 30``: word ``a = i // 10``, slot ``k = i % 10`` at bits ``3k .. 3k+2``
    when ``k < 5``, else at bits ``16 + 3(k-5) .. 18 + 3(k-5)``. Each 16-bit
    half thus holds 5 whole slots, and its top bit (15 or 31) is spare.
  - ``i == 30``: bit p (p = 0, 1, 2) of u is bit 15 of word ``3B + p``.
  - ``i == 31``: bit p of u is bit 31 of word ``3B + p``.

  32 values fill exactly 96 bits. A last block of ``r < 32`` steps is cut
  after the lane-words it needs: ``ceil(r / 10)`` of them, 3 when r > 30.

Every bit not assigned above (padding slots, spare bits of a short block) is 0.

So ``row_words = 8 * L`` with ``L = ceil(T / 16)`` (2 bits), ``ceil(T / 8)``
(4 bits) and ``3 * (T // 32) + tail`` (3 bits; ``tail`` as just said).
Example: 2 bits and ``in_features = 20`` give T = 3, L = 1, 8 words per row;
column 13 is step 1, lane 5, so its u sits in bits 2..3 of ``codes[r, 5]``.

Why this layout
---------------
A 16-bit half of a word never splits a slot. A GEMV kernel therefore reads
slot i of 8 columns with ONE vector AND (after one 16-bit shift per word for
the upper half): the lanes then hold ``u * 2^shift``, which the kernel uses
either converted to float, or directly as a subnormal float bit pattern,
against x pre-scaled by the matching power of two (exact). Per group,
``sum_c w_c x_c = s * sum_c u_c x_c + (z + s * qmin) * sum_c x_c``: the sums of
x are computed once per call, and the inner loop is an AND and an FMA per 8
weights. See ``csrc/dq_kernels_avx2.c``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import _C
from .config import num_groups

__all__ = ["FORMAT", "PackedWeight", "pack", "row_words", "unpack"]

logger = logging.getLogger(__name__)

#: Name and version of the layout above, stored with saved models.
FORMAT = "decoupleq-lanes8-v1"

_SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    return int(bits)


def row_words(bits: int, in_features: int) -> int:
    """uint32 words per packed row for ``in_features`` columns at ``bits`` bits."""
    bits = _check_bits(bits)
    if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    steps = -(-int(in_features) // 8)
    if bits == 2:
        lanes = -(-steps // 16)
    elif bits == 4:
        lanes = -(-steps // 8)
    else:
        r = steps % 32
        lanes = 3 * (steps // 32) + (0 if r == 0 else 3 if r > 30 else -(-r // 10))
    return 8 * lanes


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """Uninitialised C-order array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed codes into the layout of this module.

    Args:
        codes: int8 ``(out_features, in_features)``, C-contiguous, every value
            in ``[-2**(bits-1), 2**(bits-1) - 1]``.
        bits: 2, 3 or 4.

    Returns:
        uint32 ``(out_features, row_words(bits, in_features))``, 64-byte aligned.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"codes must be a numpy.ndarray, got {type(codes).__name__}")
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-dimensional (out_features, in_features), got shape {codes.shape}")
    if codes.shape[1] < 1:
        raise ValueError("codes must have at least one column")
    out = _aligned_empty((codes.shape[0], row_words(bits, codes.shape[1])), np.uint32)
    return _C.pack_codes(codes, bits, out=out)


def unpack(packed: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack`: int8 codes ``(out_features, in_features)``."""
    return _C.unpack_codes(packed, _check_bits(bits), in_features)


def _as_sz(name: str, a, shape, dtype) -> np.ndarray:
    """scale or zero converted to the storage dtype, with range checks."""
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if dtype == np.float16:
        big = np.abs(arr).max(initial=0.0)
        if big > np.finfo(np.float16).max:
            raise ValueError(
                f"{name} does not fit float16 (max |{name}| = {big:.6g} > 65504); use scale_dtype='float32'"
            )
        # A scale below float16's normal range keeps only a few significant
        # bits, and every weight of its group inherits that relative error.
        # (A tiny zero only costs an absolute 2^-25 or less: no warning.)
        tiny = np.abs(arr[arr != 0]).min(initial=np.inf)
        if name == "scale" and tiny < np.finfo(np.float16).tiny:
            logger.warning(
                "scale has values down to %.3g, below float16's normal range: they lose precision "
                "(scale_dtype='float32' keeps them)", tiny,
            )
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A quantized weight in the packed layout of this module.

    Attributes:
        codes: uint32 ``(out_features, row_words)``.
        scale: float16 or float32 ``(out_features, G)``.
        zero: like ``scale``, or None for symmetric quantization (z = 0).
        bits: 2, 3 or 4.
        in_features: columns of the weight.
        group_size: columns per group, or -1 for one group per row.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    in_features: int
    group_size: int

    def __post_init__(self):
        bits = _check_bits(self.bits)
        n = self.in_features
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"in_features must be a positive int, got {n!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or (g != -1 and g < 1):
            raise ValueError(f"group_size must be -1 or a positive int, got {g!r}")
        for name in ("codes", "scale"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray, got {type(getattr(self, name)).__name__}")
        if self.codes.dtype != np.uint32 or self.codes.ndim != 2:
            raise TypeError(f"codes must be a 2-D uint32 array, got {self.codes.dtype} with shape {self.codes.shape}")
        if self.codes.shape[1] != row_words(bits, n):
            raise ValueError(
                f"codes has {self.codes.shape[1]} words per row; {bits}-bit rows of "
                f"in_features {n} need {row_words(bits, n)}"
            )
        shape = (self.codes.shape[0], self.n_groups)
        if self.scale.dtype not in (np.float16, np.float32):
            raise TypeError(f"scale must be float16 or float32, got {self.scale.dtype}")
        if self.scale.shape != shape:
            raise ValueError(f"scale must have shape {shape}, got {self.scale.shape}")
        if self.zero is not None:
            if not isinstance(self.zero, np.ndarray) or self.zero.dtype != self.scale.dtype:
                raise TypeError(f"zero must be a numpy.ndarray of dtype {self.scale.dtype} (that of scale) or None")
            if self.zero.shape != shape:
                raise ValueError(f"zero must have shape {shape}, got {self.zero.shape}")

    # ---- shape -----------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_groups(self) -> int:
        """G: groups per row."""
        return num_groups(self.in_features, self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros (what a GEMV reads)."""
        return self.codes.nbytes + self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes)

    # ---- construction ----------------------------------------------------
    @classmethod
    def from_codes(cls, codes, scale, zero, bits: int, group_size: int,
                   scale_dtype: str = "float16") -> "PackedWeight":
        """Pack solver output.

        Args:
            codes: int8 ``(out, in)`` signed codes.
            scale: float ``(out, G)``.
            zero: float ``(out, G)``, or None for symmetric (z = 0).
            bits: 2, 3 or 4.
            group_size: -1 (per-channel) or positive; ``G = ceil(in / group_size)``.
            scale_dtype: ``"float16"`` (default) or ``"float32"``: storage of
                scale and zero. float16 raises ValueError if a value overflows.
        """
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be 'float16' or 'float32', got {scale_dtype!r}")
        dtype = _SCALE_DTYPES[scale_dtype]
        bits = _check_bits(bits)
        if not isinstance(codes, np.ndarray) or codes.ndim != 2:
            raise TypeError("codes must be a 2-D numpy.ndarray of int8")
        out, n = codes.shape
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
            group_size != -1 and group_size < 1
        ):
            raise ValueError(f"group_size {group_size!r} must be -1 or a positive int")
        G = num_groups(n, int(group_size))
        s = _as_sz("scale", scale, (out, G), dtype)
        z = None if zero is None else _as_sz("zero", zero, (out, G), dtype)
        return cls(pack(codes, bits), s, z, bits, int(n), int(group_size))

    @classmethod
    def from_quantized(cls, qw, scale_dtype: str = "float16") -> "PackedWeight":
        """Pack a ``QuantizedWeight`` (``codes``, ``scale``, ``zero``, ``config``)."""
        cfg = qw.config
        zero = None if getattr(cfg, "symmetric", False) else qw.zero
        return cls.from_codes(qw.codes, qw.scale, zero, cfg.bits, cfg.group_size, scale_dtype)

    # ---- use ---------------------------------------------------------------
    def unpack(self) -> np.ndarray:
        """int8 codes ``(out_features, in_features)``."""
        return unpack(self.codes, self.bits, self.in_features)

    def dequantize(self, threads: int = 0, kernel: str | None = None) -> np.ndarray:
        """float32 ``(out_features, in_features)``: ``code * s + z`` (no FMA)."""
        return _C.dequantize_packed(self.codes, self.scale, self.zero, self.bits, self.in_features,
                                    self.group_size, threads=threads, kernel=kernel)

    # ---- saving ------------------------------------------------------------
    def arrays(self) -> dict:
        """The arrays to store: ``codes``, ``scale`` and, unless symmetric, ``zero``."""
        d = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            d["zero"] = self.zero
        return d

    def meta(self) -> dict:
        """JSON-able description that, with :meth:`arrays`, rebuilds this weight."""
        return {
            "format": FORMAT,
            "bits": self.bits,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "scale_dtype": str(self.scale.dtype),
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "PackedWeight":
        """Inverse of :meth:`arrays` + :meth:`meta` (arrays are used as given, not copied)."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"packed format {meta.get('format')!r} is not {FORMAT!r}")
        zero = arrays.get("zero")
        if meta.get("symmetric", zero is None) != (zero is None):
            raise ValueError("meta['symmetric'] disagrees with the presence of a zero array")
        pw = cls(np.asarray(arrays["codes"]), np.asarray(arrays["scale"]),
                 None if zero is None else np.asarray(zero), int(meta["bits"]),
                 int(meta["in_features"]), int(meta["group_size"]))
        if pw.out_features != int(meta["out_features"]):
            raise ValueError(f"codes has {pw.out_features} rows, meta says out_features {meta['out_features']}")
        return pw
