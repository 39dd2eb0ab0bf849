"""NeUQI's initialisation: its zero against an exhaustive search, its objective against
min-max, and its cost against one GPTQ pass, side by side in one run.

    python benchmarks/bench_neuqi.py                  # 1000 random groups, 4096 x 4096 g128 timing
    python benchmarks/bench_neuqi.py --groups 200 --shape 2048x2048 --json out.json

Groups: sizes 32-256, bits 2-4, skewed (shifted gamma), outlier (two entries x25) and
heavy-tailed (Student t, 3 degrees of freedom) weights, Hessian-diagonal weights |N(0,1)| + 0.05.
For each group, NeUQI's returned objective is compared with the exhaustive optimum over the zero
(``decoupleq.reference.neuqi.exhaustive_zero``, every breakpoint on the real line) at the scale it
chose, and with the min-max RTN objective of the same group. Timing: ``_C.neuqi_params`` with the
damped Hessian's diagonal against one min-max GPTQ pass (``quantize_weight``, method "gptq",
init "minmax") on a synthetic layer, one run each (the figures are noisy on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import decoupleq
from decoupleq import QuantConfig, quantize_weight
from decoupleq import _C
from decoupleq.reference import neuqi as RN
from decoupleq.reference.synthetic import synthetic_problem


def random_group(rng):
    g = int(rng.integers(32, 257))
    kind = int(rng.integers(3))
    if kind == 0:
        w = rng.gamma(1.5, 1.0, g) - 0.4
    elif kind == 1:
        w = rng.standard_normal(g)
        w[rng.integers(g, size=2)] *= 25
    else:
        w = rng.standard_t(3, g)
    return w.astype(np.float32), np.abs(rng.standard_normal(g)) + 0.05, ("skewed", "outliers", "heavy")[kind]


def optimality(n_groups, seed):
    rng = np.random.default_rng(seed)
    worst_gap, worst_vs_mm, rows = 0.0, -np.inf, []
    for _ in range(n_groups):
        w, hd, kind = random_group(rng)
        bits = int(rng.integers(2, 5))
        n = 2**bits
        h = hd / hd.sum()
        S, Z, obj = _C.neuqi_params(w[None, :], bits, -1, False, hd, False)
        s = float(S[0, 0])
        # obj is at the float64 scale; the exhaustive search at the stored float32 one.
        best = RN.exhaustive_zero(w.astype(np.float64) / s, h, n) * s * s
        gap = (obj[0, 0] - best) / best if best > 0 else 0.0
        Smm, Zmm = _C.minmax_params(w[None, :], bits, -1, False)
        A = _C.rtn_codes(w[None, :], Smm, Zmm, bits, False, "half_up")
        mm = float(np.sum(h * ((A[0] * Smm[0, 0] + Zmm[0, 0]).astype(np.float64) - w) ** 2))
        worst_gap = max(worst_gap, gap)
        worst_vs_mm = max(worst_vs_mm, obj[0, 0] / mm)
        rows.append(dict(g=int(w.size), bits=bits, kind=kind, neuqi=float(obj[0, 0]), exhaustive=best, minmax=mm))
    return worst_gap, worst_vs_mm, rows


def timing(m, n, group, bits):
    W, H = synthetic_problem(m, n, seed=0)
    H00 = decoupleq.damp(H, 0.01)
    hd = np.ascontiguousarray(np.diag(H00))
    t0 = time.perf_counter()
    _C.neuqi_params(W, bits, group, False, hd, False)
    t_neuqi = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize_weight(W, H, QuantConfig(method="gptq", bits=bits, group_size=group, init="minmax"))
    t_gptq = time.perf_counter() - t0
    return t_neuqi, t_gptq


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="4096x4096", help="MxN of the timed layer")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gap, vs_mm, rows = optimality(args.groups, args.seed)
    print(f"{args.groups} random groups: NeUQI objective vs exhaustive optimum at its scale: worst relative "
          f"excess {gap:.2e} (target <= 1e-6); worst NeUQI / min-max objective {vs_mm:.4f} (target <= 1)")
    m, n = (int(v) for v in args.shape.lower().split("x"))
    t_neuqi, t_gptq = timing(m, n, args.group_size, args.bits)
    print(f"{m}x{n} W{args.bits} g{args.group_size}: NeUQI init {t_neuqi:.2f} s, one min-max GPTQ pass "
          f"{t_gptq:.2f} s: ratio {t_neuqi / t_gptq:.2f} (target <= 1)")
    if args.json:
        info = decoupleq.backend_info()
        with open(args.json, "w") as f:
            json.dump(dict(groups=rows, worst_excess=gap, worst_vs_minmax=vs_mm,
                           timing=dict(shape=[m, n], bits=args.bits, group_size=args.group_size,
                                       neuqi_seconds=t_neuqi, gptq_seconds=t_gptq),
                           threads=info.get("blas_threads")), f, indent=1)


if __name__ == "__main__":
    main()
