"""Careless and hostile inputs at the C boundary, and their NumPy twins.

Every entry point checks its inputs before any work: a Hessian that is not
symmetric, not positive semi-definite, or too large for the float32 solver,
weights whose min-max scale would overflow, sizes whose arithmetic would
overflow int64.  The reference (decoupleq.reference) raises the same errors.
Large but representable inputs are solved exactly as their scaled-down twins
(scaling H00 by a power of two scales every loss by it and changes no code).
"""
import numpy as np
import pytest

import decoupleq
import decoupleq.packing
from decoupleq import _C as C
from decoupleq import reference as R
from decoupleq.reference.synthetic import synthetic_problem

F32_MAX = float(np.finfo(np.float32).max)
IMPLS = [pytest.param(C, id="c"), pytest.param(R, id="reference")]


def problem(m=8, n=32, seed=0):
    W, H = synthetic_problem(m, n, seed)
    H00 = H + 0.01 * float(np.mean(np.diag(H))) * np.eye(n)
    return W, H00


METHODS = ["rtn", "gptq", "dq-gptq", "dq-pgd"]


def _solve(impl, method, W, H00):
    if method.startswith("dq-"):
        return impl.decoupleq(W, H00, 2, 8, False, True, "half_up", 3, method[3:], 128, 0, 5, 1e-3)
    if method == "rtn":
        return impl.rtn(W, H00, 2, 8, False, "half_up")
    return impl.gptq(W, H00, 2, 8, False, True, "half_up")


# ---- H00 far beyond float32: refused, not NaN losses and wrong codes ---------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", METHODS)
def test_hessian_beyond_float32_is_refused(impl, method):
    W, H00 = problem()
    with pytest.raises(ValueError, match=r"H00 has an entry of magnitude \d\.\d+e\+30\d, beyond float32"):
        _solve(impl, method, W, H00 * 1e300)


@pytest.mark.parametrize("impl", IMPLS)
def test_issue_repro_gptq_baseline_with_huge_hessian(impl):
    # Before the checks: NaN losses, and a NaN cast to int at
    # dq_round_gptq.c:438 (UBSan: float-cast-overflow, then signed overflow).
    W, H00 = problem()
    with pytest.raises(ValueError, match="beyond float32"):
        impl.gptq(W, H00 * 1e300, 2, 8, False, False, "half_up")


@pytest.mark.parametrize("method", ["rtn", "gptq", "dq-gptq"])
def test_large_hessian_within_float32_gives_scaled_losses_and_the_same_codes(method):
    # 2^100 (~1.3e30): every float operation of these solvers scales exactly.
    W, H00 = problem(16, 64, 1)
    base = _solve(C, method, W, H00)
    big = _solve(C, method, W, H00 * 2.0**100)
    np.testing.assert_array_equal(big[0], base[0])
    np.testing.assert_array_equal(big[1], base[1])
    np.testing.assert_array_equal(big[2], base[2])
    assert np.all(np.isfinite(big[3]))
    np.testing.assert_allclose(big[3], base[3] * 2.0**100, rtol=1e-12)


def test_large_hessian_within_float32_pgd_stays_finite():
    # PGD's Adam has an absolute epsilon, so its path depends on the scale of
    # H00 (by design): the codes may differ, the result must stay finite and
    # as good as a solve on the unscaled H00 (keep-best starts from the same
    # min-max and GPTQ candidates, whose losses scale exactly).
    W, H00 = problem(16, 64, 1)
    base = _solve(C, "dq-gptq", W, H00)
    A, S, Z, err, _ = _solve(C, "dq-pgd", W, H00 * 2.0**100)
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(Z)) and np.all(np.isfinite(err))
    # The returned errors are those of the returned codes (the solver's usual
    # 1e-4 relative agreement with a float64 evaluation) ...
    np.testing.assert_allclose(err, R.row_errors(W, A, S, Z, H00 * 2.0**100), rtol=1e-4)
    # ... and no worse than the first GPTQ pass (trace row 1), which scales exactly.
    assert np.all(err <= base[4][1] * 2.0**100 * (1 + 1e-12))


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_and_hessian_too_large_together_are_refused(impl):
    W, H00 = problem()
    with pytest.raises(ValueError, match="W and H00 are too large together"):
        impl.rtn(W * np.float32(1e30), H00 * 1e10, 2, 8, False, "half_up")


# ---- symmetry and positive semi-definiteness ---------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", METHODS)
def test_non_symmetric_hessian_is_refused(impl, method):
    W, H00 = problem()
    H = H00.copy()
    H[2, 5] += 1e-3 * np.sqrt(H[2, 2] * H[5, 5])
    with pytest.raises(ValueError, match=r"H00 must be symmetric: H00\[2, 5\]"):
        _solve(impl, method, W, H)


@pytest.mark.parametrize("impl", IMPLS)
def test_rounding_noise_asymmetry_is_accepted(impl):
    W, H00 = problem()
    H = H00.copy()
    H[2, 5] += 1e-9 * np.sqrt(H[2, 2] * H[5, 5])
    impl.rtn(W, H, 2, 8, False, "half_up")


