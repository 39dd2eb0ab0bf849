"""C GPTQ step (round_gptq) and GPTQ baseline (gptq) against the NumPy reference.

The C sweep runs the same recurrence as the reference in a different
floating-point order (reversed Cholesky factor instead of the inverse, other
GEMM blocking), so a rounding that sits on a tie can flip: codes must agree on
at least 99.9% of the entries (on matrices of under 1000 entries, where 0.1%
is less than one entry: all but one) and the mean loss to 1e-4 relative.  The
returned errors must be the H00 errors of the returned codes (1e-4 relative
against a float64 evaluation).  A row with one huge outlier is chaotic under
any change of rounding and is tested on its own.
"""
import functools
import threading

import numpy as np
import pytest

from decoupleq import _C as C
from decoupleq import reference as R
from decoupleq.reference.grid import quantize_codes
from decoupleq.reference.synthetic import synthetic_problem

from _kernel_builds import outputs_per_build

F32 = np.float32
AGREE = 0.999
LOSS_RTOL = 1e-4


def damped(H, percdamp=0.01):
    d = float(np.mean(np.diag(H)))
    return H + (percdamp * d if d != 0 else percdamp) * np.eye(H.shape[0])


@functools.lru_cache(maxsize=None)
def _problem(m, n, seed, n_tokens=None):
    return synthetic_problem(m, n, seed, n_tokens=n_tokens)


def problem(m, n, seed=0, nasty=True):
    """Synthetic layer with an all-zero row, a constant row and a huge outlier; H00 damped."""
    W, H = _problem(m, n, seed)
    W = W.copy()
    if nasty and m >= 3:
        W[0] = 0
        W[1] = F32(-0.21)
        W[2, n // 3] = F32(-50) * np.abs(W[2]).max()
    return W, damped(H)


def exact_errors(W, A, S, Z, H):
    g = W.shape[1] // S.shape[1]
    What = A.astype(F32) * np.repeat(S, g, axis=1) + np.repeat(Z, g, axis=1)
    D = (What - W).astype(np.float64)
    return np.sum((D @ H) * D, axis=1)


def assert_codes_agree(A, Ar):
    mismatches = int(np.sum(A != Ar))
    assert mismatches <= max(1, int((1 - AGREE) * A.size)), f"{mismatches} of {A.size} codes differ"


def assert_close_to_reference(A, err, Ar, er):
    assert_codes_agree(A, Ar)
    assert abs(err.mean() / er.mean() - 1) <= LOSS_RTOL


def assert_errors_are_exact(W, A, S, Z, H, err):
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H), rtol=1e-4, atol=1e-12)


CASES = [
    # m, n, group_size, bits, symmetric, act_order, rule
    (31, 64, 16, 2, False, True, "half_up"),
    (33, 127, -1, 3, False, False, "half_even"),
    (127, 96, 32, 4, True, True, "half_up"),
    (7, 33, 11, 8, False, True, "half_up"),
    (1, 31, -1, 2, False, True, "half_up"),
    (64, 128, 64, 2, False, False, "half_up"),
    (31, 7, 7, 3, True, False, "half_even"),
]


@pytest.mark.parametrize("m,n,g,bits,sym,act,rule", CASES)
def test_round_gptq_matches_reference(m, n, g, bits, sym, act, rule):
    W, H = problem(m, n)
    S, Z = C.minmax_params(W, bits, g, sym)
    A, err = C.round_gptq(W, S, Z, H, bits, g, sym, act, rule)
    Ar, er = R.round_gptq(W, S, Z, H, bits, g, sym, act, rule)
    assert A.dtype == np.int8 and A.shape == W.shape and err.dtype == np.float64
    assert A.min() >= -(1 << (bits - 1)) and A.max() <= (1 << (bits - 1)) - 1
    assert_close_to_reference(A, err, Ar, er)
    assert_errors_are_exact(W, A, S, np.zeros_like(Z) if sym else Z, H, err)


