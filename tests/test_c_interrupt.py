"""Ctrl-C during a long C call: the core polls for interrupts between chunks,
so KeyboardInterrupt arrives within a second, and the next call works.

The child process runs a 4096 x 4096 decoupleQ solve (or NeUQI's search) on
one thread (tens of seconds uninterrupted) and is sent SIGINT after 1 s.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from decoupleq import _C as C

    n = 4096
    rng = np.random.default_rng(0)
    W = rng.standard_normal((n, n)).astype(np.float32)
    # Equicorrelated inputs plus a random diagonal: positive definite, cheap to build.
    H = 0.5 * np.eye(n) + 0.5 / n * np.ones((n, n)) + 0.01 * np.diag(rng.random(n))
    W0, H0 = W.copy(), H.copy()
    print("ready", flush=True)
    try:
        if sys.argv[1] == "neuqi":
            C.neuqi_params(W, 2, 128, False, np.ascontiguousarray(np.diag(H)))
        else:
            C.decoupleq(W, H, 2, 64, False, True, "half_up", 20, sys.argv[1])
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        # Inputs untouched, and the core usable again at once.
        assert np.array_equal(W, W0) and np.array_equal(H, H0)
        small = C.rtn(W[:4, :64].copy(), np.eye(64), 2, 64, False, "half_up")
        print("recovered", small[0].shape, flush=True)
        raise
    """
)


def sigint_child(code: str, *argv: str) -> tuple:
    """Run ``code`` in a child Python on one thread; once it prints "ready" and has run a
    second, send it SIGINT. The child must answer "interrupted" within a second and then die of
    the uncaught KeyboardInterrupt (its handler re-raises after checking its recovery).

    Returns:
        (the child's later stdout, its stderr) for the caller's checks of the recovery.
    """
    env = dict(os.environ, DECOUPLEQ_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        assert p.poll() is None, "the solve ended before the signal"
        t0 = time.perf_counter()
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline().strip()
        latency = time.perf_counter() - t0
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert line == "interrupted", (line, err[-2000:])
    assert latency < 1.0, f"KeyboardInterrupt took {latency:.2f} s"
    # Uncaught KeyboardInterrupt: Python exits by SIGINT, with the traceback.
    assert p.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" in err
    return out, err


@pytest.mark.parametrize("rounding", ["gptq", "pgd", "neuqi"])
def test_sigint_stops_a_large_solve_within_a_second(rounding):
    out, _ = sigint_child(CHILD, rounding)
    assert "recovered (4, 64)" in out