def _indefinite(n):
    # Positive diagonal, eigenvalue -1 in the plane of inputs 0 and 1.
    H = np.eye(n)
    H[0, 1] = H[1, 0] = 2.0
    return H


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", METHODS)
def test_indefinite_hessian_is_refused(impl, method):
    W, _ = problem()
    with pytest.raises(ValueError, match="H00 is not positive semi-definite: its Cholesky"):
        _solve(impl, method, W, _indefinite(32))


@pytest.mark.parametrize("impl", IMPLS)
def test_indefinite_hessian_is_refused_by_row_errors(impl):
    W, _ = problem()
    S, Z = impl.minmax_params(W, 2, 8, False)
    A = impl.rtn_codes(W, S, Z, 2, False, "half_up")
    with pytest.raises(ValueError, match="H00 is not positive semi-definite"):
        impl.row_errors(W, A, S, Z, _indefinite(32))


def test_positive_semi_definite_singular_hessian_is_accepted():
    # Rank 4 of 32 (fewer tokens than features), undamped: PSD, singular.
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 32))
    H = X.T @ X
    W, _ = problem()
    for impl in (C, R):
        A, S, Z, err = impl.rtn(W, H, 2, 8, False, "half_up")
        assert np.all(err >= -1e-9 * np.abs(err).max())


# ---- weights whose min-max scale overflows float32 ---------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_beyond_half_float32_max_are_refused(impl):
    W, H00 = problem()
    W[3, 4] = np.float32(2e38)
    with pytest.raises(ValueError, match=r"W has an entry of magnitude 2e\+38.*1\.7e38"):
        impl.minmax_params(W, 2, 8, False)
    with pytest.raises(ValueError, match=r"W has an entry of magnitude 2e\+38"):
        impl.rtn(W, H00, 2, 8, False, "half_up")


def test_quantize_weight_without_hessian_refuses_huge_weights():
    W, _ = problem()
    W[0, 0] = -np.float32(3e38)
    with pytest.raises(ValueError, match=r"W has an entry of magnitude 3e\+38"):
        decoupleq.quantize_weight(W, None, decoupleq.QuantConfig(method="rtn", group_size=8))


# ---- sizes whose arithmetic would overflow int64 -----------------------------


def test_unpack_with_huge_in_features_is_refused():
    packed = decoupleq.packing.pack(np.zeros((2, 16), np.int8), 2)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, 2147483647\], got 9223372036854775807"):
        decoupleq.packing.unpack(packed, 2, 2**63 - 1)
    for big in (2**31, 2**62):
        with pytest.raises(ValueError, match="in_features must be in"):
            C.unpack_codes(packed, 2, big)
        with pytest.raises(ValueError, match="in_features must be in"):
            C.dequantize_packed(packed, np.ones((2, 1), np.float32), None, 2, big, -1)
        with pytest.raises(ValueError, match="in_features must be in"):
            C.packed_matmul(np.ones((1, 16), np.float32), packed, np.ones((2, 1), np.float32), None,
                            2, big, -1)


def test_bcq_unpack_with_huge_in_features_is_refused():
    # Found by the fuzz run under UBSan: (in + 7) overflowed int64 in dq_bcq_row_words.
    packed = C.bcq_pack(np.zeros((2, 16), np.uint8), 2)
    for big in (2**31, 2**63 - 1):
        with pytest.raises(ValueError, match=r"in_features must be in \[1, 2147483647\]"):
            C.bcq_unpack(packed, 2, big)


def test_huge_iteration_count_names_iterations():
    W, H00 = problem(4096, 8)
    with pytest.raises(MemoryError, match="iterations 2147483647 is too large"):
        C.decoupleq(W, H00, 2, -1, False, False, "half_up", 2**31 - 1, "gptq")


# ---- messages with numbers in them (PyErr_Format has no %g) -------------------


def test_numbers_in_c_messages_are_formatted():
    W, H00 = problem()
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan$"):
        C.decoupleq(W, H00, 2, 8, False, False, "half_up", 2, "pgd", lr=float("nan"))
    with pytest.raises(ValueError, match=r"p_row must lie in \(0, 1\], got 2 at row 0$"):
        C.minmax_params(W, 2, 8, False, p_row=np.full(8, 2.0, np.float32))
    H = np.eye(4)
    H[1, 1] = -0.25
    with pytest.raises(ValueError, match=r"negative diagonal entry H\[1, 1\] = -0.25:"):
        C.damp(H, 0.01)


# ---- unaligned inputs are copied, as the docstrings say ----------------------


def _unaligned_copy(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def test_unaligned_weight_and_hessian_are_accepted():
    W, H00 = problem()
    cfg = decoupleq.QuantConfig(method="gptq", group_size=8)
    ref = decoupleq.quantize_weight(W, H00, cfg)
    got = decoupleq.quantize_weight(_unaligned_copy(W), _unaligned_copy(H00), cfg)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_array_equal(got.scale, ref.scale)


def test_unaligned_activations_are_accepted_by_packed_linear():
    from decoupleq.kernels import packed_linear
    from decoupleq.packing import PackedWeight

    W, H00 = problem(8, 32)
    qw = decoupleq.quantize_weight(W, H00, decoupleq.QuantConfig(method="rtn", group_size=8))
    pw = PackedWeight.from_quantized(qw)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(packed_linear(_unaligned_copy(x), pw), packed_linear(x, pw))
