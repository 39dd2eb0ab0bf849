"""C min-max parameters, RTN codes, row errors and rtn() against the NumPy reference."""
import functools

import numpy as np
import pytest

from decoupleq import _C as C
from decoupleq import reference as R
from decoupleq.reference.synthetic import synthetic_problem

F32 = np.float32


def damped(H, percdamp=0.01):
    d = float(np.mean(np.diag(H)))
    return H + (percdamp * d if d != 0 else percdamp) * np.eye(H.shape[0])


@functools.lru_cache(maxsize=None)
def _problem(m, n, seed):
    return synthetic_problem(m, n, seed)


def nasty_weights(m, n, seed):
    """Synthetic weights with an all-zero row, a constant row and a huge outlier."""
    W, H = _problem(m, n, seed)
    W = W.copy()
    if m >= 3:
        W[0] = 0
        W[1] = F32(0.37)
        W[2, n // 2] = F32(1e4)
    return W, damped(H)


def exact_errors(W, A, S, Z, H):
    """e_r in float64 from the float32 dequantised weights (independent of both implementations)."""
    g = W.shape[1] // S.shape[1]
    What = A.astype(F32) * np.repeat(S, g, axis=1) + np.repeat(Z, g, axis=1)
    D = (What - W).astype(np.float64)
    return np.sum((D @ H) * D, axis=1)


SHAPES = [(1, 7, -1), (7, 31, -1), (31, 33, 11), (33, 127, -1), (127, 64, 16), (5, 1, -1), (4, 6, 1)]


@pytest.mark.parametrize("m,n,g", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_and_rtn_codes_are_bit_identical(m, n, g, bits, symmetric):
    W, _ = nasty_weights(m, n, seed=0)
    S, Z = C.minmax_params(W, bits, g, symmetric)
    Sr, Zr = R.minmax_params(W, bits, g, symmetric)
    np.testing.assert_array_equal(S, Sr)
    np.testing.assert_array_equal(Z, Zr)
    for rule in ("half_up", "half_even"):
        np.testing.assert_array_equal(C.rtn_codes(W, S, Z, bits, symmetric, rule),
                                      R.rtn_codes(W, S, Z, bits, symmetric, rule))


def test_minmax_shrink_per_row_is_bit_identical():
    W, _ = nasty_weights(33, 64, seed=4)
    p = np.linspace(0.205, 1.0, 33).astype(F32)
    for symmetric in (False, True):
        S, Z = C.minmax_params(W, 2, 16, symmetric, p_row=p)
        Sr, Zr = R.minmax_params(W, 2, 16, symmetric, p_row=p)
        np.testing.assert_array_equal(S, Sr)
        np.testing.assert_array_equal(Z, Zr)


def test_minmax_follows_the_grid_definition():
    # Hand-checked: lo = -1, hi = 2 -> s = 3/3 = 1, z = lo - s*qmin = -1 + 2 = 1 (2 bits).
    W = np.array([[-1.0, 0.5, 2.0, 0.0]], F32)
    S, Z = C.minmax_params(W, 2, -1, False)
    assert S[0, 0] == F32(1.0) and Z[0, 0] == F32(1.0)
    # Symmetric: hi = max(|lo|, hi) = 2, lo = -2 -> s = 4/3, z = 0.
    S, Z = C.minmax_params(W, 2, -1, True)
    assert S[0, 0] == F32(4.0) / F32(3.0) and Z[0, 0] == 0
    # An all-zero group gets the range [-1, 1].
    S, Z = C.minmax_params(np.zeros((1, 4), F32), 2, -1, False)
    assert S[0, 0] == F32(2.0) / F32(3.0) and Z[0, 0] == F32(-1.0) + S[0, 0] * F32(2.0)


def test_rtn_rounding_rules_on_exact_ties():
    # With s = 1, z = 0 the codes are R(w): ties at x.5 split the two rules.
    W = np.array([[-2.5, -1.5, -0.5, 0.5, 1.5, 0.49999997, -0.50000006]], F32)
    S = np.ones((1, 1), F32)
    Z = np.zeros((1, 1), F32)
    up = C.rtn_codes(W, S, Z, 3, False, "half_up")
    even = C.rtn_codes(W, S, Z, 3, False, "half_even")
    np.testing.assert_array_equal(up[0], [-2, -1, 0, 1, 2, 0, -1])
    np.testing.assert_array_equal(even[0], [-2, -2, 0, 0, 2, 0, -1])


def test_rtn_codes_clamp_to_the_signed_range():
    W = np.array([[-100.0, 100.0, 0.0]], F32)
    A = C.rtn_codes(W, np.ones((1, 1), F32), np.zeros((1, 1), F32), 2, False, "half_up")
    np.testing.assert_array_equal(A[0], [-2, 1, 0])


def test_symmetric_rtn_ignores_z():
    W, _ = nasty_weights(7, 31, seed=1)
    S, _ = C.minmax_params(W, 3, -1, True)
    Z = np.full_like(S, 5.0)
    np.testing.assert_array_equal(C.rtn_codes(W, S, Z, 3, True, "half_up"),
                                  C.rtn_codes(W, S, np.zeros_like(S), 3, True, "half_up"))


@pytest.mark.parametrize("m,n,g", [(1, 7, -1), (31, 33, 11), (127, 96, 32), (64, 256, -1)])
def test_row_errors_match_reference_and_float64(m, n, g):
    W, H = nasty_weights(m, n, seed=7)
    S, Z = C.minmax_params(W, 2, g, False)
    A = C.rtn_codes(W, S, Z, 2, False, "half_up")
    err = C.row_errors(W, A, S, Z, H)
    # Same float32 GEMM plus float64 row sums: agreement to rounding.
    np.testing.assert_allclose(err, R.row_errors(W, A, S, Z, H), rtol=1e-5, atol=0)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H), rtol=1e-4, atol=0)


