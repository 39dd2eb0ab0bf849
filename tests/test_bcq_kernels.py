"""BCQ weights: validation, the packed layout (C against its NumPy twin), and
every BCQ kernel against float64 and each other, at odd sizes and every batch path."""
import os
import subprocess
import sys

import numpy as np
import pytest

from decoupleq import _C
from decoupleq.bcq import BCQWeight, bcq_from_uniform, bcq_linear, pack, row_words, unpack
from decoupleq.reference import bcq as ref

KERNELS = _C.bcq_kernel_names()
EPS = np.finfo(np.float32).eps
ODD = (1, 7, 31, 33, 127)
# (in_features, group_size): odd sizes per channel and with groups that are
# not multiples of 8 (the AVX2 kernel hands those to the reference), and
# aligned grouped sizes that take the AVX2 paths.
SHAPES = [(1, -1), (7, -1), (7, 7), (31, -1), (33, -1), (33, 11), (127, -1), (64, 8), (256, 32),
          (320, 64), (1000, 8), (1000, -1)]


def make(rng, m, n, bits, gs, nasty=True):
    G = 1 if gs == -1 else n // gs
    idx = rng.integers(0, 1 << bits, size=(m, n)).astype(np.uint8)
    alpha = (rng.random((m, G, bits)) * 0.05 + 0.001).astype(np.float32)
    offset = (rng.standard_normal((m, G)) * 0.05).astype(np.float32)
    if nasty and m >= 4:
        alpha[0] = 0.0            # every level is the offset
        idx[1] = (1 << bits) - 1  # constant indices (all signs -1)
        alpha[2, 0, 0] = 40.0     # one huge scale
        offset[3] = 0.0
        alpha[3] *= -1.0          # negative alphas are allowed
    if nasty and m >= 6:
        alpha[5] = 0.0            # every level is 0 + (-0) ... + (-0.0): +0.0 in float32
        offset[5] = -0.0
    return BCQWeight(idx, alpha, offset, bits, gs)


def exact_and_bound(x, w: BCQWeight):
    """float64 x @ What^T, and the bound (n + 8) eps sum |x| |w| on a float32 sum of n products."""
    W = w.dequantize().astype(np.float64)
    x64 = x.astype(np.float64)
    return x64 @ W.T, (np.abs(x64) @ np.abs(W).T) * (w.shape[1] + 8) * EPS


# ---- BCQWeight ---------------------------------------------------------------------------------


def test_level_formula_follows_the_sign_pattern_index():
    # bits = 3, one row, one group: level(k) = sum_i alpha_i * beta_i(k) + offset,
    # beta_i = +1 when bit (2 - i) of k is 0.  Written out by hand for each k.
    alpha = np.array([[[4.0, 2.0, 1.0]]], np.float32)
    idx = np.arange(8, dtype=np.uint8)[None, :]
    w = BCQWeight(idx, alpha, np.array([[0.5]], np.float32), 3, -1)
    assert w.dequantize().tolist() == [[7.5, 5.5, 3.5, 1.5, -0.5, -2.5, -4.5, -6.5]]


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(indices=np.zeros((2, 4), np.int8)), TypeError, "indices must have dtype uint8"),
        (dict(indices=np.full((2, 4), 4, np.uint8)), ValueError, "indices[0, 0] = 4"),
        (dict(alpha=np.ones((2, 1, 3), np.float32)), ValueError, "alpha must have shape (2, 1, 2)"),
        (dict(offset=np.ones((1, 1), np.float32)), ValueError, "offset must have shape (2, 1)"),
        (dict(alpha=np.full((2, 1, 2), np.nan, np.float32)), ValueError, "alpha has non-finite"),
        (dict(bits=5), ValueError, "bits must be an int in [1, 4]"),
        (dict(group_size=3), ValueError, "group_size 3 does not divide in_features 4"),
    ],
)
def test_bcq_weight_rejects_bad_fields_by_name(kwargs, exc, words):
    args = dict(indices=np.zeros((2, 4), np.uint8), alpha=np.ones((2, 1, 2), np.float32),
                offset=np.zeros((2, 1), np.float32), bits=2, group_size=-1)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        BCQWeight(**args)
    assert words in str(info.value)


