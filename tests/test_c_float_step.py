"""The C float step (csrc/dq_float_step.c) against least squares and the NumPy reference.

The closed form is the exact least-squares (S, Z) for fixed codes, so the
ground truth here is an independent float64 solve (numpy.linalg.lstsq on the
design matrix in the H00 metric).  The reference's float step is the same
optimum computed in float64; the C step assembles its normal equations from
float32 products, so parameters agree to ~1e-4 of the row's scale and errors
to float32 GEMM noise.
"""
import threading

import numpy as np
import pytest

import decoupleq._C as C
import decoupleq.reference as R


def damp(H, percdamp=0.01):
    return H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))


def problem(m, n, seed):
    W, H = R.synthetic_problem(m, n, seed)
    return W, damp(H)


def random_codes(m, n, bits, seed):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.random.default_rng(seed).integers(lo, hi + 1, (m, n)).astype(np.int8)


def rtn(W, bits, group_size, symmetric):
    S, Z = R.minmax_params(W, bits, group_size, symmetric)
    return R.rtn_codes(W, S, Z, bits, symmetric, "half_up")


def dequant(A, S, Z):
    g = A.shape[1] // S.shape[1]
    return A.astype(np.float32) * np.repeat(S, g, axis=1) + np.repeat(Z, g, axis=1)


def exact_errors(W, A, S, Z, H00):
    """float64 errors of the float32 dequantised weights."""
    D = dequant(A, S, Z).astype(np.float64) - W.astype(np.float64)
    return np.einsum("ij,jk,ik->i", D, H00, D)


def lstsq_optimum(W, A, H00, g, symmetric):
    """Per-row float64 least squares in the H00 metric: (S, Z, error)."""
    m, n = W.shape
    G = n // g
    L = np.linalg.cholesky(H00)
    S, Z, E = np.zeros((m, G)), np.zeros((m, G)), np.zeros(m)
    for r in range(m):
        cols = []
        for j in range(G):
            b = np.zeros(n)
            b[j * g:(j + 1) * g] = A[r, j * g:(j + 1) * g]
            cols.append(b)
        if not symmetric:
            for j in range(G):
                b = np.zeros(n)
                b[j * g:(j + 1) * g] = 1.0
                cols.append(b)
        B = np.array(cols)
        w = W[r].astype(np.float64)
        theta = np.linalg.lstsq((B @ L).T, w @ L, rcond=None)[0]
        S[r] = theta[:G]
        if not symmetric:
            Z[r] = theta[G:]
        d = theta @ B - w
        E[r] = d @ H00 @ d
    return S, Z, E


def wHw(W, H):
    W64 = W.astype(np.float64)
    return np.einsum("ij,jk,ik->i", W64, H, W64)


def f32_noise(c, E):
    """How far float32 storage alone moves an error E of a row with w H w^T = c.

    The dequantised row A*S + Z is rounded to float32 (relative 2^-24 of
    |w_hat|), which shifts E by up to about 2 * 2^-24 * sqrt(c E) (Cauchy-
    Schwarz in the H metric); 4x that covers the normal-equation rounding too.
    At 2 bits this is ~1e-7 of E, at 8 bits ~1e-4 (E << c there).
    """
    return 8 * 2.0**-24 * np.sqrt(c * E) + 1e-12 * c


