"""The NumPy reference held to the properties of ALGORITHM.md (not to itself).

Small shapes only: the reference is the literal, slow algorithm.
"""
import numpy as np
import pytest

from decoupleq import reference as R
from decoupleq.reference.gptq import gptq_sweep
from decoupleq.reference.grid import round_rule
from decoupleq.reference.pgd import _ProjectedAdam

HALF_UP = "half_up"


def damp(H, percdamp=0.01):
    """ALGORITHM 1.1: H + percdamp * mean(diag H) * I (percdamp * I if diag H is all zero)."""
    d = float(np.mean(np.diag(H)))
    return H + (percdamp * d if d > 0 else percdamp) * np.eye(H.shape[0])


def problem(m, n, seed, n_tokens=None):
    W, H = R.synthetic_problem(m, n, seed, n_tokens)
    return W, damp(H)


def solve_dq(W, H00, bits=2, group_size=-1, symmetric=False, act_order=False, iterations=3,
             rounding="gptq", blocksize=8, k1=0, k2=2, lr=1e-3, rule=HALF_UP):
    return R.decoupleq(W, H00, bits, group_size, symmetric, act_order, rule, iterations,
                       rounding, blocksize, k1, k2, lr)


def dequant(A, S, Z):
    g = A.shape[1] // S.shape[1]
    return A.astype(np.float64) * np.repeat(S, g, 1) + np.repeat(Z, g, 1)


def exact_errors(W, A, S, Z, H00):
    D = dequant(A, S, Z) - W
    return np.einsum("ij,jk,ik->i", D, H00, D)


# ------------------------------------------------------------------ 1.2-1.4


def test_rounding_rule_examples():
    x = np.array([0.5, 1.5, -0.5, -2.5, 2.5, -1.5, 0.49999997, -0.50000006, 3.0], np.float32)
    assert round_rule(x, "half_up").tolist() == [1, 2, 0, -2, 3, -1, 0, -1, 3]
    assert round_rule(x, "half_even").tolist() == [0, 2, -0.0, -2, 2, -2, 0, -1, 3]
    assert round_rule(x, HALF_UP).dtype == np.float32


def test_rtn_codes_ties_follow_the_rule():
    # lo = -3, hi = 0: s = 3/3 = 1, z = lo - s*qmin = -1; (w - z)/s = w + 1 exactly.
    W = np.array([[-3.0, -2.5, -1.5, -0.5, 0.0]], np.float32)
    S, Z = R.minmax_params(W, 2, -1, False)
    assert S.tolist() == [[1.0]] and Z.tolist() == [[-1.0]]
    assert R.rtn_codes(W, S, Z, 2, False, "half_up").tolist() == [[-2, -1, 0, 1, 1]]
    assert R.rtn_codes(W, S, Z, 2, False, "half_even").tolist() == [[-2, -2, 0, 0, 1]]


def test_minmax_params_by_hand():
    W = np.array([[-1.0, 0.5, 0.0, 0.0, 2.0, 3.0],
                  [0.0, 0.0, 1.5, -1.5, -6.0, 1.0]], np.float32)
    S, Z = R.minmax_params(W, 2, 2, False)
    # groups: [-1, .5] [0, 0] [2, 3] / [0, 0] [1.5, -1.5] [-6, 1]
    np.testing.assert_array_equal(S, np.float32([[0.5, 2 / 3, 1.0], [2 / 3, 1.0, 7 / 3]]))
    # z = lo + 2s: lo = -1, -1 (empty), 0 / -1 (empty), -1.5, -6
    np.testing.assert_allclose(Z, [[0.0, 1 / 3, 2.0], [1 / 3, 0.5, -6 + 14 / 3]], rtol=1e-6)
    Ss, Zs = R.minmax_params(W, 2, 2, True)
    # symmetric: hi = max(|lo|, hi), lo = -hi if lo < 0; an all-positive group keeps lo = 0
    np.testing.assert_allclose(Ss, [[2 / 3, 2 / 3, 1.0], [2 / 3, 1.0, 4.0]], rtol=1e-6)
    assert not Zs.any()
    p = np.float32([0.5, 1.0])
    Sp, Zp = R.minmax_params(W, 2, 2, False, p_row=p)
    np.testing.assert_array_equal(Sp[0], S[0] * np.float32(0.5))
    np.testing.assert_array_equal(Sp[1], S[1])
    np.testing.assert_array_equal(Zp[0], Z[0] * np.float32(0.5))


