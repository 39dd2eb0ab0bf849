"""The solver's cheap error paths against float64 truth: half-flop row errors
(n >= 1024), the float step's quadratic error update, the GPTQ step that skips
exact errors of rejected rows, and the DECOUPLEQ_PROFILE phase timer."""
import os
import subprocess
import sys

import numpy as np
import pytest

from decoupleq import _C as C
from decoupleq import reference as R
from decoupleq.reference.synthetic import synthetic_problem


def wide_problem(m, n, seed):
    """A cheap wide layer (synthetic_problem's token sample is slow at n >= 1024):
    heavy-tailed weights and a low-rank-plus-diagonal Hessian with a few strong
    channels, float32 W and float64 H."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_t(4, size=(m, n)) * 0.02).astype(np.float32)
    B = rng.standard_normal((n, 48)) * np.linspace(1.0, 0.1, 48)
    H = B @ B.T / 48 + 0.05 * np.eye(n)
    strong = rng.choice(n, size=4, replace=False)
    H[strong, strong] += 20.0
    return W, H


def exact_errors(W, A, S, Z, H00):
    """Row errors of the dequantised weight in float64 throughout."""
    g = W.shape[1] // S.shape[1]
    What = A.astype(np.float64) * np.repeat(S.astype(np.float64), g, axis=1)
    What += np.repeat(Z.astype(np.float64), g, axis=1)
    D = What - W.astype(np.float64)
    return np.einsum("ij,jk,ik->i", D, H00, D)


@pytest.mark.parametrize("m,n,g", [(7, 1024, -1), (33, 1536, 64), (5, 1031, -1)])
def test_half_flop_row_errors_match_reference_and_float64(m, n, g):
    W, H = wide_problem(m, n, seed=11)
    W[0] = 0.0  # an all-zero row
    H00 = C.damp(H, 0.01)
    if n % (n if g == -1 else g):
        pytest.skip("group does not divide")
    S, Z = C.minmax_params(W, 2, g, False)
    A = C.rtn_codes(W, S, Z, 2, False, "half_up")
    err = C.row_errors(W, A, S, Z, H00)
    np.testing.assert_allclose(err, R.row_errors(W, A, S, Z, H00), rtol=1e-5, atol=0)
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4, atol=0)


# Every setting the benchmark targets, plus symmetric groups and 8 bits (where
# the update's noise bound sends most rows to the exact measurement).
@pytest.mark.parametrize("bits,g,sym,act_order", [
    (2, -1, False, True), (2, 16, False, True), (3, 32, False, False),
    (4, -1, False, True), (4, 16, True, True), (8, 32, False, True),
])
def test_decoupleq_errors_and_trace_are_the_float64_errors(bits, g, sym, act_order):
    W, H = synthetic_problem(96, 128, seed=bits + 3)
    H00 = C.damp(H, 0.01)
    A, S, Z, err, trace = C.decoupleq(W, H00, bits, g, sym, act_order, "half_up", 4, "gptq")
    exact = exact_errors(W, A, S, Z, H00)
    # The tolerance of the whole-solver test in test_solver.py.
    np.testing.assert_allclose(err, exact, rtol=1e-4, atol=1e-9 * exact.max())
    np.testing.assert_array_equal(trace[-1], err)
    assert np.all(np.diff(trace, axis=0) <= 0)


def test_decoupleq_on_a_1024_wide_layer_reports_float64_errors_and_beats_gptq():
    # n = 1024 takes the half-flop row errors inside the solver (the NumPy
    # reference is too slow at this width for a unit test).
    W, H = wide_problem(16, 1024, seed=5)
    H00 = C.damp(H, 0.01)
    A, S, Z, err, _ = C.decoupleq(W, H00, 2, 64, False, True, "half_up", 3, "gptq")
    np.testing.assert_allclose(err, exact_errors(W, A, S, Z, H00), rtol=1e-4)
    gptq_err = C.gptq(W, H00, 2, 64, False, True, "half_up")[3]
    assert err.mean() <= gptq_err.mean()


def test_profile_prints_every_phase_to_stderr():
    code = (
        "import numpy as np; from decoupleq import _C as C\n"
        "from decoupleq.reference.synthetic import synthetic_problem\n"
        "W, H = synthetic_problem(8, 32, seed=0)\n"
        "C.decoupleq(W, C.damp(H, 0.01), 2, 16, False, True, 'half_up', 3, 'gptq')\n"
    )
    env = dict(os.environ, DECOUPLEQ_PROFILE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    for phase in ("layer init", "minmax rtn", "factor", "initial gptq", "shrink search",
                  "start float step", "integer step", "float step", "total"):
        assert f"] {phase}" in out.stderr, phase
    quiet = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DECOUPLEQ_PROFILE="0"),
                           capture_output=True, text=True, check=True)
    assert "profile" not in quiet.stderr