def test_row_errors_of_exact_weights_are_zero_and_match_hand_value():
    W = np.array([[1.0, -1.0], [0.0, 0.0]], F32)
    H = np.array([[2.0, 0.5], [0.5, 1.0]])
    A = np.array([[1, -1], [0, 0]], np.int8)
    S = np.ones((2, 1), F32)
    Z = np.zeros((2, 1), F32)
    np.testing.assert_array_equal(C.row_errors(W, A, S, Z, H), [0.0, 0.0])
    # Row 1: D = (1, -1): D H D^T = 2 - 2*0.5 + 1 = 2.
    A2 = np.array([[1, -1], [1, -1]], np.int8)
    np.testing.assert_allclose(C.row_errors(W, A2, S, Z, H), [0.0, 2.0], rtol=1e-12)


@pytest.mark.parametrize("bits,g,symmetric,rule", [(2, -1, False, "half_up"), (3, 11, False, "half_even"),
                                                   (4, 33, True, "half_up"), (8, -1, False, "half_up")])
def test_rtn_method_matches_reference(bits, g, symmetric, rule):
    W, H = nasty_weights(31, 66, seed=3) if g != 11 else nasty_weights(31, 33, seed=3)
    A, S, Z, err = C.rtn(W, H, bits, g, symmetric, rule)
    Ar, Sr, Zr, er = R.rtn(W, H, bits, g, symmetric, rule)
    np.testing.assert_array_equal(A, Ar)
    np.testing.assert_array_equal(S, Sr)
    np.testing.assert_array_equal(Z, Zr)
    np.testing.assert_allclose(err, er, rtol=1e-5, atol=0)
    assert A.dtype == np.int8 and S.dtype == F32 and err.dtype == np.float64
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert A.min() >= lo and A.max() <= hi


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    W, H = nasty_weights(127, 96, seed=5)
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "1")
    one = C.rtn(W, H, 2, 32, False, "half_up")
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "3")
    three = C.rtn(W, H, 2, 32, False, "half_up")
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- bad input


