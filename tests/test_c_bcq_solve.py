"""C core of decoupleQ over BCQ levels (_C.bcq_solve) against its NumPy twin, and its invariants.

The C core runs the twin's arithmetic in the same float64 order except for the
sweep's factor U (LAPACK's potrf/potri against NumPy's cholesky/solve), so an
index whose two nearest levels tie to U's last bits may differ: indices must
agree on at least 99.9% of the entries and the mean loss to 1e-6 relative.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from decoupleq import _C as C
from decoupleq.reference import bcq_solve as R
from decoupleq.reference.synthetic import synthetic_problem
from decoupleq.uniquanf_init import unified_init
from test_c_interrupt import sigint_child

F32 = np.float32
AGREE = 0.999


def damped(H, percdamp=0.01):
    return H + percdamp * float(np.mean(np.diag(H))) * np.eye(H.shape[0])


def problem(m, n, bits, gs, seed=0):
    W, H = synthetic_problem(m, n, seed)
    H = damped(H)
    start = unified_init(W, bits, gs, hdiag=np.diag(H).astype(F32)).to_bcq()
    return W, H, start


def exact_loss(W, H, idx, alpha, offset):
    """Per-row (w_hat - w) H (w_hat - w)^T of the BCQ weight, evaluated independently of the core."""
    from decoupleq.bcq import BCQWeight

    What = BCQWeight(idx, alpha, offset, alpha.shape[2], W.shape[1] // alpha.shape[1]).dequantize()
    D = What.astype(np.float64) - W.astype(np.float64)
    return np.einsum("rc,cd,rd->r", D, H, D)


CASES = [
    # m, n, group_size, bits
    (16, 64, 16, 2),
    (9, 48, -1, 3),
    (20, 96, 32, 4),
    (33, 128, 64, 2),
    (5, 30, 10, 3),
]


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("m,n,gs,bits", CASES)
def test_c_matches_reference(m, n, gs, bits, act_order):
    W, H, s = problem(m, n, bits, gs)
    out = C.bcq_solve(W, H, s.indices, s.alpha, s.offset, bits, gs, iters=3, act_order=act_order)
    ref = R.bcq_solve(W, H, s.indices, s.alpha, s.offset, bits, gs, iters=3, act_order=act_order)
    mismatches = int(np.sum(out[0] != ref[0]))
    assert mismatches <= max(1, int((1 - AGREE) * out[0].size)), f"{mismatches} of {out[0].size} indices differ"
    assert abs(out[3].mean() / ref[3].mean() - 1) <= 1e-6
    np.testing.assert_allclose(out[4], ref[4], rtol=1e-6)
    if mismatches == 0:
        np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out[2], ref[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("m,n,gs,bits", CASES)
def test_loss_is_exact_and_never_increases(m, n, gs, bits):
    W, H, s = problem(m, n, bits, gs, seed=1)
    idx, alpha, offset, err, hist = C.bcq_solve(W, H, s.indices, s.alpha, s.offset, bits, gs, iters=4)
    start = exact_loss(W, H, s.indices, s.alpha, s.offset)
    np.testing.assert_allclose(err, exact_loss(W, H, idx, alpha, offset), rtol=1e-9, atol=1e-15)
    assert np.all(err <= start), "a row ended above its start"
    assert hist.shape == (6,)
    np.testing.assert_allclose(hist[0], start.sum(), rtol=1e-9)
    assert np.all(np.diff(hist) <= 0), hist
    assert hist[-1] == pytest.approx(err.sum(), rel=1e-12)
    # The refinement is worth something on these layers: well below the start.
    assert hist[-1] < 0.8 * hist[0], hist


@pytest.mark.parametrize("gs", [16, -1])
def test_float_step_is_the_least_squares_optimum(gs):
    """iters=0 is one float step: per row, the H-weighted least-squares fit of alpha and offset
    for the start's indices, checked against numpy's lstsq on the whitened problem."""
    m, n, bits = 12, 64, 2
    W, H, s = problem(m, n, bits, gs, seed=2)
    idx, alpha, offset, err, hist = C.bcq_solve(W, H, s.indices, s.alpha, s.offset, bits, gs, iters=0)
    np.testing.assert_array_equal(idx, s.indices)
    Lc = np.linalg.cholesky(H)  # H = Lc Lc^T: e = |Lc^T (B theta - w)|^2
    G = alpha.shape[1]
    for r in range(m):
        B = R.design_matrix(s.indices[r].astype(np.intp), bits, G)
        theta, *_ = np.linalg.lstsq(Lc.T @ B, Lc.T @ W[r].astype(np.float64), rcond=None)
        d = B @ theta - W[r]
        best = d @ H @ d
        # Within float32 rounding of the float64 optimum: the levels are rounded sums of float32
        # parameters, which moves w_hat off B's span by ~1e-7 relative (either way).
        assert abs(err[r] / best - 1) <= 1e-5, (r, err[r], best)


def test_undetermined_parameters_keep_their_values():
    """A group whose weights all take one level fixes only its offset: its alphas stay as they were."""
    m, n, bits, gs = 4, 32, 2, 8
    W, H, s = problem(m, n, bits, gs, seed=3)
    idx0 = s.indices.copy()
    idx0[:, :8] = 2  # group 0 of every row: a single sign pattern
    idx, alpha, offset, err, _ = C.bcq_solve(W, H, idx0, s.alpha, s.offset, bits, gs, iters=0)
    np.testing.assert_array_equal(alpha[:, 0, :], s.alpha[:, 0, :])
    assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(offset))
    assert np.all(err <= exact_loss(W, H, idx0, s.alpha, s.offset))
    ref = R.bcq_solve(W, H, idx0, s.alpha, s.offset, bits, gs, iters=0)
    np.testing.assert_allclose(err, ref[3], rtol=1e-9)


def test_nasty_rows_stay_finite():
    """An all-zero row, a constant row and a huge outlier: finite parameters, no row above its start."""
    m, n, bits, gs = 6, 64, 3, 16
    W, H, _ = problem(m, n, bits, gs, seed=4)
    W = W.copy()
    W[0] = 0
    W[1] = F32(-0.21)
    W[2, 5] = F32(-50) * np.abs(W[2]).max()
    s = unified_init(W, bits, gs).to_bcq()
    idx, alpha, offset, err, hist = C.bcq_solve(W, H, s.indices, s.alpha, s.offset, bits, gs, iters=3)
    assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(offset)) and np.all(np.isfinite(err))
    assert np.all(err <= exact_loss(W, H, s.indices, s.alpha, s.offset))
    assert err[0] <= 1e-12 and err[1] <= 1e-12


def test_bad_arguments_are_named_and_inputs_untouched():
    W, H, s = problem(8, 32, 2, 16)
    keep = [a.copy() for a in (W, H, s.indices, s.alpha, s.offset)]
    cases = [
        (dict(bits=5), "bits"),
        (dict(bits=2, iters=-1), "iters"),
        (dict(bits=2, group_size=5), "group_size"),
        (dict(bits=2, indices=np.full((8, 32), 4, np.uint8)), "indices"),
        (dict(bits=2, indices=s.indices[:, :16].copy()), "indices"),
        (dict(bits=2, alpha=s.alpha[:, :, :1].copy()), "alpha"),
        (dict(bits=2, alpha=np.full_like(s.alpha, np.nan)), "alpha"),
        (dict(bits=2, offset=np.full_like(s.offset, np.inf)), "offset"),
        (dict(bits=2, H=H[:16, :16].copy()), "H00"),
        (dict(bits=2, W=np.full_like(W, np.nan)), "W"),
        (dict(bits=2, alpha=s.alpha.astype(np.float64)), "alpha"),
    ]
    for change, name in cases:
        a = dict(W=W, H=H, indices=s.indices, alpha=s.alpha, offset=s.offset, bits=2, group_size=16)
        a.update(change)
        with pytest.raises((TypeError, ValueError), match=name):
            C.bcq_solve(a["W"], a["H"], a["indices"], a["alpha"], a["offset"], a["bits"], a["group_size"],
                        iters=a.get("iters", 1))
    C.bcq_solve(W, H, s.indices, s.alpha, s.offset, 2, 16, iters=2)
    for a, b in zip(keep, (W, H, s.indices, s.alpha, s.offset)):
        np.testing.assert_array_equal(a, b)


def test_deterministic_across_thread_counts():
    code = (
        "import numpy as np, sys; from decoupleq import _C as C;"
        "from decoupleq.reference.synthetic import synthetic_problem;"
        "from decoupleq.uniquanf_init import unified_init;"
        "W, H = synthetic_problem(70, 96, 5); H = H + 0.01 * np.mean(np.diag(H)) * np.eye(96);"
        "s = unified_init(W, 3, 32).to_bcq();"
        "r = C.bcq_solve(W, H, s.indices, s.alpha, s.offset, 3, 32, iters=2);"
        "sys.stdout.buffer.write(b''.join(a.tobytes() for a in r))"
    )
    outs = []
    for t in ("1", "3"):
        env = dict(os.environ, DECOUPLEQ_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout)
    assert outs[0] == outs[1] and len(outs[0]) > 0


INTERRUPT_CHILD = """
import sys
import numpy as np
from decoupleq import _C as C

m, n = 8192, 512
rng = np.random.default_rng(0)
W = rng.standard_normal((m, n)).astype(np.float32)
H = 0.5 * np.eye(n) + 0.5 / n * np.ones((n, n)) + 0.01 * np.diag(rng.random(n))
idx = rng.integers(0, 4, (m, n)).astype(np.uint8)
alpha = np.ones((m, n // 64, 2), np.float32)
offset = np.zeros((m, n // 64), np.float32)
keep = [a.copy() for a in (W, H, idx, alpha, offset)]
print("ready", flush=True)
try:
    C.bcq_solve(W, H, idx, alpha, offset, 2, 64, iters=50)
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    assert all(np.array_equal(a, b) for a, b in zip(keep, (W, H, idx, alpha, offset)))
    r = C.bcq_solve(W[:4].copy(), H, idx[:4].copy(), alpha[:4].copy(), offset[:4].copy(), 2, 64, iters=1)
    print("recovered", r[0].shape, flush=True)
    raise
"""


def test_sigint_stops_a_large_solve_within_a_second():
    out, _ = sigint_child(INTERRUPT_CHILD)
    assert "recovered (4, 512)" in out
