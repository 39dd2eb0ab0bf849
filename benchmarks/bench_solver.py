"""Layer-solver benchmark: the C core against the NumPy reference, side by side in one run.

For each layer shape and quantization setting, RTN, GPTQ, decoupleQ (GPTQ
rounding, 4 iterations) and decoupleQ (PGD rounding) run through
``decoupleq.quantize_weight`` with ``impl="c"`` and ``impl="reference"``; the
table shows wall time (the median of up to 7 repeats for solves under 1 s)
and mean layer loss (the per-row H00 error, averaged).

Hessians come from ``decoupleq.reference.synthetic.synthetic_problem``
(activations with a decaying spectrum and a few outlier channels; see its
docstring). The reference is skipped, and the table says so, where its
predicted time (scaled from the last measured shape by m*n^2) is over 10
minutes; PGD likewise, its cost growing as m*n^3.

    python benchmarks/bench_solver.py --quick           # shapes up to 2048, a few minutes
    python benchmarks/bench_solver.py --json out.json   # every shape
    python benchmarks/bench_solver.py --no-reference --inits minmax shrink neuqi \
        --real smollm2-135m --shapes 4096x4096         # initialisations side by side

``--inits`` runs every method once per initialisation (``QuantConfig.init``; GPTQ with
"minmax" is the reference GPTQ, with any other init it holds those parameters fixed), and
prints, per init, each method's mean loss relative to min-max GPTQ on the same layer.
``--real MODEL`` adds real layers: every linear layer of blocks 0, 15 and 29 of a packaged
model (smollm2-135m), with the Hessian of the inputs the full-precision model feeds it on
16 x 256 tokens of WikiText-2 valid (``--data DIR`` holds wikitext-2/). Records carry
``init`` and ``source`` ("synthetic" or the real layer's name).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import decoupleq
from decoupleq import QuantConfig, quantize_weight
from decoupleq.config import INITS
from decoupleq.reference.synthetic import synthetic_problem
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (4096, 4096)]
SETTINGS = [(2, -1), (2, 64), (3, 128), (4, -1)]  # (bits, group_size)
METHODS = [
    ("rtn", "gptq"),
    ("gptq", "gptq"),
    ("decoupleq", "gptq"),
    ("decoupleq", "pgd"),
]
LIMIT_SECONDS = 600.0


def label(method, rounding):
    return f"decoupleq/{rounding}" if method == "decoupleq" else method


def setting_name(bits, group):
    return f"W{bits} " + ("pc" if group == -1 else f"g{group}")


def parse_setting(text):
    """'W3g128' -> (3, 128), 'W4pc' -> (4, -1): any bits and group size, not only SETTINGS."""
    import re

    m = re.fullmatch(r"W(\d+)(?:pc|g(\d+))", text.replace(" ", ""))
    if not m:
        raise SystemExit(f"--settings: {text!r} is not W<bits>pc or W<bits>g<group>, e.g. W2g64 W4pc")
    return int(m[1]), -1 if m[2] is None else int(m[2])


def predicted(history, key, m, n, power):
    """Scale the last measured time of `key` to shape (m, n) by m * n**power."""
    if key not in history:
        return 0.0
    seconds, (m0, n0) = history[key]
    return seconds * (m * n**power) / (m0 * n0**power)


# A solve shorter than this is repeated (up to MAX_REPEATS times, until the
# repeats add up to it) and its median time reported: one sub-second timing
# on a shared 2-core machine swings by 2x, and the first call on a new shape
# also pays its page faults.
MIN_TOTAL_SECONDS = 1.0
MAX_REPEATS = 7


def run_one(W, H, config, impl):
    """(median seconds, mean loss, repeats) of quantize_weight on this layer."""
    times = []
    while True:
        start = time.perf_counter()
        qw = quantize_weight(W, H, config, impl=impl)
        times.append(time.perf_counter() - start)
        if sum(times) >= MIN_TOTAL_SECONDS or len(times) >= MAX_REPEATS:
            break
    return float(np.median(times)), float(qw.loss.mean()), len(times)


def peak_memory_check(m, n):
    """Peak RSS growth of one decoupleQ W2 g64 solve, in a fresh process.

    W and H are made here and loaded by the child from .npy files: generating
    them there would set its peak RSS (the synthetic token sample is larger
    than anything the solver allocates) and hide the solve's own growth."""
    import os
    import tempfile

    W, H = synthetic_problem(m, n, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "W.npy"), W)
        np.save(os.path.join(tmp, "H.npy"), H)
        del W, H
        code = (
            "import os, numpy as np, decoupleq\n"
            f"W = np.load(os.path.join({tmp!r}, 'W.npy')); H = np.load(os.path.join({tmp!r}, 'H.npy'))\n"
            # Reset the peak (VmHWM) to the current RSS: imports leave a
            # higher peak than the solve would otherwise have to exceed.
            "def kb(key):\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith(key): return int(line.split()[1])\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "before = kb('VmRSS')\n"
            "decoupleq.quantize_weight(W, H, decoupleq.QuantConfig(bits=2, group_size=64))\n"
            "after = kb('VmHWM')\n"
            "print(before, after)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before_kb, after_kb = map(int, out.stdout.split())
    return (after_kb - before_kb) * 1024, 4 * 8 * (m * n + n * n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shapes up to 2048 only")
    parser.add_argument("--json", metavar="PATH", help="write one record per run to PATH")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--pgd-steps", type=int, default=5, help="PGD steps per column (K2)")
    parser.add_argument("--shapes", nargs="+", metavar="MxN", help="only these shapes, e.g. 2048x2048")
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="these settings instead of the default four, e.g. W2g64 W3pc")
    parser.add_argument("--methods", nargs="+", choices=[label(*mr) for mr in METHODS],
                        help="only these methods")
    parser.add_argument("--inits", nargs="+", choices=INITS, metavar="INIT",
                        help=f"run each method with each of these initialisations ({', '.join(INITS)}); "
                             "default: each method's default")
    parser.add_argument("--real", metavar="MODEL", help="also solve the real layers of this packaged model")
    parser.add_argument("--no-synthetic", action="store_true", help="real layers only")
    parser.add_argument("--data", type=Path, default=None, help="folder holding wikitext-2/")
    args = parser.parse_args(argv)

    shapes = [s for s in SHAPES if not args.quick or max(s) <= 2048]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    settings = [parse_setting(s) for s in args.settings] if args.settings else list(SETTINGS)
    methods = [mr for mr in METHODS if not args.methods or label(*mr) in args.methods]
    info = decoupleq.backend_info()
    print(f"# decoupleq {decoupleq.__version__}; BLAS {info['blas_config']}; threads {info['blas_threads']}")
    print(f"# synthetic Hessians; reference skipped where predicted > {LIMIT_SECONDS:.0f} s")
    header = f"{'shape':>11} {'setting':>9} {'method':>15} | {'C s':>8} {'C loss':>11} | {'ref s':>8} {'ref loss':>11} | {'speedup':>7} {'loss C/ref':>10}"
    print(header)
    print("-" * len(header))

    records, history = [], {}
    results = {}  # (source, shape, setting, method label, init, impl) -> (seconds, loss)
    inits = args.inits or [None]
    problems = [] if args.no_synthetic else [("synthetic", (m, n), None) for m, n in shapes]
    if args.real:
        problems += [(name, W.shape, (W, H)) for name, W, H in load_real(args.real, args.data)]
    for source, (m, n), given in problems:
        W, H = given if given is not None else synthetic_problem(m, n, seed=0)
        for bits, group in settings:
            setting = setting_name(bits, group)
            for (method, rounding), init in ((mr, i) for mr in methods for i in inits):
                config = QuantConfig(method=method, bits=bits, group_size=group, rounding=rounding,
                                     iterations=4, pgd_steps_per_column=args.pgd_steps, init=init)
                name = label(method, rounding) + ("" if args.inits is None else f"+{config.init}")
                power = 3 if rounding == "pgd" and method == "decoupleq" else 2
                row = {}
                for impl in ("c", "reference"):
                    key = (name, setting, impl, source == "synthetic")
                    if impl == "reference" and args.no_reference:
                        row[impl] = "off"
                        continue
                    guess = predicted(history, key, m, n, power)
                    if guess > LIMIT_SECONDS:
                        row[impl] = f"skip~{guess:.0f}s"
                        continue
                    seconds, loss, repeats = run_one(W, H, config, impl)
                    history[key] = (seconds, (m, n))
                    row[impl] = (seconds, loss)
                    results[(source, (m, n), setting, label(method, rounding), config.init, impl)] = (
                        seconds, loss)
                    records.append(dict(source=source, shape=[m, n], bits=bits, group_size=group,
                                        method=method, init=config.init,
                                        rounding=rounding if method == "decoupleq" else None,
                                        impl=impl, seconds=seconds, repeats=repeats, mean_loss=loss))
                print(format_row(m, n, setting, name, row) + ("" if source == "synthetic" else f"  {source}"),
                      flush=True)

    print()
    summarize(results, shapes)
    if args.inits:
        summarize_inits(results)
    if not args.no_synthetic and (4096, 4096) in shapes and (2, 64) in settings:
        grew, bound = peak_memory_check(4096, 4096)
        print(f"peak memory of decoupleQ W2 g64 on 4096x4096: +{grew / 2**20:.0f} MiB "
              f"(bound 4x float64 W+H = {bound / 2**20:.0f} MiB): {'ok' if grew <= bound else 'OVER'}")
    if args.json:
        dump_json(args.json, records, args)
        print(f"wrote {len(records)} records to {args.json}")


def load_real(model, data):
    """The real layers of a packaged model (benchmarks/real_layers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_layers import real_layers

    from decoupleq.data import find_data_dir

    data = data or (Path(os.environ["DECOUPLEQ_DATA"]) if os.environ.get("DECOUPLEQ_DATA") else find_data_dir())
    if data is None or not (Path(data) / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit("--real needs WikiText-2: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA")
    t0 = time.perf_counter()
    layers = real_layers(model, Path(data))
    print(f"# {len(layers)} real layers of {model} captured in {time.perf_counter() - t0:.0f} s")
    return layers


def summarize_inits(results):
    """Per init: each method's mean loss over min-max GPTQ's on the same layer, by layer type,
    and decoupleQ's time over GPTQ's (both with that init)."""
    print("initialisations (mean over layers of loss / min-max GPTQ loss; C only):")
    keys = [k for k in results if k[-1] == "c"]
    settings = sorted({k[2] for k in keys})
    for setting in settings:
        for method in sorted({k[3] for k in keys}):
            for init in sorted({k[4] for k in keys}):
                ratios = {}
                for source, shape, st, mth, ini, _ in keys:
                    if (st, mth, ini) != (setting, method, init):
                        continue
                    base = results.get((source, shape, setting, "gptq", "minmax", "c"))
                    if base is None or not base[1] > 0:
                        continue
                    kind = "synthetic" if source == "synthetic" else source.rsplit(".", 1)[-1]
                    ratios.setdefault(kind, []).append(results[(source, shape, st, mth, ini, "c")][1] / base[1])
                if ratios:
                    cells = " ".join(f"{k}={np.mean(v):.3f}" for k, v in sorted(ratios.items()))
                    print(f"  {setting:>7} {method:>15} {init:>9}: {cells}")


def format_row(m, n, setting, name, row):
    def cell(v):
        if isinstance(v, tuple):
            return f"{v[0]:8.3f} {v[1]:11.5g}"
        return f"{v:>8} {'':>11}"

    c, r = row.get("c"), row.get("reference")
    extra = ""
    if isinstance(c, tuple) and isinstance(r, tuple):
        extra = f"{r[0] / c[0]:7.1f}x {c[1] / r[1]:10.4f}"
    return f"{m:>5}x{n:<5} {setting:>9} {name:>15} | {cell(c)} | {cell(r)} | {extra}"


def _synthetic(results, shape, setting, method, impl):
    """The synthetic layer's result of a method with its default init (the first found)."""
    for k, v in results.items():
        if k[0] == "synthetic" and k[1] == shape and k[2] == setting and k[3] == method and k[5] == impl:
            if k[4] == QuantConfig(method=method.split("/")[0]).init:
                return v
    return None


def summarize(results, shapes):
    """The foundation issue's targets, computed from this run (each method with its default init)."""
    print("targets:")
    for m, n in shapes:
        for setting in ("W2 pc", "W2 g64", "W3 g128", "W4 pc"):
            dq = _synthetic(results, (m, n), setting, "decoupleq/gptq", "c")
            gq = _synthetic(results, (m, n), setting, "gptq", "c")
            if dq and gq:
                print(f"  {m}x{n} {setting}: decoupleQ time / GPTQ time = {dq[0] / gq[0]:.2f} (target <= 8); "
                      f"loss decoupleQ / GPTQ = {dq[1] / gq[1]:.3f}"
                      + (" (target <= 0.5)" if setting == "W2 pc" else ""))
    dq = _synthetic(results, (2048, 2048), "W2 g64", "decoupleq/gptq", "c")
    ref = _synthetic(results, (2048, 2048), "W2 g64", "decoupleq/gptq", "reference")
    if dq and ref:
        print(f"  2048x2048 W2 g64 decoupleQ: C {ref[0] / dq[0]:.1f}x faster than the reference "
              f"(target >= 20), loss C/ref = {dq[1] / ref[1]:.4f} (target <= 1.01)")
    big = _synthetic(results, (4096, 4096), "W2 g64", "decoupleq/gptq", "c")
    if big:
        print(f"  4096x4096 W2 g64 decoupleQ: {big[0]:.1f} s (target < 60)")


if __name__ == "__main__":
    main()
