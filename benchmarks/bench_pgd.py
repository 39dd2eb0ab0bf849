"""The PGD integer step (round_pgd): C against the NumPy reference, side by side.

Each shape is a synthetic layer (decoupleq.reference.synthetic_problem, damped
1%) with min-max (S, Z), 2 bits, per-channel, act-order, K1 = 0 and K2 = 5
unless told otherwise.  Both sides run once per shape in the same process, C
first, so a busy machine slows them alike; the report gives the ratio, the
share of codes that agree and both mean errors.  The reference is the
faithful O(K2 m n^3 / 2) loop and takes minutes at 576 x 576.  Thread counts
come from OPENBLAS_NUM_THREADS / DECOUPLEQ_NUM_THREADS (both BLAS libraries
read the first).

    nice python3 benchmarks/bench_pgd.py [--shapes 128x128,576x576] [--k1 0] [--k2 5] [--no-reference]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import decoupleq
from decoupleq import _C
from decoupleq import reference as R


def _problem(m, n, bits, seed=0):
    W, H = R.synthetic_problem(m, n, seed)
    H = H + 0.01 * float(np.mean(np.diag(H))) * np.eye(n)
    S, Z = R.minmax_params(W, bits, -1, False)
    return W, S, Z, H


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x128,576x576")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--k1", type=int, default=0)
    ap.add_argument("--k2", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    info = decoupleq.backend_info()
    print(f"blas_threads {info['blas_threads']}, core_threads {info['core_threads']}, "
          f"load {os.getloadavg()[0]:.1f}")
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        W, S, Z, H = _problem(m, n, args.bits)
        call = (W, S, Z, H, args.bits, -1, False, True, "half_up", args.k1, args.k2, 1e-3)
        t0 = time.perf_counter()
        A, err = _C.round_pgd(*call)
        t_c = time.perf_counter() - t0
        line = f"{m}x{n} K1={args.k1} K2={args.k2}: C {t_c:.2f} s, mean err {err.mean():.6e}"
        if not args.no_reference:
            t0 = time.perf_counter()
            A_ref, err_ref = R.round_pgd(*call)
            t_r = time.perf_counter() - t0
            line += (f"; reference {t_r:.2f} s, mean err {err_ref.mean():.6e}; "
                     f"C {t_r / t_c:.1f}x faster; codes equal {np.mean(A == A_ref):.5f}")
        print(line + f" (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