@pytest.mark.parametrize("bits", range(2, 9))
def test_minmax_grid_covers_the_range(bits):
    W, _ = problem(7, 24, bits)
    S, Z = R.minmax_params(W, bits, 8, False)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = W.reshape(7, 3, 8)
    lo, hi = np.minimum(g.min(2), 0), np.maximum(g.max(2), 0)
    np.testing.assert_allclose(qmin * S + Z, lo, atol=1e-6)
    np.testing.assert_allclose(qmax * S + Z, hi, atol=1e-6)
    A = R.rtn_codes(W, S, Z, bits, False, HALF_UP)
    assert A.min() >= qmin and A.max() <= qmax
    # RTN: every element within half a step of its dequantised value.
    assert np.all(np.abs(dequant(A, S, Z) - W) <= 0.5 * np.repeat(S, 8, 1) * (1 + 1e-5))


def test_row_errors_is_the_quadratic_form():
    W, H00 = problem(5, 16, 3)
    A, S, Z, _ = R.rtn(W, H00, 3, 4, False, HALF_UP)
    e = R.row_errors(W, A, S, Z, H00)
    assert e.dtype == np.float64 and e.shape == (5,)
    np.testing.assert_allclose(e, exact_errors(W, A, S, Z, H00), rtol=1e-5)


# ------------------------------------------------------------------ 2.1 / 2.2


def _upper_inv_factor(Hf):
    """The unique upper U with Hf^-1 = UᵀU."""
    return np.linalg.cholesky(np.linalg.inv(Hf)).T


@pytest.mark.parametrize("blocksize", [1, 5, 16, 64])
def test_gptq_sweep_exact_error_identity(blocksize):
    # ALGORITHM 2.1: Δ = Q - W = -E U, so Δ H_f Δᵀ = E Eᵀ row by row.
    W, H00 = problem(6, 33, 4)
    Hf = H00 + 0.05 * np.eye(33)
    U = _upper_inv_factor(Hf).astype(np.float32)
    step = np.float32(0.02)
    Q, E = gptq_sweep(W, U, blocksize, lambda j, w, sweep: np.round(w / step) * step)
    D = Q.astype(np.float64) - W
    lhs = np.einsum("ij,jk,ik->i", D, Hf, D)
    np.testing.assert_allclose(lhs, np.sum(E.astype(np.float64) ** 2, axis=1), rtol=1e-4)
    np.testing.assert_allclose(D, -(E.astype(np.float64) @ U), atol=1e-6)


def _check_fed_back_weights_round_to_codes(W, A, S, Z, U, bits, tol=1e-3):
    """Each code is the nearest in-range grid point of the weight with the error feedback of
    all earlier columns: w~_i = w_i - Σ_{k<i} e_k U_ki = q_i + e_i U_ii, with E = -Δ U⁻¹."""
    Q = dequant(A, S, Z)
    E = -np.linalg.solve(U.T, (Q - W).T).T
    W_fed = Q + E * np.diag(U)
    g = W.shape[1] // S.shape[1]
    t = (W_fed - np.repeat(Z, g, 1)) / np.repeat(S, g, 1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dist = np.abs(np.clip(t, qmin, qmax) - A)
    assert dist.max() <= 0.5 + tol


def test_round_gptq_codes_round_the_fed_back_weights():
    W, H00 = problem(8, 32, 5)
    S, Z = R.minmax_params(W, 2, 8, False)
    A, err = R.round_gptq(W, S, Z, H00, 2, 8, False, False, HALF_UP, blocksize=6)
    Hround = H00 + 0.01 * np.mean(np.diag(H00)) * np.eye(32)
    _check_fed_back_weights_round_to_codes(W, A, S, Z, _upper_inv_factor(Hround), 2)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)


def test_round_gptq_on_diagonal_hessian_is_rtn():
    # U is diagonal, so no error is fed forward: the step is plain RTN.
    W, _ = problem(7, 31, 6)
    H00 = np.diag(np.linspace(0.5, 3.0, 31))
    S, Z = R.minmax_params(W, 3, -1, False)
    for act_order in (False, True):
        A, _ = R.round_gptq(W, S, Z, H00, 3, -1, False, act_order, HALF_UP, blocksize=4)
        np.testing.assert_array_equal(A, R.rtn_codes(W, S, Z, 3, False, HALF_UP))