@pytest.mark.parametrize("m,n,g,bits,sym,act,rule", CASES)
def test_gptq_baseline_matches_reference(m, n, g, bits, sym, act, rule):
    W, H = problem(m, n)
    A, S, Z, err = C.gptq(W, H, bits, g, sym, act, rule)
    Ar, Sr, Zr, er = R.gptq(W, H, bits, g, sym, act, rule)
    assert_close_to_reference(A, err, Ar, er)
    # Static groups (act-order) and per-channel parameters come from the
    # original W: bit-identical.  Dynamic groups see updated weights, whose
    # rounding differs.
    if act or g in (-1, n):
        np.testing.assert_array_equal(S, Sr)
        np.testing.assert_array_equal(Z, Zr)
    else:
        assert np.mean(np.isclose(S, Sr, rtol=1e-5, atol=0)) >= AGREE
    if sym:
        assert not np.any(Z)
    assert_errors_are_exact(W, A, S, Z, H, err)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act", [False, True])
def test_error_identity_matches_row_errors(bits, act):
    # round_gptq's errors come from the sweep (sum e_i^2 - lambda ||Delta||^2);
    # they must agree with a direct evaluation of the returned codes.
    W, H = problem(96, 160, seed=1)
    S, Z = C.minmax_params(W, bits, 32, False)
    A, err = C.round_gptq(W, S, Z, H, bits, 32, False, act, "half_up")
    np.testing.assert_allclose(err, C.row_errors(W, A, S, Z, H), rtol=1e-4, atol=0)
    A, S, Z, err = C.gptq(W, H, bits, 32, False, act, "half_up")
    np.testing.assert_allclose(err, C.row_errors(W, A, S, Z, H), rtol=1e-4, atol=0)


def test_sweep_codes_equal_codes_recovered_from_dequantised_weights():
    # ALGORITHM 2.2 recovers A = clamp(R((Q - z) / s)) from Q; keeping the
    # integer chosen in the sweep gives the same codes.
    for bits, sym in ((2, False), (3, True), (8, False)):
        W, H = problem(33, 64, seed=2)
        S, Z = C.minmax_params(W, bits, 16, sym)
        A, _ = C.round_gptq(W, S, Z, H, bits, 16, sym, True, "half_up")
        S_up, Z_up = np.repeat(S, 16, axis=1), np.repeat(Z, 16, axis=1)
        Q = A.astype(F32) * S_up + Z_up
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        recovered = quantize_codes(Q, S_up, Z_up, qmin, qmax, sym, "half_up").astype(np.int8)
        np.testing.assert_array_equal(A, recovered)


def test_gptq_beats_rtn_and_decoupleq_step_improves_on_minmax():
    W, H = problem(64, 128, seed=3, nasty=False)
    _, _, _, e_rtn = C.rtn(W, H, 2, 32, False, "half_up")
    _, _, _, e_gptq = C.gptq(W, H, 2, 32, False, True, "half_up")
    S, Z = C.minmax_params(W, 2, 32, False)
    _, e_step = C.round_gptq(W, S, Z, H, 2, 32, False, True, "half_up")
    assert e_gptq.mean() < 0.8 * e_rtn.mean()
    assert e_step.mean() < 0.8 * e_rtn.mean()


@pytest.mark.parametrize("blocksize", [1, 5, 32, 1000])
def test_blocksize_changes_only_rounding(blocksize):
    W, H = problem(48, 96, seed=4)
    S, Z = C.minmax_params(W, 2, 16, False)
    A0, e0 = C.round_gptq(W, S, Z, H, 2, 16, False, True, "half_up")
    A1, e1 = C.round_gptq(W, S, Z, H, 2, 16, False, True, "half_up", blocksize=blocksize)
    assert_close_to_reference(A1, e1, A0, e0)
    # Dynamic groups: the blocks are cut at group boundaries, so the group
    # parameters see fully updated weights whatever the block size.
    B0 = C.gptq(W, H, 2, 16, False, False, "half_up")
    B1 = C.gptq(W, H, 2, 16, False, False, "half_up", blocksize=blocksize)
    Br = R.gptq(W, H, 2, 16, False, False, "half_up", blocksize=blocksize)
    assert_codes_agree(B1[0], B0[0])
    assert_close_to_reference(B1[0], B1[3], Br[0], Br[3])