def test_bcq_weight_never_modifies_the_callers_arrays():
    alpha = np.ones((2, 1, 2), np.float64)
    w = BCQWeight(np.zeros((2, 4), np.uint8), alpha, np.zeros((2, 1)), 2, -1)
    w.alpha[:] = 7.0
    assert alpha.dtype == np.float64 and np.all(alpha == 1.0)


# ---- packed layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_pack_round_trip_and_c_equals_numpy_twin(bits):
    rng = np.random.default_rng(bits)
    for n in ODD + (8, 80, 256, 257):
        for m in (1, 3, 7):
            idx = rng.integers(0, 1 << bits, size=(m, n)).astype(np.uint8)
            p = pack(idx, bits)
            assert p.dtype == np.uint32 and p.shape == (m, row_words(bits, n)) and p.shape[1] % 8 == 0
            np.testing.assert_array_equal(p, ref.bcq_pack(idx, bits))
            np.testing.assert_array_equal(unpack(p, bits, n), idx)
            np.testing.assert_array_equal(ref.bcq_unpack(p, bits, n), idx)


def test_layout_places_slots_as_documented():
    # 2 bits: column c = 8 t + j is lane j of step t; step t sits in block t // 16,
    # bits 2 (t % 16) of word 8 (t // 16) + j.  Column 8 * 17 + 3 = 139 -> block 1, slot 1, lane 3.
    idx = np.zeros((1, 140), np.uint8)
    idx[0, 139] = 2
    p = pack(idx, 2)
    assert p.shape == (1, 16)
    expect = np.zeros(16, np.uint32)
    expect[8 + 3] = 2 << 2
    np.testing.assert_array_equal(p[0], expect)
    # 3 bits: 10 slots per word, the top two bits unused.
    assert row_words(3, 80) == 8 and row_words(3, 81) == 16


def test_pack_rejects_an_index_too_large_and_names_it():
    idx = np.zeros((3, 5), np.uint8)
    idx[2, 4] = 8
    with pytest.raises(ValueError, match=r"indices\[2, 4\] = 8 is outside \[0, 7\]"):
        pack(idx, 3)
    with pytest.raises(ValueError, match="words per row"):
        unpack(np.zeros((1, 7), np.uint32), 2, 5)


# ---- dequantize and matmul ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_dequantize_is_bit_exact_everywhere(kernel, bits):
    rng = np.random.default_rng(10 + bits)
    for n, gs in SHAPES:
        w = make(rng, 6, n, bits, gs)
        p = w.pack()
        want = w.dequantize()
        got = _C.bcq_dequantize_packed(p, w.alpha, w.offset, bits, n, gs, kernel=kernel)
        # bit for bit, the sign of zero included (assert_array_equal alone takes -0.0 == 0.0)
        assert got.tobytes() == want.tobytes()
        assert ref.bcq_dequantize_packed(p, w.alpha, w.offset, bits, n, gs).tobytes() == want.tobytes()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_every_kernel_matches_float64_at_every_batch_path(kernel, bits):
    rng = np.random.default_rng(20 + bits)
    for n, gs in SHAPES:
        for m in (1, 5, 13):
            w = make(rng, m, n, bits, gs)
            p = w.pack()
            for batch in (1, 2, 3, 4, 5, 8, 16, 17, 40):
                x = rng.standard_normal((batch, n)).astype(np.float32)
                y = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, bits, n, gs, kernel=kernel)
                assert y.shape == (batch, m) and y.dtype == np.float32
                exact, bound = exact_and_bound(x, w)
                assert np.all(np.abs(y - exact) <= bound + 1e-30), (n, gs, m, batch)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_simd_kernels_agree_with_the_reference_kernel(bits):
    rng = np.random.default_rng(30 + bits)
    for n, gs in [(512, 64), (4096, 128), (384, -1), (200, 8)]:
        w = make(rng, 37, n, bits, gs)
        p = w.pack()
        for batch in range(1, 18):
            x = rng.standard_normal((batch, n)).astype(np.float32)
            y_ref = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, bits, n, gs, kernel="reference")
            _, bound = exact_and_bound(x, w)
            for k in KERNELS[1:]:
                y = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, bits, n, gs, kernel=k)
                assert np.all(np.abs(y - y_ref) <= 2 * bound + 1e-30), (k, n, gs, batch)