def test_round_gptq_act_order_is_a_column_permutation():
    W, H00 = problem(6, 24, 7)
    S, Z = R.minmax_params(W, 2, -1, False)
    perm = np.argsort(-np.diag(H00), kind="stable")
    A, _ = R.round_gptq(W, S, Z, H00, 2, -1, False, True, HALF_UP, blocksize=5)
    Wp = np.ascontiguousarray(W[:, perm])
    Hp = np.ascontiguousarray(H00[np.ix_(perm, perm)])
    Ap, _ = R.round_gptq(Wp, S, Z, Hp, 2, -1, False, False, HALF_UP, blocksize=5)
    np.testing.assert_array_equal(A[:, perm], Ap)


def test_round_gptq_blocksize_only_changes_rounding():
    W, H00 = problem(8, 32, 8)
    S, Z = R.minmax_params(W, 2, 8, False)
    errs = [R.round_gptq(W, S, Z, H00, 2, 8, False, True, HALF_UP, blocksize=b)[1]
            for b in (1, 7, 32, 128)]
    for e in errs[1:]:
        np.testing.assert_allclose(e, errs[0], rtol=1e-3)


def test_gptq_baseline_fed_back_weights_and_group_params():
    # Non-static groups: each group's min-max comes from the weights with the
    # feedback of every column before the group start.
    m, n, g, bits = 6, 24, 8, 2
    W, H00 = problem(m, n, 9)
    A, S, Z, err = R.gptq(W, H00, bits, g, False, False, "half_even", blocksize=5)
    U = _upper_inv_factor(H00)
    _check_fed_back_weights_round_to_codes(W, A, S, Z, U, bits)
    Q = dequant(A, S, Z)
    E = -np.linalg.solve(U.T, (Q - W).T).T
    for k in range(n // g):
        j = k * g
        cur = W[:, j:j + g] - E[:, :j] @ U[:j, j:j + g]
        lo, hi = np.minimum(cur.min(1), 0), np.maximum(cur.max(1), 0)
        np.testing.assert_allclose(S[:, k], (hi - lo) / 3, rtol=1e-4)
        zeta = np.round(-lo / S[:, k])
        np.testing.assert_allclose(Z[:, k], -S[:, k] * (-2 + zeta), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)


def test_gptq_baseline_static_groups_with_act_order():
    m, n, g = 5, 24, 6
    W, H00 = problem(m, n, 10)
    A, S, Z, _ = R.gptq(W, H00, 3, g, False, True, "half_even", blocksize=4)
    grp = W.reshape(m, n // g, g)
    lo, hi = np.minimum(grp.min(2), 0), np.maximum(grp.max(2), 0)
    np.testing.assert_allclose(S, (hi - lo) / 7, rtol=1e-6)
    assert A.min() >= -4 and A.max() <= 3


def test_gptq_baseline_symmetric_has_zero_zero():
    W, H00 = problem(5, 16, 11)
    A, S, Z, err = R.gptq(W, H00, 4, 8, True, False, "half_even", blocksize=16)
    assert not Z.any() and A.min() >= -8 and A.max() <= 7
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)


def test_gptq_baseline_ladder_on_a_barely_indefinite_hessian():
    # Smallest eigenvalue -1e-7 max(diag): inside the PSD check's tolerance
    # (1e-5), yet t = 0 fails; t = 0.01 factors H00 + 0.01 mean(diag) I,
    # exactly what a caller passing that matrix gets at t = 0.
    W, H00 = problem(4, 12, 12)
    lam_min = np.linalg.eigvalsh(H00)[0]
    bad = H00 - (lam_min + 1e-7 * np.max(np.diag(H00))) * np.eye(12)
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(bad)
    good = bad + 0.01 * np.mean(np.diag(bad)) * np.eye(12)
    a = R.gptq(W, bad, 2, -1, False, False, "half_even", 4)
    b = R.gptq(W, good, 2, -1, False, False, "half_even", 4)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ 3.3 shrink


def test_shrink_search_picks_the_best_candidate_per_row():
    W, H00 = problem(6, 16, 13)
    # Row 5 lies exactly on its min-max grid (error 0): no candidate is strictly better.
    W[5] = np.tile(np.float32([-2, -1, 0, 1]) * np.float32(2**-6), 4)
    S, Z, p, err = R.shrink_search(W, H00, 2, 8, False, HALF_UP)
    _, _, _, e_rtn = R.rtn(W, H00, 2, 8, False, HALF_UP)
    cands = [np.float32(1 - i / 200) for i in range(160)]
    errs = []
    for c in cands:
        Sc, Zc = R.minmax_params(W, 2, 8, False, p_row=np.full(6, c, np.float32))
        errs.append(R.row_errors(W, R.rtn_codes(W, Sc, Zc, 2, False, HALF_UP), Sc, Zc, H00))
    errs = np.array(errs)
    np.testing.assert_array_equal(err, np.minimum(errs.min(0), e_rtn))
    for r in range(6):
        first_best = cands[int(np.argmin(errs[:, r]))]  # strict <: the earliest (largest) p wins ties
        assert p[r] == (first_best if errs[:, r].min() < e_rtn[r] else 1.0)
    # 2-bit min-max is far from optimal on Gaussian-like rows: every such row shrinks.
    assert np.all(p[:5] < 1) and np.all(err[:5] < e_rtn[:5])
    assert p[5] == 1 and err[5] == e_rtn[5] == 0
    assert set(p.tolist()) <= set(float(c) for c in cands)
    Sx, Zx = R.minmax_params(W, 2, 8, False, p_row=p)
    np.testing.assert_array_equal(S, Sx)
    np.testing.assert_array_equal(Z, Zx)


# ------------------------------------------------------------------ 3.6 float step


def _design(a, G):
    """B (n x 2G): per group j, the column a ⊙ 1[group j] and the column 1[group j]."""
    n = a.size
    g = n // G
    ind = np.kron(np.eye(G), np.ones((g, 1)))
    return np.hstack([a[:, None] * ind, ind])


@pytest.mark.parametrize("n,group_size,symmetric", [(33, -1, False), (33, -1, True),
                                                    (32, 8, False), (32, 8, True), (30, 10, False)])
def test_float_step_is_the_least_squares_optimum(n, group_size, symmetric):
    m = 5
    W, H00 = problem(m, n, 14)
    G = 1 if group_size == -1 else n // group_size
    A, _, _, _ = R.rtn(W, H00, 2, group_size, symmetric, HALF_UP)
    S, Z, err = R.float_step(W, A, H00, group_size, symmetric)
    L = np.linalg.cholesky(H00)  # e(θ) = ‖Lᵀ(Bθ - w)‖²
    for r in range(m):
        B = _design(A[r].astype(np.float64), G)
        if symmetric:
            B = B[:, :G]
        theta, *_ = np.linalg.lstsq(L.T @ B, L.T @ W[r].astype(np.float64), rcond=None)
        np.testing.assert_allclose(S[r], theta[:G], rtol=2e-5, atol=1e-7)
        if symmetric:
            assert not Z[r].any()
        else:
            np.testing.assert_allclose(Z[r], theta[G:], rtol=2e-5, atol=1e-7)
        # e* = c - θᵀy with c = wHwᵀ, y = Bᵀ H wᵀ.
        w = W[r].astype(np.float64)
        c = w @ H00 @ w
        e_star = c - theta @ (B.T @ H00 @ w)
        assert abs(err[r] - e_star) <= 1e-4 * e_star + 1e-7 * c


def test_float_step_2x2_det_guard_on_constant_codes():
    # Codes all equal make det = 0 exactly; sign(0) = +1, so det -> +1e-5 and
    # both numerators vanish: s = z = 0.
    W, H00 = problem(3, 8, 15)
    A = np.ones((3, 8), np.int8)
    S, Z, err = R.float_step(W, A, H00, -1, False)
    assert np.all(np.abs(S) < 1e-6) and np.all(np.abs(Z) < 1e-6) and np.all(np.isfinite(err))


def test_float_step_2x2_det_guard_is_absolute():
    # On a Hessian scaled down to 1e-4 every |det| < 1e-5, so det is replaced by
    # +1e-5 (all dets here are positive): s and z are no longer the optimum.
    W, H = problem(4, 12, 31)
    H00 = H * 1e-4 / np.mean(np.diag(H))
    A, _, _, _ = R.rtn(W, H00, 2, -1, False, HALF_UP)
    a, w = A.astype(np.float64), W.astype(np.float64)
    one = np.ones(12)
    p1, p2, p5 = np.einsum("ri,ij,rj->r", a, H00, a), a @ H00 @ one, one @ H00 @ one
    p3, p6 = np.einsum("ri,ij,rj->r", w, H00, a), w @ H00 @ one
    det = p1 * p5 - p2 ** 2
    assert np.all((det > 0) & (det < 1e-5))
    S, Z, _ = R.float_step(W, A, H00, -1, False)
    np.testing.assert_allclose(S[:, 0], (p3 * p5 - p2 * p6) / 1e-5, rtol=1e-4)
    np.testing.assert_allclose(Z[:, 0], (p1 * p6 - p2 * p3) / 1e-5, rtol=1e-4)


def test_float_step_zero_group_retries_with_damping():
    # A group of zero codes makes P singular (a zero row); the retry's damping
    # leaves that group's scale at 0 and still fits the other groups.
    W, H00 = problem(2, 16, 16)
    A, _, _, _ = R.rtn(W, H00, 2, 4, False, HALF_UP)
    A[:, 4:8] = 0
    S, Z, err = R.float_step(W, A, H00, 4, False)
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(Z))
    assert np.all(S[:, 1] == 0)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)