def test_row_with_a_huge_outlier():
    # One weight 1e5 times the others: every other weight of the row ends on a
    # clamp boundary chosen by float rounding, so that row may differ from
    # the reference throughout; its loss stays within 1%, and every other
    # row agrees as usual.
    W, H = problem(64, 96, seed=10, nasty=False)
    W = W.copy()
    W[5, 40] = F32(-3e3)
    for act in (False, True):
        S, Z = C.minmax_params(W, 4, 32, False)
        A, err = C.round_gptq(W, S, Z, H, 4, 32, False, act, "half_up")
        Ar, er = R.round_gptq(W, S, Z, H, 4, 32, False, act, "half_up")
        B = C.gptq(W, H, 4, 32, False, act, "half_up")
        Br = R.gptq(W, H, 4, 32, False, act, "half_up")
        for (A1, e1), (A2, e2) in (((A, err), (Ar, er)), ((B[0], B[3]), (Br[0], Br[3]))):
            rest = np.arange(64) != 5
            assert_close_to_reference(A1[rest], e1[rest], A2[rest], e2[rest])
            assert abs(e1[5] / e2[5] - 1) < 1e-2
        assert_errors_are_exact(W, A, S, Z, H, err)
        assert_errors_are_exact(W, B[0], B[1], B[2], H, B[3])


# ---------------------------------------------------------------- Hessian edge cases


def test_dead_columns_follow_reference_gptq():
    # An undamped H with features that never fired (zero rows and columns).
    W, H = _problem(24, 40, 5)
    H = H.copy()
    dead = [3, 17, 39]
    H[dead, :] = 0
    H[:, dead] = 0
    for act in (False, True):
        A, S, Z, err = C.gptq(W, H, 2, 8, False, act, "half_up")
        Ar, Sr, Zr, er = R.gptq(W, H, 2, 8, False, act, "half_up")
        assert_close_to_reference(A, err, Ar, er)
        assert_errors_are_exact(W, A, S, Z, H, err)
        # decoupleQ's step has no dead-input rule: its ladder starts damped.
        S0, Z0 = C.minmax_params(W, 2, 8, False)
        A, err = C.round_gptq(W, S0, Z0, H, 2, 8, False, act, "half_up")
        Ar, er = R.round_gptq(W, S0, Z0, H, 2, 8, False, act, "half_up")
        assert_close_to_reference(A, err, Ar, er)


def test_singular_hessian_before_damping():
    # Fewer tokens than features: H is singular; damped it is not.
    W, H = _problem(32, 64, 6, n_tokens=20)
    assert np.linalg.matrix_rank(H) < 64
    H00 = damped(H)
    S, Z = C.minmax_params(W, 2, 16, False)
    A, err = C.round_gptq(W, S, Z, H00, 2, 16, False, True, "half_up")
    Ar, er = R.round_gptq(W, S, Z, H00, 2, 16, False, True, "half_up")
    assert_close_to_reference(A, err, Ar, er)
    # The undamped singular H itself: the baseline's first rung (t = 0) is
    # rejected and a damped rung is used; the result is still a valid
    # quantisation whose errors are measured with the H passed in.
    A, S, Z, err = C.gptq(W, H, 2, 16, False, True, "half_up")
    assert np.all(np.isfinite(err))
    assert_errors_are_exact(W, A, S, Z, H, err)
    _, _, _, e_rtn = C.rtn(W, H, 2, 16, False, "half_up")
    assert err.mean() <= e_rtn.mean()


