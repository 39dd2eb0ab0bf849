"""Packed low-bit kernels against fp32 OpenBLAS and torch, side by side.

First measures this machine's streaming read bandwidth (C, several threads)
and its fp32 multiply-add throughput (FMA chains in registers, every thread at
once), then times y = x @ W^T for each weight shape (out x in), bit width, group
size and batch: the packed kernels (decoupleq.kernels.packed_linear), fp32
OpenBLAS sgemv/sgemm on the same library decoupleq links (the dequantized
weight), and torch F.linear in fp32 and bf16. Beside every packed uniform
weight, the same codes written as BCQ (decoupleq.bcq.bcq_from_uniform: the
same levels, float32 alpha and offset) through the BCQ kernels ("bcq" rows,
decoupleq.bcq.bcq_linear), so the two formats are compared on identical
weights; the summary prints their ratio at batch 1.

Effective bandwidth = bytes of the weight as stored (packed codes + scales +
zeros; 4 or 2 bytes per weight for fp32 / bf16) divided by the time: at
batch 1 a kernel can go no faster than it can read its weights.  Nor faster
than it can compute: the packed kernels do one fp32 multiply-add per weight
(x stays fp32, so results agree with F.linear within fp32 rounding), which
caps them at (multiply-adds/s) x bits / 8 bytes of codes per second.  The
summary prints both ceilings next to each batch-1 figure.

    python benchmarks/bench_kernels.py --threads 2 --json results.json
    python benchmarks/bench_kernels.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(576, 576), (4096, 4096)]
BITS = (2, 3, 4)
GROUPS = (-1, 64, 128)
BATCHES = (1, 8, 128)


def timeit(fn, min_reps: int, budget_s: float):
    """Best wall time and best process CPU time of one call: a warm-up call,
    then at least min_reps calls (2 for calls slower than the budget) and
    more while the budget lasts.  CPU time counts every thread of the
    process, so on an otherwise busy machine cpu / threads estimates the wall
    time a quiet machine would give (it also counts BLAS threads spinning)."""
    fn()
    best, best_cpu, spent, reps = float("inf"), float("inf"), 0.0, 0
    while reps < 2 or (reps < min_reps and spent < 4 * budget_s) or (spent < budget_s and reps < 200):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        best, best_cpu = min(best, dt), min(best_cpu, dc)
        spent += dt
        reps += 1
    return best, best_cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for every implementation (default 2)")
    ap.add_argument("--json", metavar="PATH", help="write one JSON record per measurement to PATH")
    ap.add_argument("--quick", action="store_true", help="two shapes, batches 1 and 8, fewer repetitions")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    ap.add_argument("--shapes", help="comma-separated OUTxIN weight shapes (default: the five of the issue)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,8,128)")
    ap.add_argument("--no-bcq", action="store_true", help="skip the BCQ kernels")
    ap.add_argument("--bcq-kernels", default="",
                    help="comma-separated BCQ kernels to time beside the default one, e.g. avx2 "
                         "(rows 'bcq_<name>'; see _C.bcq_kernel_names())")
    ap.add_argument("--bits", help="comma-separated bit widths (default 2,3,4)")
    ap.add_argument("--groups", help="comma-separated group sizes, -1 per-channel (default -1,64,128)")
    ap.add_argument("--bandwidth-mib", type=int, default=512, help="buffer of the read-bandwidth test")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")

    os.environ["DECOUPLEQ_NUM_THREADS"] = str(args.threads)
    try:
        import decoupleq
    except ImportError:  # run from a source checkout built in place
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import decoupleq
    from decoupleq import _C
    from decoupleq.kernels import packed_linear
    from decoupleq.bcq import bcq_from_uniform, bcq_linear
    from decoupleq.packing import PackedWeight

    torch = None
    if not args.no_torch:
        try:
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None
    _C.set_blas_threads(args.threads)

    shapes = QUICK_SHAPES if args.quick else SHAPES
    batches = (1, 8) if args.quick else BATCHES
    bit_widths, groups = BITS, GROUPS
    try:
        if args.bits:
            bit_widths = tuple(int(v) for v in args.bits.split(","))
            if any(b not in BITS for b in bit_widths):
                raise ValueError
        if args.groups:
            groups = tuple(int(v) for v in args.groups.split(","))
            if any(g != -1 and g < 8 for g in groups):
                raise ValueError
        if args.shapes:
            shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
            if any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
                raise ValueError
        if args.batches:
            batches = tuple(int(v) for v in args.batches.split(","))
            if min(batches) < 1:
                raise ValueError
    except ValueError:
        ap.error("--shapes takes OUTxIN[,OUTxIN...], --batches positive ints, --bits some of 2,3,4 and "
                 "--groups -1 or sizes >= 8, e.g. 4096x4096, 1,128, 2 and -1,64")
    extra_bcq = [k for k in args.bcq_kernels.split(",") if k]
    unknown = [k for k in extra_bcq if k not in _C.bcq_kernel_names()]
    if unknown:
        ap.error(f"--bcq-kernels: {', '.join(unknown)} not runnable here; choose from "
                 f"{', '.join(_C.bcq_kernel_names())}")
    min_reps, budget = (3, 0.2) if args.quick else (5, 0.5)
    records = []

    info = decoupleq.backend_info()
    load0 = os.getloadavg()[0]
    # Timings on a shared machine mean little without the load next to them.
    print(f"load average at start: {load0:.2f} on {os.cpu_count()} CPUs")
    print(f"kernel: {info['kernel']} ({info['kernel_reason']}); BCQ kernel: {_C.bcq_default_kernel()}")
    print(f"BLAS: {info['blas_config']}; threads: {args.threads}")
    bw = _C.read_bandwidth(nbytes=args.bandwidth_mib << 20, threads=args.threads, repeats=5)
    print(f"read bandwidth ({args.threads} threads, {args.bandwidth_mib} MiB): {bw:.2f} GB/s\n")
    records.append({"impl": "read_bandwidth", "gbps": bw, "threads": args.threads,
                    "bytes": args.bandwidth_mib << 20})
    macs = _C.fma_throughput(threads=args.threads, repeats=5)
    print(f"fp32 multiply-adds ({args.threads} threads): {macs:.1f} G/s; one per weight caps batch 1 at "
          + ", ".join(f"W{b} {macs * b / 8:.1f} GB/s of codes ({100 * macs * b / 8 / bw:.0f}% of read bw)"
                      for b in BITS) + "\n")
    records.append({"impl": "fma_ceiling", "gmacs": macs, "threads": args.threads})

    rng = np.random.default_rng(0)
    for out_f, in_f in shapes:
        w32 = rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.02
        packs, bcqs = {}, {}
        for bits in bit_widths:
            codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(out_f, in_f)).astype(np.int8)
            for gs in groups:
                if gs != -1 and in_f % gs:
                    continue  # e.g. g128 on 576 columns: not a valid grouping
                G = 1 if gs == -1 else in_f // gs
                s = (rng.random((out_f, G), dtype=np.float32) * 0.01 + 0.001)
                z = rng.standard_normal((out_f, G), dtype=np.float32) * 0.01
                packs[(bits, gs)] = PackedWeight.from_codes(codes, s, z, bits, gs)
                if not args.no_bcq:
                    bw_ = bcq_from_uniform(codes, s, z, bits, gs)
                    bcqs[(bits, gs)] = (bw_.pack(), bw_.alpha, bw_.offset)
            del codes
        tw32 = tw16 = None
        if torch is not None:
            tw32 = torch.from_numpy(w32)
            tw16 = tw32.to(torch.bfloat16)
        for batch in batches:
            x = rng.standard_normal((batch, in_f), dtype=np.float32)
            rows = []

            def add(impl, bits, gs, times, nbytes):
                seconds, cpu = times
                rec = {"shape": [out_f, in_f], "bits": bits, "group_size": gs, "batch": batch,
                       "impl": impl, "seconds": seconds, "gbps": nbytes / seconds / 1e9,
                       "cpu_seconds": cpu, "threads": args.threads, "bytes": nbytes}
                records.append(rec)
                rows.append(rec)

            add("openblas_fp32", 32, -1, timeit(lambda: _C.blas_linear(x, w32), min_reps, budget),
                w32.nbytes)
            if torch is not None:
                tx = torch.from_numpy(x)
                tx16 = tx.to(torch.bfloat16)
                with torch.inference_mode():
                    add("torch_fp32", 32, -1, timeit(lambda: F.linear(tx, tw32), min_reps, budget),
                        w32.nbytes)
                    add("torch_bf16", 16, -1, timeit(lambda: F.linear(tx16, tw16), min_reps, budget),
                        w32.nbytes // 2)
            for (bits, gs), pw in packs.items():
                add("decoupleq", bits, gs,
                    timeit(lambda: packed_linear(x, pw, threads=args.threads), min_reps, budget),
                    pw.nbytes)
                if (bits, gs) in bcqs:
                    planes, alpha, offset = bcqs[(bits, gs)]
                    for name in [None] + extra_bcq:
                        add("bcq" if name is None else f"bcq_{name}", bits, gs,
                            timeit(lambda: bcq_linear(x, planes, alpha, offset, bits, gs, threads=args.threads,
                                                      kernel=name), min_reps, budget),
                            planes.nbytes + alpha.nbytes + offset.nbytes)

            base = rows[0]["seconds"]
            print(f"{out_f}x{in_f}  batch {batch}")
            print(f"  {'impl':<14}{'bits':>5}{'group':>7}{'ms':>10}{'GB/s':>8}{'% read bw':>10}"
                  f"{'vs fp32 BLAS':>13}{'cpu ms':>10}")
            for r in rows:
                g = "chan" if r["group_size"] == -1 else f"g{r['group_size']}"
                g = "-" if r["impl"] != "decoupleq" and not r["impl"].startswith("bcq") else g
                print(f"  {r['impl']:<14}{r['bits']:>5}{g:>7}{r['seconds'] * 1e3:>10.3f}{r['gbps']:>8.2f}"
                      f"{100 * r['gbps'] / bw:>9.0f}%{base / r['seconds']:>12.2f}x{r['cpu_seconds'] * 1e3:>10.3f}")
            print()
        del w32, tw32, tw16, packs, bcqs

    load1 = os.getloadavg()[0]
    print(f"load average at end: {load1:.2f}\n")
    records.append({"impl": "machine", "load_start": load0, "load_end": load1,
                    "cpus": os.cpu_count(), "kernel": info["kernel"], "threads": args.threads})
    summarize(records, bw, macs)
    if args.json:
        dump_json(args.json, records, args)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def summarize(records, bw, macs):
    """The issue's targets, from this run's own numbers, each batch-1 figure
    next to the share of this machine's multiply-add ceiling it reaches."""
    def find(shape, batch, impl, bits=None, gs=None):
        for r in records:
            if (r.get("shape") == list(shape) and r["batch"] == batch and r["impl"] == impl
                    and (bits is None or r["bits"] == bits) and (gs is None or r["group_size"] == gs)):
                return r
        return None

    print("targets")
    for shape in [(4096, 4096), (11008, 4096)]:
        for bits in (2, 4):
            for gs in GROUPS:
                r = find(shape, 1, "decoupleq", bits, gs)
                if r:
                    frac = r["gbps"] / bw
                    of_macs = shape[0] * shape[1] / r["seconds"] / 1e9 / macs
                    print(f"  W{bits} {'chan' if gs == -1 else 'g%d' % gs:>5} {shape[0]}x{shape[1]} batch 1: "
                          f"{r['gbps']:.2f} GB/s = {100 * frac:.0f}% of read bw (target >= 70%): "
                          f"{'met' if frac >= 0.7 else 'MISSED'}; {100 * of_macs:.0f}% of the multiply-add "
                          f"ceiling")
    bcq_impls = sorted({r["impl"] for r in records if r["impl"].startswith("bcq")})
    for bits in BITS:
        for gs in GROUPS:
            for impl in bcq_impls:
                u, b = find((4096, 4096), 1, "decoupleq", bits, gs), find((4096, 4096), 1, impl, bits, gs)
                if u and b:
                    ratio = b["seconds"] / u["seconds"]
                    label = "BCQ" if impl == "bcq" else f"BCQ ({impl[4:]})"
                    print(f"  {label} W{bits} {'chan' if gs == -1 else 'g%d' % gs:>5} 4096x4096 batch 1: "
                          f"{b['seconds'] * 1e3:.3f} ms vs uniform {u['seconds'] * 1e3:.3f} ms = {ratio:.2f}x its time"
                          + (f" (target <= 1.0x: {'met' if ratio <= 1.0 else 'MISSED'})" if bits == 2 else ""))
    base = find((4096, 4096), 1, "openblas_fp32")
    for bits, want in ((2, 8.0), (4, 5.0)):
        for gs in GROUPS:
            r = find((4096, 4096), 1, "decoupleq", bits, gs)
            if r and base:
                sp = base["seconds"] / r["seconds"]
                cap = macs * 1e9 * base["seconds"] / 4096**2  # the ceiling's speed-up over this sgemv
                print(f"  W{bits} {'chan' if gs == -1 else 'g%d' % gs:>5} 4096x4096 batch 1: {sp:.1f}x faster than "
                      f"fp32 sgemv (target >= {want:.0f}x): {'met' if sp >= want else 'MISSED'}; "
                      f"the multiply-add ceiling allows {cap:.1f}x")
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 576)]:
        base = find(shape, 128, "openblas_fp32")
        if not base:
            continue
        worst = None
        for r in records:
            if r.get("shape") == list(shape) and r["batch"] == 128 and r["impl"] == "decoupleq":
                ratio = r["seconds"] / base["seconds"]
                if worst is None or ratio > worst[0]:
                    worst = (ratio, r)
        if worst:
            r = worst[1]
            print(f"  {shape[0]}x{shape[1]} batch 128: worst packed config W{r['bits']} "
                  f"{'chan' if r['group_size'] == -1 else 'g%d' % r['group_size']} takes {worst[0]:.2f}x the "
                  f"fp32 sgemm time (target <= 1.5x): {'met' if worst[0] <= 1.5 else 'MISSED'}")
    print()


if __name__ == "__main__":
    sys.exit(main())