def good():
    W, H = nasty_weights(8, 12, seed=0)
    S, Z = C.minmax_params(W, 2, 4, False)
    A = C.rtn_codes(W, S, Z, 2, False, "half_up")
    return W, H, S, Z, A


@pytest.mark.parametrize("call,exc,words", [
    (lambda W, H, S, Z, A: C.minmax_params(W.astype(np.float64), 2, 4, False), TypeError, "W must have dtype float32"),
    (lambda W, H, S, Z, A: C.minmax_params(W[:, ::2], 2, 2, False), ValueError, "W must be C-contiguous"),
    (lambda W, H, S, Z, A: C.minmax_params(W[0], 2, 4, False), ValueError, "W must be 2-dimensional"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 9, 4, False), ValueError, "bits must be in 2..8, got 9"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 1, 4, False), ValueError, "bits"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 2, -2, False), ValueError, "group_size must be -1 (per-channel) or positive, got -2"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 2, 0, False), ValueError, "group_size"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 2, 4, False, p_row=np.ones(7, F32)), ValueError, "p_row"),
    (lambda W, H, S, Z, A: C.minmax_params(W, 2, 4, False, p_row=np.zeros(8, F32)), ValueError, "p_row must lie in (0, 1]"),
    (lambda W, H, S, Z, A: C.rtn_codes(W, np.ones((8, 5), F32), np.ones((8, 5), F32), 2, False, "half_up"), ValueError, "S must have shape"),
    (lambda W, H, S, Z, A: C.rtn_codes(W, S, Z[:4].copy(), 2, False, "half_up"), ValueError, "Z must have the shape of S"),
    (lambda W, H, S, Z, A: C.rtn_codes(W, S, Z, 2, False, "nearest"), ValueError, "rule must be"),
    (lambda W, H, S, Z, A: C.rtn_codes(W, S.astype(np.float64), Z, 2, False, "half_up"), TypeError, "S must have dtype float32"),
    (lambda W, H, S, Z, A: C.row_errors(W, A.astype(np.int16), S, Z, H), TypeError, "A must have dtype int8"),
    (lambda W, H, S, Z, A: C.row_errors(W, A[:4].copy(), S, Z, H), ValueError, "A must have W's shape"),
    (lambda W, H, S, Z, A: C.row_errors(W, A, S, Z, H[:5, :5].copy()), ValueError, "H00 must have shape (12, 12)"),
    (lambda W, H, S, Z, A: C.row_errors(W, A, S, Z, H.astype(F32)), TypeError, "H00 must have dtype float64"),
    (lambda W, H, S, Z, A: C.rtn(W, H, 2, -5, False, "half_up"), ValueError, "group_size must be -1 (per-channel) or positive, got -5"),
    (lambda W, H, S, Z, A: C.rtn(np.zeros((0, 12), F32), H, 2, -1, False, "half_up"), ValueError, "at least one row"),
])
def test_bad_input_names_the_argument(call, exc, words):
    W, H, S, Z, A = good()
    before = [x.copy() for x in (W, H, S, Z, A)]
    with pytest.raises(exc) as info:
        call(W, H, S, Z, A)
    assert words in str(info.value)
    for x, y in zip((W, H, S, Z, A), before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("which", ["W", "H00", "S", "Z"])
def test_non_finite_input_is_rejected(which):
    W, H, S, Z, A = good()
    arrays = {"W": W, "H00": H, "S": S, "Z": Z}
    arrays[which] = arrays[which].copy()
    arrays[which].flat[3] = np.nan
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        if which in ("W", "H00"):
            C.rtn(arrays["W"], arrays["H00"], 2, 4, False, "half_up")
        else:
            C.row_errors(W, A, arrays["S"], arrays["Z"], H)