def test_zero_hessian():
    W, _ = problem(8, 16)
    H = np.zeros((16, 16))
    S, Z = C.minmax_params(W, 2, -1, False)
    # Every rung adds t * mean(diag) = 0: nothing factors.
    with pytest.raises(ValueError, match="not positive definite"):
        C.round_gptq(W, S, Z, H, 2, -1, False, False, "half_up")
    with pytest.raises(ValueError):
        R.round_gptq(W, S, Z, H, 2, -1, False, False, "half_up")
    # The baseline treats every input as dead: all weights zeroed, no error.
    A, S, Z, err = C.gptq(W, H, 2, -1, False, False, "half_up")
    Ar, Sr, Zr, er = R.gptq(W, H, 2, -1, False, False, "half_up")
    np.testing.assert_array_equal(A, Ar)
    np.testing.assert_array_equal(err, 0)


def test_negative_definite_hessian_is_rejected():
    W, _ = problem(8, 16)
    H = -np.eye(16)
    S, Z = C.minmax_params(W, 2, -1, False)
    # Caught by the boundary's check of H00, before any work.
    with pytest.raises(ValueError, match=r"H00 is not positive semi-definite: H00\[0, 0\] = -1 < 0"):
        C.round_gptq(W, S, Z, H, 2, -1, False, True, "half_up")
    with pytest.raises(ValueError, match=r"H00 is not positive semi-definite: H00\[0, 0\] = -1 < 0"):
        C.gptq(W, H, 2, -1, False, True, "half_up")


def test_act_order_ties_keep_natural_order():
    # diag H constant: act-order is the identity permutation, so the result
    # equals the natural-order sweep exactly.
    W, _ = problem(16, 32)
    rng = np.random.default_rng(0)
    B = rng.standard_normal((32, 32)) * 0.1
    H = B @ B.T
    H[np.diag_indices(32)] = 4.0
    S, Z = C.minmax_params(W, 2, 8, False)
    A1, e1 = C.round_gptq(W, S, Z, H, 2, 8, False, True, "half_up")
    A0, e0 = C.round_gptq(W, S, Z, H, 2, 8, False, False, "half_up")
    np.testing.assert_array_equal(A1, A0)
    np.testing.assert_array_equal(e1, e0)
    Ar, _ = R.round_gptq(W, S, Z, H, 2, 8, False, True, "half_up")
    assert_codes_agree(A1, Ar)


# ---------------------------------------------------------------- determinism and threads


def test_two_threads_at_once_give_the_single_result():
    W, H = problem(160, 192, seed=7)
    expected = C.gptq(W, H, 2, 32, False, True, "half_up")
    results = [None, None]

    def run(i):
        results[i] = C.gptq(W, H, 2, 32, False, True, "half_up")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        for a, b in zip(res, expected):
            np.testing.assert_array_equal(a, b)


def test_results_do_not_depend_on_the_core_thread_count(monkeypatch):
    W, H = problem(70, 96, seed=8)
    S, Z = C.minmax_params(W, 3, 32, False)
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "1")
    one = C.round_gptq(W, S, Z, H, 3, 32, False, True, "half_up") + C.gptq(W, H, 3, 32, False, False, "half_up")
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "3")
    three = C.round_gptq(W, S, Z, H, 3, 32, False, True, "half_up") + C.gptq(W, H, 3, 32, False, False, "half_up")
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


SCRIPT = """
import sys, numpy as np
from decoupleq import _C as C
d = np.load(sys.argv[1])
W, H, S, Z = d["W"], d["H"], d["S"], d["Z"]
A, e = C.round_gptq(W, S, Z, H, 2, 16, False, True, "half_up")
B = C.gptq(W, H, 2, 16, False, False, "half_even")
np.savez(sys.argv[2], A=A, e=e, A2=B[0], S2=B[1], Z2=B[2], e2=B[3])
"""


def test_portable_build_is_bit_identical_to_the_simd_build(tmp_path):
    # DECOUPLEQ_KERNEL=reference selects the portable build of the sweep; the
    # AVX2 build (where the CPU has it) must round every operation the same.
    W, H = problem(40, 64, seed=9)
    S, Z = C.minmax_params(W, 2, 16, False)
    out = outputs_per_build(SCRIPT, tmp_path, W=W, H=H, S=S, Z=Z)
    for key in ("A", "e", "A2", "S2", "Z2", "e2"):
        np.testing.assert_array_equal(out["reference"][key], out["auto"][key])


