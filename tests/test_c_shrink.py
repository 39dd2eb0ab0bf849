"""The C shrink search (csrc/dq_shrink.c) against brute force and the NumPy reference.

The C search evaluates the same objective as the reference (per-row H00 error
of the RTN codes under the range p (lo, hi), p = float32(1 - i/200),
i = 1..159, strictly better than min-max), but not by 159 GEMMs: it estimates
every candidate incrementally and checks the near-best ones exactly.  These
tests hold the outcome to the exhaustive search.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import decoupleq._C as C
import decoupleq.reference as R

P_GRID = np.array([np.float32(1.0 - i / 200) for i in range(160)], np.float32)


def damp(H, percdamp=0.01):
    return H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))


def problem(m, n, seed):
    W, H = R.synthetic_problem(m, n, seed)
    return W, damp(H)


def all_candidate_errors(W, H, bits, group_size, symmetric, rule):
    """(160, m) errors of every candidate, each by the C row_errors GEMM."""
    m = W.shape[0]
    out = []
    for p in P_GRID:
        S, Z = C.minmax_params(W, bits, group_size, symmetric, np.full(m, p, np.float32))
        A = C.rtn_codes(W, S, Z, bits, symmetric, rule)
        out.append(C.row_errors(W, A, S, Z, H))
    return np.array(out)


# Two float32 GEMMs over different row counts may round differently (OpenBLAS
# picks its kernels by size): errors of the same parameters agree to ~1e-8.
GEMM_RTOL = 1e-6
# Below float32's smallest subnormal (1.4e-45) a float32 GEMM has no digits
# left: errors of rows of near-underflow weights are compared absolutely there.
GEMM_ATOL = 1.4e-45


def check_against_brute_force(W, H, bits, group_size, symmetric, rule):
    m = W.shape[0]
    S, Z, p, err = C.shrink_search(W, H, bits, group_size, symmetric, rule)
    E = all_candidate_errors(W, H, bits, group_size, symmetric, rule)
    # p is on the grid, and (S, Z) are exactly min-max shrunk by p.
    idx = np.searchsorted(-P_GRID, -p)
    np.testing.assert_array_equal(P_GRID[idx], p)
    S2, Z2 = C.minmax_params(W, bits, group_size, symmetric, p)
    np.testing.assert_array_equal(S, S2)
    np.testing.assert_array_equal(Z, Z2)
    # err is the error of the returned parameters' RTN codes.
    A = C.rtn_codes(W, S, Z, bits, symmetric, rule)
    np.testing.assert_allclose(err, C.row_errors(W, A, S, Z, H), rtol=GEMM_RTOL, atol=GEMM_ATOL)
    np.testing.assert_allclose(err, E[idx, np.arange(m)], rtol=GEMM_RTOL, atol=GEMM_ATOL)
    # As good as the exhaustive search: the best of all 159 candidates...
    best = E[1:].min(axis=0)
    assert np.all(err <= np.minimum(best, E[0]) * (1 + GEMM_RTOL))
    # ... strictly better than min-max when a shrink is taken, and p = 1 with
    # the min-max error itself when no candidate is (clearly) better.
    shrunk = p < 1
    assert np.all(err[shrunk] < E[0][shrunk])
    np.testing.assert_array_equal(err[~shrunk], E[0][~shrunk])
    assert np.all(best[~shrunk] >= E[0][~shrunk] * (1 - GEMM_RTOL))
    return p


@pytest.mark.parametrize("bits, group_size", [(2, -1), (2, 16), (3, 32), (4, -1)])
def test_equals_exhaustive_search(bits, group_size):
    W, H = problem(40, 128, bits)
    p = check_against_brute_force(W, H, bits, group_size, False, "half_up")
    assert np.mean(p < 1) > 0.5  # the search is doing something on these rows


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_higher_bits(bits):
    W, H = problem(12, 64, bits)
    check_against_brute_force(W, H, bits, 32, False, "half_up")


@pytest.mark.parametrize("symmetric, rule", [(True, "half_up"), (False, "half_even"),
                                             (True, "half_even")])
def test_symmetric_and_rounding_rules(symmetric, rule):
    W, H = problem(24, 96, 11)
    check_against_brute_force(W, H, 2, 32, symmetric, rule)


@pytest.mark.parametrize("n, group_size", [(1, -1), (7, -1), (7, 1), (33, 11), (33, 3),
                                           (127, -1)])
def test_odd_sizes(n, group_size):
    W, H = problem(7, n, n)
    check_against_brute_force(W, H, 2, group_size, False, "half_up")
    check_against_brute_force(W, H, 3, group_size, True, "half_up")


def test_nasty_rows():
    W, H = problem(8, 64, 12)
    W[0] = 0.0                              # all zero: range (-1, 1)
    W[1] = -0.25                            # constant
    W[2, 9] = 50.0                          # one huge outlier
    W[3] = np.float32(1e-30)                # tiny, all equal
    W[4] = np.round(W[4] * 64) / 64         # values on a lattice: exact ties
    W[5, :32] = 0.0                         # an all-zero group
    W[6] *= np.float32(1e-40)               # subnormal: the scale underflows
    for group_size in (-1, 32):
        for symmetric in (False, True):
            check_against_brute_force(W, H, 2, group_size, symmetric, "half_up")


def test_matches_reference():
    W, H = problem(24, 64, 13)
    for bits, group_size, symmetric in [(2, -1, False), (2, 16, False), (3, 32, True)]:
        S, Z, p, err = C.shrink_search(W, H, bits, group_size, symmetric, "half_up")
        S_r, Z_r, p_r, err_r = R.shrink_search(W, H, bits, group_size, symmetric, "half_up")
        # Same objective: the reference's error of the C choice is its best,
        # up to the two libraries' float32 GEMM rounding.
        A = R.rtn_codes(W, S, Z, bits, symmetric, "half_up")
        e_r_of_c = R.row_errors(W, A, S, Z, H)
        assert np.all(e_r_of_c <= err_r * (1 + 1e-6))
        np.testing.assert_allclose(err, err_r, rtol=1e-5)
        same = p == p_r
        np.testing.assert_array_equal(S[same], S_r[same])
        np.testing.assert_array_equal(Z[same], Z_r[same])


def test_plain_c_replay_gives_the_same_bits():
    # DECOUPLEQ_KERNEL=reference forces the scalar replay; it rounds like the AVX2 one.
    code = (
        "import numpy as np, decoupleq._C as C, decoupleq.reference as R\n"
        "W, H = R.synthetic_problem(16, 200, 5)\n"
        "H = H + 0.01 * np.mean(np.diag(H)) * np.eye(200)\n"
        "out = C.shrink_search(W, H, 2, -1, False, 'half_up')\n"
        "import sys; sys.stdout.buffer.write(b''.join(np.ascontiguousarray(x).tobytes() for x in out))\n"
    )
    env = dict(os.environ)
    results = []
    for kernel in ("auto", "reference"):
        env["DECOUPLEQ_KERNEL"] = kernel
        results.append(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                      capture_output=True).stdout)
    assert results[0] == results[1] and len(results[0]) > 0


def test_bad_arguments_name_the_argument():
    W, H = problem(4, 16, 1)
    with pytest.raises(ValueError, match="bits must be in 2..8, got 1"):
        C.shrink_search(W, H, 1, -1, False, "half_up")
    with pytest.raises(ValueError, match="rule must be 'half_up' or 'half_even', got 'nearest'"):
        C.shrink_search(W, H, 2, -1, False, "nearest")
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or positive, got 0"):
        C.shrink_search(W, H, 2, 0, False, "half_up")
    with pytest.raises(TypeError, match="W must have dtype float32"):
        C.shrink_search(W.astype(np.float64), H, 2, -1, False, "half_up")
    with pytest.raises(ValueError, match="H00 must have shape"):
        C.shrink_search(W, H[:4, :4].copy(), 2, -1, False, "half_up")
    bad = W.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        C.shrink_search(bad, H, 2, -1, False, "half_up")


def test_caller_arrays_untouched_deterministic_and_keyword_capable():
    W, H = problem(16, 64, 2)
    copies = [W.copy(), H.copy()]
    out1 = C.shrink_search(W=W, H00=H, bits=2, group_size=16, symmetric=False, rule="half_up")
    np.testing.assert_array_equal(W, copies[0])
    np.testing.assert_array_equal(H, copies[1])
    out2 = C.shrink_search(W, H, 2, 16, False, "half_up")
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)
    assert out1[2].dtype == np.float32 and out1[3].dtype == np.float64
