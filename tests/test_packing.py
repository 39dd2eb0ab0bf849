"""The packed layout: exact round trips, the documented bit positions, bad input."""
import numpy as np
import pytest

from decoupleq import _C
from decoupleq import packing
from decoupleq.packing import PackedWeight
from decoupleq.reference import packing as ref

BITS = (2, 3, 4)
ODD_IN = (1, 7, 31, 33, 127, 128, 255, 256, 257, 576)


def random_codes(rng, out, n, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    a = rng.integers(qmin, qmax + 1, size=(out, n)).astype(np.int8)
    if out >= 3:
        a[0] = qmin  # the smallest value everywhere: u = 0
        a[1] = qmax  # every stored bit set
        a[2] = 0
    return a


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", ODD_IN)
def test_round_trip_c_and_numpy_agree(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    a = random_codes(rng, 5, n, bits)
    p = packing.pack(a, bits)
    assert p.dtype == np.uint32 and p.shape == (5, packing.row_words(bits, n))
    assert np.array_equal(packing.unpack(p, bits, n), a)
    # The NumPy twin is written independently from the layout's description.
    assert np.array_equal(p, ref.pack_codes(a, bits))
    assert np.array_equal(ref.unpack_codes(p, bits, n), a)


@pytest.mark.parametrize(
    "bits, n, words",
    [
        (2, 1, 8),        # 1 step -> 1 lane-word
        (2, 20, 8),       # 3 steps
        (2, 129, 16),     # 17 steps -> 2 lane-words
        (4, 64, 8),       # 8 steps
        (4, 65, 16),
        (3, 80, 8),       # 10 steps -> 1 word of the partial block
        (3, 88, 16),      # 11 steps -> 2 words
        (3, 240, 24),     # 30 steps -> 3 words, spare bits unused
        (3, 256, 24),     # a full block: 96 bits per 32 values
        (3, 576, 56),     # 72 steps: 2 blocks + 8 steps (1 word)
        (3, 4096, 384),   # exactly 3 bits per weight
    ],
)
def test_row_words_follow_the_documented_counts(bits, n, words):
    assert packing.row_words(bits, n) == words
    assert _C.pack_codes(np.zeros((1, n), np.int8), bits).shape == (1, words)


def test_two_bit_example_of_the_docstring():
    # 2 bits, in_features 20: column 13 is step 1, lane 5 -> bits 2..3 of word 5.
    a = np.full((1, 20), -2, np.int8)  # u = 0 everywhere
    a[0, 13] = 1  # u = 3
    p = packing.pack(a, 2)
    expected = np.zeros((1, 8), np.uint32)
    expected[0, 5] = 3 << 2
    assert np.array_equal(p, expected)


def test_four_bit_nibbles():
    # column 8*t + j -> lane-word t // 8, nibble t % 8 of word j
    a = np.full((1, 130), -8, np.int8)
    a[0, 8 * 7 + 2] = 7   # u = 15, step 7: nibble 7 of word 2
    a[0, 8 * 9 + 6] = -7  # u = 1, step 9: lane-word 1, nibble 1 of word 6
    p = packing.pack(a, 4)
    expected = np.zeros((1, 24), np.uint32)
    expected[0, 2] = 15 << 28
    expected[0, 8 + 6] = 1 << 4
    assert np.array_equal(p, expected)


def test_three_bit_slots_and_spare_bits():
    a = np.full((1, 256), -4, np.int8)  # u = 0
    a[0, 8 * 3 + 1] = -3     # u = 1: step 3 -> word 0, slot 3 at bit 9
    a[0, 8 * 17 + 4] = 3     # u = 7: step 17 -> word 1, slot 7 at bits 22..24
    a[0, 8 * 30 + 0] = 1     # u = 5 = 0b101: step 30 -> bit 15 of words 0 and 2
    a[0, 8 * 31 + 7] = -2    # u = 2 = 0b010: step 31 -> bit 31 of word 1
    p = packing.pack(a, 3)
    expected = np.zeros((1, 24), np.uint32)
    expected[0, 0 * 8 + 1] |= 1 << 9
    expected[0, 1 * 8 + 4] |= 7 << 22
    expected[0, 0 * 8 + 0] |= 1 << 15
    expected[0, 2 * 8 + 0] |= 1 << 15
    expected[0, 1 * 8 + 7] |= 1 << 31
    assert np.array_equal(p, expected)


@pytest.mark.parametrize("bits", BITS)
def test_padding_bits_are_zero(bits):
    n = 33  # 5 steps; the last step has one real column
    qmax = 2 ** (bits - 1) - 1
    p = packing.pack(np.full((2, n), qmax, np.int8), bits)
    ones = sum(bin(int(w)).count("1") for w in p.ravel())
    assert ones == 2 * n * bits  # exactly the bits of the real columns


def test_pack_is_64_byte_aligned():
    p = packing.pack(np.zeros((3, 100), np.int8), 3)
    assert p.ctypes.data % 64 == 0


def test_pack_rejects_codes_out_of_range_naming_the_element():
    a = np.zeros((3, 10), np.int8)
    a[2, 7] = 2  # qmax for 2 bits is 1
    with pytest.raises(ValueError, match=r"codes\[2, 7\] = 2 is outside \[-2, 1\]"):
        _C.pack_codes(a, 2)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: _C.pack_codes(np.zeros((2, 4), np.int16), 2), TypeError, "codes must have dtype int8"),
        (lambda: _C.pack_codes(np.zeros((2, 4), np.int8), 5), ValueError, "bits must be 2, 3 or 4"),
        (lambda: _C.pack_codes(np.zeros((4, 4), np.int8)[:, ::2], 2), ValueError, "C-contiguous"),
        (lambda: _C.pack_codes(np.zeros(4, np.int8), 2), ValueError, "2-dimensional"),
        (lambda: _C.unpack_codes(np.zeros((2, 16), np.uint32), 2, 20), ValueError,
         "packed has 16 words per row; 2-bit rows of in_features 20 need 8"),
        (lambda: _C.unpack_codes(np.zeros((2, 8), np.int32), 2, 20), TypeError, "packed must have dtype uint32"),
        (lambda: _C.pack_codes(np.zeros((2, 4), np.int8), 2, out=np.zeros((2, 9), np.uint32)),
         ValueError, "out must have shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_misaligned_buffer_is_rejected():
    raw = np.zeros(8 * 3 * 4 + 1, np.uint8)
    mis = np.frombuffer(raw.data, dtype=np.uint32, count=24, offset=1).reshape(3, 8)
    assert not mis.flags.aligned
    with pytest.raises(ValueError, match="packed must be C-contiguous and aligned"):
        _C.unpack_codes(mis, 2, 20)


# ---- PackedWeight --------------------------------------------------------------

def make_weight(rng, out, n, bits, group_size, symmetric=False):
    g = n if group_size == -1 else group_size
    a = random_codes(rng, out, n, bits)
    s = (rng.random((out, n // g)) * 0.05 + 0.001).astype(np.float32)
    z = None if symmetric else (rng.standard_normal((out, n // g)) * 0.05).astype(np.float32)
    return a, s, z


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("bits, n, gs", [(2, 64, 16), (3, 33, 11), (4, 7, -1), (3, 127, -1)])
def test_packed_weight_dequantizes_like_the_formula(bits, n, gs, scale_dtype):
    rng = np.random.default_rng(7)
    a, s, z = make_weight(rng, 6, n, bits, gs)
    pw = PackedWeight.from_codes(a, s, z, bits, gs, scale_dtype=scale_dtype)
    assert pw.scale.dtype == np.dtype(scale_dtype) and pw.zero.dtype == np.dtype(scale_dtype)
    assert np.array_equal(pw.unpack(), a)
    g = n if gs == -1 else gs
    s_st = np.repeat(pw.scale.astype(np.float32), g, axis=1)
    z_st = np.repeat(pw.zero.astype(np.float32), g, axis=1)
    expected = a.astype(np.float32) * s_st + z_st  # float32 product, then float32 sum
    got = pw.dequantize()
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    assert np.array_equal(ref.dequantize_packed(pw.codes, pw.scale, pw.zero, bits, n, gs), expected)
    if scale_dtype == "float32":
        assert np.array_equal(pw.scale, s)


def test_packed_weight_symmetric_has_no_zero():
    rng = np.random.default_rng(3)
    a, s, _ = make_weight(rng, 4, 32, 2, -1, symmetric=True)
    pw = PackedWeight.from_codes(a, s, None, 2, -1)
    assert pw.symmetric and "zero" not in pw.arrays()
    assert np.array_equal(pw.dequantize(), a.astype(np.float32) * pw.scale.astype(np.float32))


def test_packed_weight_float16_overflow_is_an_error():
    a = np.zeros((2, 8), np.int8)
    s = np.array([[1.0], [1e6]], np.float32)
    with pytest.raises(ValueError, match="does not fit float16"):
        PackedWeight.from_codes(a, s, None, 2, -1)
    pw = PackedWeight.from_codes(a, s, None, 2, -1, scale_dtype="float32")
    assert pw.scale[1, 0] == np.float32(1e6)


def test_packed_weight_arrays_and_meta_round_trip():
    rng = np.random.default_rng(11)
    a, s, z = make_weight(rng, 5, 48, 3, 16)
    pw = PackedWeight.from_codes(a, s, z, 3, 16)
    back = PackedWeight.from_arrays(pw.arrays(), pw.meta())
    assert back.meta() == pw.meta()
    assert np.array_equal(back.dequantize(), pw.dequantize())
    assert pw.nbytes == pw.codes.nbytes + pw.scale.nbytes + pw.zero.nbytes
    bad = dict(pw.meta(), format="something-else")
    with pytest.raises(ValueError, match="packed format"):
        PackedWeight.from_arrays(pw.arrays(), bad)


def test_packed_weight_validates_its_parts():
    a, s, z = make_weight(np.random.default_rng(0), 4, 32, 2, 16)
    pw = PackedWeight.from_codes(a, s, z, 2, 16)
    with pytest.raises(ValueError, match="group_size -2 must be -1 or a positive int"):
        PackedWeight.from_codes(a, s, z, 2, -2)
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 3\)"):  # 32 = 12 + 12 + 8
        PackedWeight.from_codes(a, s, z, 2, 12)
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 2\)"):
        PackedWeight(pw.codes, pw.scale[:, :1].copy(), pw.zero, 2, 32, 16)
    with pytest.raises(TypeError, match="zero must be"):
        PackedWeight(pw.codes, pw.scale, pw.zero.astype(np.float32), 2, 32, 16)
    with pytest.raises(ValueError, match="codes has 16 words per row"):
        PackedWeight(np.zeros((4, 16), np.uint32), pw.scale, pw.zero, 2, 32, 16)
    with pytest.raises(ValueError, match="scale contains NaN"):
        PackedWeight.from_codes(a, np.full_like(s, np.nan), z, 2, 16)