# ------------------------------------------------------------------ 3.5 PGD


def test_pgd_without_steps_is_rtn():
    W, H00 = problem(6, 20, 17)
    S, Z = R.minmax_params(W, 2, 4, False)
    for act_order in (False, True):
        A, _ = R.round_pgd(W, S, Z, H00, 2, 4, False, act_order, HALF_UP, 0, 0, 1e-3)
        np.testing.assert_array_equal(A, R.rtn_codes(W, S, Z, 2, False, HALF_UP))


def test_adam_first_step_is_bias_corrected():
    # With bias correction the first Adam step is lr * g / (|g| + eps): about lr * sign(g).
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 6)).astype(np.float32)
    V = W + np.float32(0.3)
    H = np.eye(6, dtype=np.float32) * np.float32(2.0)
    lo, hi = np.full_like(W, -10), np.full_like(W, 10)
    adam = _ProjectedAdam(V, W, H, lo, hi)
    adam.step(0, 1e-2, 1e-5)
    np.testing.assert_allclose(V - (W + np.float32(0.3)), -1e-2 * 0.6 / (0.6 + 1e-5), rtol=1e-5)
    assert adam.t == 1


def test_pgd_improves_on_rtn():
    W, H00 = problem(8, 16, 18)
    S, Z = R.minmax_params(W, 2, -1, False)
    A, err = R.round_pgd(W, S, Z, H00, 2, -1, False, False, HALF_UP, 20, 5, 1e-3)
    _, _, _, e_rtn = R.rtn(W, H00, 2, -1, False, HALF_UP)
    assert err.mean() < 0.8 * e_rtn.mean()
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)


