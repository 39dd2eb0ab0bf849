"""HessianAccumulator throughput against a bare OpenBLAS ssyrk on the same data.

Both sides run on the vendored OpenBLAS in this process: the baseline is
``_C.bare_ssyrk`` (one ``ssyrk`` per batch into a float32 matrix, nothing
else), ours is ``HessianAccumulator.add`` per batch (input checks, non-finite
scan, float32 partial sums flushed into float64) followed by ``hessian()``
(final flush and the full symmetric float64 result). Runs alternate between
the two and the best of ``--repeats`` is kept, which suits a busy machine.

    nice python3 benchmarks/bench_hessian.py [--quick] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import decoupleq
from decoupleq import _C
from decoupleq.hessian import HessianAccumulator
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script


def _bare(batches, n):
    C = np.zeros((n, n), dtype=np.float32)
    t0 = time.perf_counter()
    for b in batches:
        _C.bare_ssyrk(b, C)
    return time.perf_counter() - t0


def _ours(batches, n):
    acc = HessianAccumulator(n)
    t0 = time.perf_counter()
    for b in batches:
        acc.add(b)
    t_add = time.perf_counter() - t0
    acc.hessian()
    return t_add, time.perf_counter() - t0


def run_case(n, tokens, batch, repeats, rng):
    X = rng.standard_normal((tokens, n), dtype=np.float32)
    batches = [X[i:i + batch] for i in range(0, tokens, batch)]
    bare, add, total = [], [], []
    for _ in range(repeats):
        bare.append(_bare(batches, n))
        a, t = _ours(batches, n)
        add.append(a)
        total.append(t)
    b, a, t = min(bare), min(add), min(total)
    return dict(n=n, tokens=tokens, batch=batch, bare_ssyrk_s=b, add_s=a, add_plus_hessian_s=t,
                ratio_add=a / b, ratio_total=t / b)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="OpenBLAS threads (default: its own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        _C.set_blas_threads(args.threads)

    rng = np.random.default_rng(0)
    if args.quick:
        cases = [(576, 2048, 512), (128, 1024, 1)]
    else:
        cases = [(n, 8192, 512) for n in (576, 1536, 2048, 4096)] + [(128, 4096, 1), (576, 2048, 1)]
    info = decoupleq.backend_info()
    print(f"BLAS: {info['blas_core']}, {info['blas_threads']} threads; best of {args.repeats}")
    print(f"{'n':>6} {'tokens':>7} {'batch':>6} {'bare ssyrk':>11} {'ours add':>10} "
          f"{'ours+H':>10} {'add/bare':>9} {'all/bare':>9}")
    results = []
    for n, tokens, batch in cases:
        r = run_case(n, tokens, batch, args.repeats, rng)
        results.append(r)
        print(f"{n:>6} {tokens:>7} {batch:>6} {r['bare_ssyrk_s'] * 1e3:>9.2f}ms "
              f"{r['add_s'] * 1e3:>8.2f}ms {r['add_plus_hessian_s'] * 1e3:>8.2f}ms "
              f"{r['ratio_add']:>9.3f} {r['ratio_total']:>9.3f}", flush=True)
    if args.json:
        dump_json(args.json, dict(backend=info, repeats=args.repeats, results=results), args)


if __name__ == "__main__":
    main()