def test_numpy_twin_matmul_and_tiles():
    rng = np.random.default_rng(41)
    w = make(rng, 21, 96, 3, 32)
    p = w.pack()
    x = rng.standard_normal((33, 96)).astype(np.float32)
    exact, bound = exact_and_bound(x, w)
    y_twin = ref.bcq_packed_matmul(x, p, w.alpha, w.offset, 3, 96, 32)
    assert np.all(np.abs(y_twin - exact) <= bound)
    for tile in (1, 5, 0):  # several tiles, and the automatic size
        y = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, 3, 96, 32, tile_rows=tile)
        assert np.all(np.abs(y - exact) <= bound)
    np.testing.assert_array_equal(bcq_linear(x, p, w.alpha, w.offset, 3, 32, kernel="reference"),
                                  _C.bcq_packed_matmul(x, p, w.alpha, w.offset, 3, 96, 32, kernel="reference"))


def test_bad_arguments_are_named():
    w = make(np.random.default_rng(0), 4, 16, 2, 8)
    p = w.pack()
    x = np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match=r"alpha must have shape \(4, 2, 2\)"):
        _C.bcq_packed_matmul(x, p, w.alpha[:, :1].copy(), w.offset, 2, 16, 8)
    with pytest.raises(ValueError, match=r"offset must have shape \(4, 2\)"):
        _C.bcq_packed_matmul(x, p, w.alpha, w.offset[:3].copy(), 2, 16, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 16\)"):
        _C.bcq_packed_matmul(np.ones((1, 15), np.float32), p, w.alpha, w.offset, 2, 16, 8)
    with pytest.raises(ValueError, match="group_size 5 does not divide in_features 16"):
        _C.bcq_packed_matmul(x, p, w.alpha, w.offset, 2, 16, 5)
    with pytest.raises(ValueError, match="kernel 'nope' is not available"):
        _C.bcq_packed_matmul(x, p, w.alpha, w.offset, 2, 16, 8, kernel="nope")