# ------------------------------------------------------------------ 3.2-3.4 loop


@pytest.mark.parametrize("group_size,symmetric,act_order,rounding", [
    (-1, False, False, "gptq"), (8, False, True, "gptq"), (8, True, False, "gptq"),
    (-1, True, True, "gptq"), (8, False, False, "pgd")])
def test_loss_never_rises_along_the_trace(group_size, symmetric, act_order, rounding):
    W, H00 = problem(10, 32, 19)
    A, S, Z, err, trace = solve_dq(W, H00, 2, group_size, symmetric, act_order, 3, rounding)
    assert trace.dtype == np.float64 and trace.shape[1] == 10 and 2 <= trace.shape[0] <= 6
    assert np.all(np.diff(trace, axis=0) <= 0)
    np.testing.assert_array_equal(trace[0], R.rtn(W, H00, 2, group_size, symmetric, HALF_UP)[3])
    np.testing.assert_array_equal(trace[-1], err)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)
    if symmetric:
        assert not Z.any()


@pytest.mark.parametrize("bits,group_size", [(2, -1), (2, 16), (3, 16)])
def test_decoupleq_beats_gptq_beats_rtn(bits, group_size):
    W, H00 = problem(16, 64, 20)
    e_rtn = R.rtn(W, H00, bits, group_size, False, HALF_UP)[3].mean()
    e_gptq = R.gptq(W, H00, bits, group_size, False, True, "half_even", 16)[3].mean()
    e_dq = solve_dq(W, H00, bits, group_size, False, True, 3)[3].mean()
    assert e_dq <= e_gptq <= e_rtn
    assert e_gptq < 0.7 * e_rtn


