"""The core's persistent thread pool behind dq_parallel_for: results independent
of who runs a chunk, two Python threads at once, a child process after fork,
and the spawn-per-call fallback (DECOUPLEQ_THREAD_POOL=0) agreeing bit for bit."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from decoupleq.kernels import packed_linear
from decoupleq.packing import PackedWeight


def weight(seed, out=301, n=576, bits=2, gs=64):
    rng = np.random.default_rng(seed)
    qmin = -(2 ** (bits - 1))
    a = rng.integers(qmin, -qmin, size=(out, n)).astype(np.int8)
    G = n // gs
    s = (rng.random((out, G)) * 0.05 + 0.01).astype(np.float32)
    z = (rng.standard_normal((out, G)) * 0.05).astype(np.float32)
    return PackedWeight.from_codes(a, s, z, bits, gs, scale_dtype="float32")


def test_pool_results_equal_single_thread_for_every_thread_count():
    pw = weight(0, out=1025)
    x = np.random.default_rng(1).standard_normal((3, 576)).astype(np.float32)
    want = packed_linear(x, pw, threads=1)
    for t in (2, 3, 4, 7, 2, 5):  # the pool grows and shrinks its use between calls
        np.testing.assert_array_equal(packed_linear(x, pw, threads=t), want)


def test_two_python_threads_calling_at_once_get_their_own_results():
    pws = [weight(10), weight(11, out=257, bits=4, gs=32)]
    xs = [np.random.default_rng(i).standard_normal((1 + 7 * i, 576)).astype(np.float32) for i in range(2)]
    want = [packed_linear(x, pw, threads=1) for x, pw in zip(xs, pws)]
    errors, barrier = [], threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(200):
                np.testing.assert_array_equal(packed_linear(xs[i], pws[i], threads=3), want[i])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_child_after_fork_runs_parallel_work_without_deadlock():
    pw = weight(20, out=1024)
    x = np.random.default_rng(2).standard_normal((2, 576)).astype(np.float32)
    want = packed_linear(x, pw, threads=3)  # the parent's pool now has workers
    code = """
import os, sys, numpy as np
sys.path.insert(0, {root!r})
from test_threads import weight
from decoupleq.kernels import packed_linear
pw = weight(20, out=1024)
x = np.random.default_rng(2).standard_normal((2, 576)).astype(np.float32)
packed_linear(x, pw, threads=3)
pid = os.fork()
if pid == 0:
    y = packed_linear(x, pw, threads=3)
    np.save({path!r}, y)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "child.npy")
        # This file's folder, not the repository root: decoupleq must come from where the
        # tests import it (the installed package), not from the source tree.
        here = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run([sys.executable, "-c", code.format(root=here, path=path)],
                              timeout=120, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_array_equal(np.load(path), want)


def test_spawn_fallback_gives_the_same_bits():
    pw = weight(30, out=999, bits=3, gs=64)
    x = np.random.default_rng(3).standard_normal((5, 576)).astype(np.float32)
    want = packed_linear(x, pw, threads=3)
    root = os.path.dirname(os.path.abspath(__file__))  # this folder (see above)
    code = f"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from test_threads import weight
from decoupleq.kernels import packed_linear
pw = weight(30, out=999, bits=3, gs=64)
x = np.random.default_rng(3).standard_normal((5, 576)).astype(np.float32)
sys.stdout.buffer.write(packed_linear(x, pw, threads=3).tobytes())
"""
    env = dict(os.environ, DECOUPLEQ_THREAD_POOL="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    np.testing.assert_array_equal(np.frombuffer(proc.stdout, dtype=np.float32).reshape(want.shape), want)