# ---------------------------------------------------------------- bad input


def good():
    W, H = problem(8, 12)
    S, Z = C.minmax_params(W, 2, 4, False)
    return W, H, S, Z


@pytest.mark.parametrize("call,exc,words", [
    (lambda W, H, S, Z: C.round_gptq(W, S, Z, H, 2, 4, False, True, "half_up", blocksize=0), ValueError,
     "blocksize must be >= 1, got 0"),
    (lambda W, H, S, Z: C.gptq(W, H, 2, 4, False, True, "half_up", blocksize=-3), ValueError, "blocksize"),
    (lambda W, H, S, Z: C.round_gptq(W, S, Z, H, 2, 6, False, True, "half_up"), ValueError, "S must have shape (8, 2)"),
    (lambda W, H, S, Z: C.round_gptq(W, S, Z[:, :1].copy(), H, 2, 4, False, True, "half_up"), ValueError,
     "Z must have shape (8, 3)"),
    (lambda W, H, S, Z: C.round_gptq(W, S.astype(np.float64), Z, H, 2, 4, False, True, "half_up"), TypeError,
     "S must have dtype float32"),
    (lambda W, H, S, Z: C.round_gptq(W, S, Z, H, 2, -3, False, True, "half_up"), ValueError,
     "group_size must be -1 (per-channel) or positive, got -3"),
    (lambda W, H, S, Z: C.gptq(W, H, 2, 0, False, True, "half_up"), ValueError,
     "group_size must be -1 (per-channel) or positive, got 0"),
    (lambda W, H, S, Z: C.gptq(W, H, 9, 4, False, True, "half_up"), ValueError, "bits must be in 2..8, got 9"),
    (lambda W, H, S, Z: C.gptq(W, H, 2, 4, False, True, "round"), ValueError, "rule must be"),
    (lambda W, H, S, Z: C.gptq(W, H[:6, :6].copy(), 2, 4, False, True, "half_up"), ValueError,
     "H00 must have shape (12, 12)"),
    (lambda W, H, S, Z: C.gptq(W, np.asfortranarray(H[:, ::-1]), 2, 4, False, True, "half_up"), ValueError,
     "H00 must be C-contiguous"),
    (lambda W, H, S, Z: C.gptq(W.astype(np.float16), H, 2, 4, False, True, "half_up"), TypeError,
     "W must have dtype float32"),
    (lambda W, H, S, Z: C.gptq(W, H.astype(F32), 2, 4, False, True, "half_up"), TypeError,
     "H00 must have dtype float64"),
])
def test_bad_input_names_the_argument(call, exc, words):
    W, H, S, Z = good()
    before = [x.copy() for x in (W, H, S, Z)]
    with pytest.raises(exc) as info:
        call(W, H, S, Z)
    assert words in str(info.value)
    for x, y in zip((W, H, S, Z), before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("which", ["W", "H00", "S", "Z"])
def test_non_finite_input_is_rejected(which):
    W, H, S, Z = good()
    arrays = {"W": W.copy(), "H00": H.copy(), "S": S.copy(), "Z": Z.copy()}
    arrays[which].flat[5] = np.inf
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        C.round_gptq(arrays["W"], arrays["S"], arrays["Z"], arrays["H00"], 2, 4, False, True, "half_up")


def test_inputs_are_not_modified_by_a_successful_call():
    W, H, S, Z = good()
    before = [x.copy() for x in (W, H, S, Z)]
    C.round_gptq(W, S, Z, H, 2, 4, False, True, "half_up")
    C.gptq(W, H, 2, 4, False, True, "half_up")
    C.gptq(W, H, 2, 4, False, False, "half_up")
    for x, y in zip((W, H, S, Z), before):
        np.testing.assert_array_equal(x, y)