def test_one_iteration_is_gptq_with_a_float_zero():
    W, H00 = problem(6, 16, 21)
    A, S, Z, err, trace = solve_dq(W, H00, 2, 4, False, True, iterations=1)
    S0, Z0 = R.minmax_params(W, 2, 4, False)
    np.testing.assert_array_equal(S, S0)
    np.testing.assert_array_equal(Z, Z0)
    Ag, eg = R.round_gptq(W, S0, Z0, H00, 2, 4, False, True, HALF_UP, 8)
    A0 = R.rtn_codes(W, S0, Z0, 2, False, HALF_UP)
    e0 = trace[0]
    np.testing.assert_array_equal(A, np.where((eg < e0)[:, None], Ag, A0))
    assert trace.shape == (2, 6)


# ------------------------------------------------------------------ edge cases


def test_all_zero_and_constant_rows():
    W, H00 = problem(6, 16, 22)
    W[1] = 0
    W[2] = 0.03
    W[3] = -0.2
    A, S, Z, err, _ = solve_dq(W, H00, 2, -1, False, True, 3)
    Wq = dequant(A, S, Z)
    assert err[1] == 0 and np.all(Wq[1] == 0)
    np.testing.assert_allclose(Wq[2:4], W[2:4], rtol=1e-5)
    Ag, Sg, Zg, eg = R.gptq(W, H00, 2, -1, False, True, "half_even", 8)
    assert eg[1] == 0
    np.testing.assert_allclose(dequant(Ag, Sg, Zg)[2:4], W[2:4], rtol=1e-5)


def test_single_huge_outlier():
    W, H00 = problem(6, 32, 23)
    W[2, 5] = 1000.0
    e_rtn = R.rtn(W, H00, 2, 8, False, HALF_UP)[3]
    A, S, Z, err, trace = solve_dq(W, H00, 2, 8, False, True, 3)
    assert np.all(np.isfinite(err)) and np.all(err <= e_rtn)
    assert np.all(np.diff(trace, axis=0) <= 0)
    # The outlier's group keeps the outlier representable.
    assert abs(dequant(A, S, Z)[2, 5] - 1000.0) < 1.0


def test_dead_input_columns():
    W, H = R.synthetic_problem(6, 24, 24)
    dead = [0, 7, 23]
    H[dead, :] = 0
    H[:, dead] = 0
    H00 = damp(H)
    A, S, Z, err, trace = solve_dq(W, H00, 2, 8, False, True, 3)
    assert np.all(np.isfinite(err)) and np.all(np.diff(trace, axis=0) <= 0)
    # The baseline's dead-input rule (diag 0 -> 1, W column -> 0) on an undamped H.
    Ag, Sg, Zg, eg = R.gptq(W, H, 2, 8, False, False, "half_even", 8)
    np.testing.assert_allclose(eg, exact_errors(W, Ag, Sg, Zg, H), rtol=1e-3, atol=1e-9)
    # No error flows into or out of a dead column and 0 is on GPTQ's integer-zero grid.
    np.testing.assert_allclose(dequant(Ag, Sg, Zg)[:, dead], 0, atol=1e-6 * Sg.max())


def test_fewer_tokens_than_features_and_singular_hessian():
    W, H = R.synthetic_problem(8, 32, 25, n_tokens=8)
    assert np.linalg.matrix_rank(H) <= 8
    H00 = damp(H)
    e_rtn = R.rtn(W, H00, 2, -1, False, HALF_UP)[3]
    A, S, Z, err, trace = solve_dq(W, H00, 2, -1, False, True, 3)
    assert np.all(err <= e_rtn) and np.all(np.diff(trace, axis=0) <= 0)
    # Singular H00 handed in undamped: the ladders must still factor it.
    A2, e2 = R.round_gptq(W, *R.minmax_params(W, 2, -1, False), H, 2, -1, False, False, HALF_UP)
    Ag, Sg, Zg, eg = R.gptq(W, H, 2, -1, False, False, "half_even")
    assert np.all(np.isfinite(e2)) and np.all(np.isfinite(eg))


