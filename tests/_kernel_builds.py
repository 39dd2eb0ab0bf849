"""Run a script once per kernel build (portable and SIMD), for the bit-identity tests."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def outputs_per_build(script: str, tmp_path, **arrays) -> dict:
    """``{"reference": npz, "auto": npz}``: ``script`` run in a fresh process under
    ``DECOUPLEQ_KERNEL=reference`` (the portable C) and ``auto`` (the SIMD build where the
    CPU has it). The script reads ``arrays`` from the .npz named by ``sys.argv[1]`` and
    writes its results to the .npz named by ``sys.argv[2]``. A fresh process each, because
    the build is chosen once per process."""
    np.savez(tmp_path / "in.npz", **arrays)
    out = {}
    for kernel in ("reference", "auto"):
        env = dict(os.environ, DECOUPLEQ_KERNEL=kernel)
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npz"), str(tmp_path / f"{kernel}.npz")],
                       check=True, env=env)
        out[kernel] = np.load(tmp_path / f"{kernel}.npz")
    return out
