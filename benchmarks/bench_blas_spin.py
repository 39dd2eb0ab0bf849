"""Layer solves with OpenBLAS's idle workers spinning (its default) against sleeping (decoupleq's).

``import decoupleq`` loads its OpenBLAS with ``OPENBLAS_THREAD_TIMEOUT=4``
unless the variable is already set: idle workers sleep as soon as a call
ends instead of spinning for about 2^28 cycles on the cores the solver's own
threads need next. This runs the same GPTQ and decoupleQ solves in two fresh
processes, one with the variable at 28 (OpenBLAS's default spin) and one
with decoupleq's choice, alternating, and prints the best time of each side
by side.

    python benchmarks/bench_blas_spin.py                     # 2048x2048 W2 g64, 3 rounds
    python benchmarks/bench_blas_spin.py --shape 4096x4096 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import decoupleq
from decoupleq.reference.synthetic import synthetic_problem
m, n, bits, group = (int(v) for v in sys.argv[1:5])
W, H = synthetic_problem(m, n, seed=0)
out = {}
for method in ("gptq", "decoupleq"):
    config = decoupleq.QuantConfig(method=method, bits=bits, group_size=group)
    t0 = time.perf_counter()
    decoupleq.quantize_weight(W, H, config)
    out[method] = time.perf_counter() - t0
print(json.dumps(out))
"""

SETTINGS = [("spinning (OpenBLAS default, timeout 28)", "28"), ("sleeping (decoupleq, timeout 4)", None)]


def run(shape, bits, group, timeout):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout
    args = [sys.executable, "-c", CHILD, str(shape[0]), str(shape[1]), str(bits), str(group)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2048x2048", help="OUTxIN (default 2048x2048)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each setting (best kept)")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        if len(shape) != 2:
            raise ValueError
    except ValueError:
        ap.error(f"--shape takes OUTxIN, e.g. 2048x2048, got {args.shape!r}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    best = {label: {} for label, _ in SETTINGS}
    for _ in range(args.rounds):
        for label, timeout in SETTINGS:
            for method, seconds in run(shape, args.bits, args.group_size, timeout).items():
                best[label][method] = min(seconds, best[label].get(method, float("inf")))

    print(f"{shape[0]}x{shape[1]} W{args.bits} g{args.group_size}, best of {args.rounds}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'OpenBLAS workers':<42}{'GPTQ s':>10}{'decoupleQ s':>14}")
    for label, _ in SETTINGS:
        print(f"{label:<42}{best[label]['gptq']:>10.3f}{best[label]['decoupleq']:>14.3f}")
    spin, sleep = (best[label] for label, _ in SETTINGS)
    print(f"{'sleeping / spinning':<42}{sleep['gptq'] / spin['gptq']:>10.2f}"
          f"{sleep['decoupleq'] / spin['decoupleq']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