def test_all_zero_hessian():
    W, _ = problem(4, 8, 26)
    H00 = damp(np.zeros((8, 8)))
    A, S, Z, err, trace = solve_dq(W, H00, 2, -1, False, False, 2)
    # With H00 = 0.01 I the objective is plain MSE: decoupleQ still never worsens RTN.
    np.testing.assert_allclose(err, 0.01 * np.sum((dequant(A, S, Z) - W) ** 2, 1), rtol=1e-4)
    assert np.all(np.diff(trace, axis=0) <= 0)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n,group_size", [(33, -1), (32, 8), (7, 7), (1, -1)])
def test_bits_and_shapes(bits, n, group_size):
    W, H00 = problem(3, n, 27)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    A, S, Z, err, trace = solve_dq(W, H00, bits, group_size, False, True, 2, blocksize=5)
    G = 1 if group_size == -1 else n // group_size
    assert A.dtype == np.int8 and A.shape == (3, n) and S.shape == Z.shape == (3, G)
    assert A.min() >= qmin and A.max() <= qmax
    assert np.all(np.diff(trace, axis=0) <= 0)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-3, atol=1e-12)


def test_rtn_error_falls_with_bits():
    # One more bit about halves the step, so the error falls about 4x (0.6: sampling noise).
    W, H00 = problem(32, 64, 28)
    errs = [R.rtn(W, H00, b, 16, False, HALF_UP)[3].mean() for b in range(2, 9)]
    assert all(b < 0.6 * a for a, b in zip(errs, errs[1:]))


# ------------------------------------------------------------------ arguments


def test_bad_arguments_name_the_argument():
    W, H00 = problem(4, 16, 29)
    with pytest.raises(TypeError, match="W must have dtype float32"):
        R.rtn(W.astype(np.float64), H00, 2, -1, False, HALF_UP)
    with pytest.raises(ValueError, match="W must be C-contiguous"):
        R.rtn(np.asfortranarray(W), H00, 2, -1, False, HALF_UP)
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or a positive integer, got -3"):
        R.rtn(W, H00, 2, -3, False, HALF_UP)
    with pytest.raises(ValueError, match="H00 must have shape"):
        R.rtn(W, H00[:8, :8].copy(), 2, -1, False, HALF_UP)
    with pytest.raises(ValueError, match="bits must be <= 8"):
        R.rtn(W, H00, 9, -1, False, HALF_UP)
    with pytest.raises(ValueError, match="rule must be one of"):
        R.rtn(W, H00, 2, -1, False, "nearest")
    bad = W.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="W contains NaN"):
        R.rtn(bad, H00, 2, -1, False, HALF_UP)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        R.rtn(W, H00, 2, -1, 1, HALF_UP)
    S, Z = R.minmax_params(W, 2, 4, False)
    with pytest.raises(ValueError, match="S must have shape"):
        R.round_gptq(W, S[:, :2].copy(), Z, H00, 2, 4, False, False, HALF_UP)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        solve_dq(W, H00, iterations=0)
    with pytest.raises(ValueError, match="rounding must be one of"):
        solve_dq(W, H00, rounding="adam")
    with pytest.raises(ValueError, match="p_row must lie in"):
        R.minmax_params(W, 2, 4, False, p_row=np.zeros(4, np.float32))


def test_inputs_are_not_modified():
    W, H00 = problem(4, 16, 30)
    W0, H0 = W.copy(), H00.copy()
    S, Z = R.minmax_params(W, 2, 4, False)
    S0, Z0 = S.copy(), Z.copy()
    solve_dq(W, H00, 2, 4, False, True, 2)
    R.gptq(W, H00, 2, 4, False, True, HALF_UP)
    R.round_pgd(W, S, Z, H00, 2, 4, False, True, HALF_UP, 1, 1, 1e-3)
    R.round_gptq(W, S, Z, H00, 2, 4, False, True, HALF_UP)
    for x, y in ((W, W0), (H00, H0), (S, S0), (Z, Z0)):
        np.testing.assert_array_equal(x, y)


def test_synthetic_problem_is_deterministic_and_realistic():
    W, H = R.synthetic_problem(16, 64, 3)
    W2, H2 = R.synthetic_problem(16, 64, 3)
    assert W.dtype == np.float32 and H.dtype == np.float64
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(H, H2)
    np.testing.assert_array_equal(H, H.T)
    ev = np.linalg.eigvalsh(H)
    assert ev.min() > -1e-10 and ev[-1] > 30 * np.median(ev)  # decaying spectrum
    d = np.diag(H)
    assert d.max() > 50 * np.median(d)                         # outlier channels