@pytest.mark.parametrize("n, group_size", [(1, -1), (7, -1), (7, 1), (33, 11), (33, 3),
                                           (127, -1), (32, 8)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_optimal_against_lstsq_odd_sizes(n, group_size, symmetric):
    m = 9
    W, H = problem(m, n, 3)
    g = n if group_size == -1 else group_size
    for bits in (2, 5):
        A = random_codes(m, n, bits, bits + n)
        S, Z, err = C.float_step(W, A, H, group_size, symmetric)
        assert S.shape == Z.shape == (m, n // g) and err.shape == (m,)
        assert S.dtype == Z.dtype == np.float32 and err.dtype == np.float64
        _, _, E_opt = lstsq_optimum(W, A, H, g, symmetric)
        E_c = exact_errors(W, A, S, Z, H)
        # Never worse than the optimum beyond float32 storage (g = 1 fits
        # exactly: the optimum is 0 and only the storage noise is left).
        assert np.all(E_c <= E_opt + f32_noise(wHw(W, H), np.maximum(E_opt, 1e-6 * wHw(W, H))))
        if symmetric:
            assert np.all(Z == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size, symmetric", [(-1, False), (-1, True), (32, False),
                                                   (32, True)])
def test_matches_reference_on_rtn_codes(bits, group_size, symmetric):
    W, H = problem(24, 96, bits)
    A = rtn(W, bits, group_size, symmetric)
    S, Z, err = C.float_step(W, A, H, group_size, symmetric)
    S_r, Z_r, err_r = R.float_step(W, A, H, group_size, symmetric)
    # Parameters: relative to the row's largest |S| (|Z|), since a poorly
    # determined small scale is only known to that precision.
    scale = np.abs(S_r).max(axis=1, keepdims=True)
    assert np.all(np.abs(S - S_r) <= 1e-4 * scale)
    if not symmetric:
        zscale = np.abs(Z_r).max(axis=1, keepdims=True)
        assert np.all(np.abs(Z - Z_r) <= 1e-4 * zscale)
    # Both are the optimum: the true errors of the two agree to float32
    # storage noise (the reference's absolute det guard aside, which never
    # triggers on this problem's scale).
    E_c, E_r = exact_errors(W, A, S, Z, H), exact_errors(W, A, S_r, Z_r, H)
    assert np.all(np.abs(E_c - E_r) <= f32_noise(wHw(W, H), E_r))


def test_err_is_row_errors_of_the_returned_parameters():
    W, H = problem(40, 128, 5)
    for group_size in (-1, 32):
        A = rtn(W, 2, group_size, False)
        S, Z, err = C.float_step(W, A, H, group_size, False)
        np.testing.assert_array_equal(err, C.row_errors(W, A, S, Z, H))
        # ... which is a float32 GEMM (H00 rounded to float32): ~1e-6 of E.
        E = exact_errors(W, A, S, Z, H)
        assert np.all(np.abs(err - E) <= 1e-5 * E)


def test_never_worse_than_the_parameters_it_replaces():
    W, H = problem(32, 128, 6)
    for group_size in (-1, 16, 64):
        S0, Z0 = R.minmax_params(W, 3, group_size, False)
        A = R.rtn_codes(W, S0, Z0, 3, False, "half_up")
        _, _, err = C.float_step(W, A, H, group_size, False)
        assert np.all(err <= R.row_errors(W, A, S0, Z0, H) * (1 + 1e-6))


def test_nasty_rows_stay_finite_and_optimal():
    m, n, g = 6, 48, 16
    W, H = problem(m, n, 7)
    W[0] = 0.0                        # all zero
    W[1] = 0.37                       # constant
    W[2, 5] = 1e4                     # one huge outlier
    A = random_codes(m, n, 2, 1)
    A[3, :g] = 1                      # all-equal codes in a group: P singular
    A[4, g:2 * g] = 0                 # all-zero codes in a group
    A[5] = -2                         # every group all-equal
    for group_size in (-1, g):
        for symmetric in (False, True):
            S, Z, err = C.float_step(W, A, H, group_size, symmetric)
            assert np.all(np.isfinite(S)) and np.all(np.isfinite(Z)) and np.all(np.isfinite(err))
            gg = n if group_size == -1 else group_size
            _, _, E_opt = lstsq_optimum(W, A, H, gg, symmetric)
            E_c = exact_errors(W, A, S, Z, H)
            c = wHw(W, H)
            assert np.all(E_c <= E_opt + f32_noise(c, np.maximum(E_opt, 1e-9 * c)))
    # The all-zero row is reproduced exactly (Z = 0 fits it).
    S, Z, err = C.float_step(W, A, H, g, False)
    assert err[0] == 0.0
    # A constant row with all-equal codes is a constant: exact as well.
    A2 = A.copy()
    A2[1] = 1
    S, Z, err = C.float_step(W, A2, H, -1, False)
    np.testing.assert_allclose(dequant(A2, S, Z)[1], W[1], rtol=1e-6)


def test_all_equal_codes_keep_a_scale_that_reproduces_the_group():
    # Codes q != 0 over a whole group: s_j and z_j are interchangeable; the
    # solve fixes z_j = 0 and puts the group's value in s_j = value / q.
    W, H = problem(3, 32, 8)
    A = random_codes(3, 32, 2, 2)
    A[:, 8:16] = -2
    S, Z, err = C.float_step(W, A, H, 8, False)
    assert np.all(Z[:, 1] == 0) and np.all(S[:, 1] != 0)


def test_tiny_and_huge_scales_are_handled_relatively():
    # The reference's absolute det guard (1e-5) distorts a layer whose
    # Hessian is tiny; the relative guard gives the same optimum at any scale.
    W, H = problem(8, 64, 9)
    A = rtn(W, 2, -1, False)
    S1, Z1, e1 = C.float_step(W, A, H, -1, False)
    S2, Z2, e2 = C.float_step(W, A, H * 1e-12, -1, False)
    np.testing.assert_allclose(S2, S1, rtol=1e-5)
    np.testing.assert_allclose(Z2, Z1, rtol=1e-4, atol=1e-4 * np.abs(Z1).max())
    np.testing.assert_allclose(e2, e1 * 1e-12, rtol=1e-5)


def test_bad_arguments_name_the_argument():
    W, H = problem(4, 16, 1)
    A = random_codes(4, 16, 2, 0)
    with pytest.raises(TypeError, match="W must have dtype float32"):
        C.float_step(W.astype(np.float64), A, H, -1, False)
    with pytest.raises(TypeError, match="A must have dtype int8"):
        C.float_step(W, A.astype(np.int32), H, -1, False)
    with pytest.raises(ValueError, match=r"A must have the shape of W \(4, 16\), got \(4, 8\)"):
        C.float_step(W, np.ascontiguousarray(A[:, :8]), H, -1, False)
    with pytest.raises(ValueError, match="A must be C-contiguous"):
        C.float_step(W, np.asfortranarray(A), H, -1, False)
    with pytest.raises(ValueError, match="H00 must have shape"):
        C.float_step(W, A, H[:8, :8].copy(), -1, False)
    with pytest.raises(TypeError, match="H00 must have dtype float64"):
        C.float_step(W, A, H.astype(np.float32), -1, False)
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or positive, got -2"):
        C.float_step(W, A, H, -2, False)
    with pytest.raises(ValueError, match="group_size"):
        C.float_step(W, A, H, 0, False)
    bad = W.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        C.float_step(bad, A, H, -1, False)
    badH = H.copy()
    badH[0, 0] = np.inf
    with pytest.raises(ValueError, match="H00 contains NaN or Inf"):
        C.float_step(W, A, badH, -1, False)
    with pytest.raises(TypeError):
        C.float_step(W, A, H, -1)


def test_caller_arrays_untouched_deterministic_and_keyword_capable():
    W, H = problem(16, 64, 2)
    A = rtn(W, 2, 16, False)
    copies = [x.copy() for x in (W, A, H)]
    out1 = C.float_step(W=W, A=A, H00=H, group_size=16, symmetric=False)
    for x, y in zip((W, A, H), copies):
        np.testing.assert_array_equal(x, y)
    out2 = C.float_step(W, A, H, 16, False)
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)


def test_reentrant_from_threads():
    W, H = problem(32, 64, 4)
    A = rtn(W, 2, 16, False)
    want = C.float_step(W, A, H, 16, False)
    got = [None] * 4

    def run(i):
        got[i] = C.float_step(W, A, H, 16, False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in got:
        for a, b in zip(out, want):
            np.testing.assert_array_equal(a, b)