def test_decoupleq_kernel_reference_forces_the_plain_c_kernel():
    code = "from decoupleq import _C; print(_C.bcq_default_kernel(), _C.backend_info()['bcq_kernel'])"
    env = dict(os.environ, DECOUPLEQ_KERNEL="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "reference"]
    env.pop("DECOUPLEQ_KERNEL")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [KERNELS[-1]] * 2


# ---- uniform as BCQ ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_uniform_codes_are_bcq_with_fixed_alpha(bits):
    rng = np.random.default_rng(50 + bits)
    m, n, gs = 9, 96, 32
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(qmin, qmax + 1, size=(m, n)).astype(np.int8)
    s = (rng.random((m, 3)) * 0.1 + 0.01).astype(np.float32)
    z = (rng.standard_normal((m, 3)) * 0.1).astype(np.float32)
    w = bcq_from_uniform(q, s, z, bits, gs)
    np.testing.assert_array_equal(w.alpha[:, :, -1], s * np.float32(0.5))
    # Real-number identity, checked in float64 from the float32 inputs (no rounding there).
    s64, z64 = np.repeat(s, gs, 1).astype(np.float64), np.repeat(z, gs, 1).astype(np.float64)
    signs = [1.0 - 2.0 * ((w.indices.astype(np.int64) >> (bits - 1 - i)) & 1) for i in range(bits)]
    bcq64 = sum(2.0 ** (bits - 2 - i) * s64 * signs[i] for i in range(bits)) + (z64 - s64 / 2)
    np.testing.assert_array_equal(bcq64, q.astype(np.float64) * s64 + z64)
    # In float32 the two roundings differ by a few ulps of the level's magnitude.
    uq32 = q.astype(np.float32) * np.repeat(s, gs, 1) + np.repeat(z, gs, 1)
    tol = 4 * EPS * (np.abs(z64) + (1 << bits) * s64)
    assert np.all(np.abs(w.dequantize() - uq32) <= tol)


def test_thread_count_does_not_change_a_bit():
    # rows are split between threads, each row computed the same way whatever the split
    rng = np.random.default_rng(60)
    w = make(rng, 203, 512, 2, 64)
    p = w.pack()
    for batch in (1, 6, 20):
        x = rng.standard_normal((batch, 512)).astype(np.float32)
        ys = [_C.bcq_packed_matmul(x, p, w.alpha, w.offset, 2, 512, 64, threads=t) for t in (1, 2, 3)]
        if batch > 16:  # sgemm's own threads may order its sums differently: within the bound
            exact, bound = exact_and_bound(x, w)
            assert all(np.all(np.abs(y - exact) <= bound) for y in ys)
        else:
            assert ys[0].tobytes() == ys[1].tobytes() == ys[2].tobytes()
    d = [_C.bcq_dequantize_packed(p, w.alpha, w.offset, 2, 512, 64, threads=t) for t in (1, 2)]
    assert d[0].tobytes() == d[1].tobytes()


# ---- the AVX-512 batch-1 dot -------------------------------------------------------------------

# (in_features, group_size) that take its own path for 1 and 2 bits (whole 16-bit halves of
# lane-words, groups ending at half boundaries), next to ones it hands to the AVX2 kernel.
AVX512_SHAPES = {1: [(128, -1), (256, 128), (1024, 256), (384, 128), (200, -1), (256, 32)],
                 2: [(64, -1), (64, 64), (320, 64), (512, 128), (1024, -1), (200, -1), (96, 32)]}


@pytest.mark.skipif("avx512" not in KERNELS, reason="this CPU or OS has no AVX-512F")
@pytest.mark.parametrize("bits", (1, 2))
def test_avx512_batch1_dot_matches_float64_and_the_reference(bits):
    rng = np.random.default_rng(70 + bits)
    for n, gs in AVX512_SHAPES[bits]:
        for m in (1, 2, 3, 5, 8, 13):  # row pairs, blocks of 4 rows, and short last blocks
            w = make(rng, m, n, bits, gs)
            p = w.pack()
            x = rng.standard_normal((1, n)).astype(np.float32)
            exact, bound = exact_and_bound(x, w)
            y = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, bits, n, gs, kernel="avx512")
            y_ref = _C.bcq_packed_matmul(x, p, w.alpha, w.offset, bits, n, gs, kernel="reference")
            assert np.all(np.abs(y - exact) <= bound + 1e-30), (n, gs, m)
            assert np.all(np.abs(y - y_ref) <= 2 * bound + 1e-30), (n, gs, m)
            # a row's result does not depend on the rows computed beside it
            for r in range(m):
                one = _C.bcq_packed_matmul(x, p[r:r + 1].copy(), w.alpha[r:r + 1].copy(),
                                           w.offset[r:r + 1].copy(), bits, n, gs, kernel="avx512")
                assert one.tobytes() == y[:, r:r + 1].tobytes(), (n, gs, m, r)


@pytest.mark.skipif("avx512" not in KERNELS, reason="this CPU or OS has no AVX-512F")
def test_avx512_is_the_default_and_decoupleq_kernel_avx2_selects_avx2():
    code = "from decoupleq import _C; print(_C.bcq_default_kernel())"
    env = dict(os.environ)
    env.pop("DECOUPLEQ_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["avx512"]
    env["DECOUPLEQ_KERNEL"] = "avx2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["avx2"]
