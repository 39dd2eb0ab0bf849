"""decoupleQ over BCQ levels against min-max uniform and UniQuanF's BCQ initialisation, per real layer.

For the linear layers of a few blocks of SmolLM2-135M (Hessians of their inputs over
WikiText-2 valid windows, benchmarks/real_layers.py), the layer error
``sum_r (w_hat_r - w_r) H00 (w_hat_r - w_r)^T`` (H00 = H damped by 1%) of:

- ``minmax``: min-max uniform round-to-nearest (``QuantConfig(method="rtn", init="minmax")``);
- ``init``: UniQuanF's unified BCQ initialisation, Hessian-diagonal weighted (the
  UniQuanF default and the start of the next column);
- ``dq-bcq``: ``decoupleq.bcq_solve.decoupleq_bcq`` from that start (``--iters`` rounds);
- ``decoupleq`` (with ``--decoupleq``): the library's uniform decoupleQ (2.5 bits per
  weight with its fp16 scales and zeros), and ``dq-bcq(uq)``: decoupleq_bcq started
  from that uniform solution written as BCQ (``bcq_from_uniform``: uniform codes are BCQ
  with fixed alphas, so it can only improve on it).

Every setting is printed side by side per layer, then the mean ratio per layer type.
A group size that does not divide a layer's width falls back to per-channel for that
layer (marked), as ``bench_uniquanf_init.py`` does.

Example (a few minutes on 2 loaded cores; one block keeps it short):
    python benchmarks/bench_bcq_solve.py --blocks 0 --settings 2:64 3:128 --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import dump_json  # noqa: E402
from real_layers import real_layers  # noqa: E402

from decoupleq import QuantConfig, damp, quantize_weight  # noqa: E402
from decoupleq.bcq import bcq_from_uniform, bits_per_weight  # noqa: E402
from decoupleq.bcq_solve import decoupleq_bcq  # noqa: E402
from decoupleq.data import find_data_dir  # noqa: E402
from decoupleq.uniquanf_init import unified_init  # noqa: E402


def h_error(W, What, H00) -> float:
    D = What.astype(np.float64) - W.astype(np.float64)
    return float(np.sum((D @ H00) * D))


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def run_layer(name, W, H, bits, gs, args) -> dict:
    lg = gs if gs == -1 or W.shape[1] % gs == 0 else -1
    H00 = damp(H, 0.01)
    rec = {"layer": name, "type": layer_type(name), "shape": list(W.shape), "bits": bits,
           "group_size": gs, "layer_group_size": lg}
    q = quantize_weight(W, H, QuantConfig(method="rtn", bits=bits, group_size=lg, init="minmax"))
    rec["minmax"] = h_error(W, q.dequantize(), H00)
    t0 = time.perf_counter()
    start = unified_init(W, bits, lg, hdiag=np.diag(H00).astype(np.float32)).to_bcq()
    rec["init_s"] = time.perf_counter() - t0
    rec["init"] = h_error(W, start.dequantize(), H00)
    t0 = time.perf_counter()
    res = decoupleq_bcq(W, H, bits, lg, iters=args.iters, start=start, act_order=not args.no_act_order)
    rec["dq_bcq_s"] = time.perf_counter() - t0
    rec["dq_bcq"] = h_error(W, res.weight.dequantize(), H00)
    rec["dq_bcq_history"] = res.history.tolist()
    rec["bits_per_weight_bcq"] = res.weight.stored_bits_per_weight()
    # As saved: alphas and offsets in 16 bits (the uniform layers' scales and zeros are 16-bit too).
    rec["bits_per_weight_bcq_saved"] = bits_per_weight(bits, W.shape[1], lg, param_bits=16)
    G = 1 if lg == -1 else W.shape[1] // lg
    rec["bits_per_weight_uniform_saved"] = bits + 2 * 16 * G / W.shape[1]
    if args.decoupleq:
        t0 = time.perf_counter()
        d = quantize_weight(W, H, QuantConfig(method="decoupleq", bits=bits, group_size=lg))
        rec["decoupleq_s"] = time.perf_counter() - t0
        rec["decoupleq"] = h_error(W, d.dequantize(), H00)
        uq = bcq_from_uniform(d.codes, d.scale, d.zero, bits, lg)
        res = decoupleq_bcq(W, H, bits, lg, iters=args.iters, start=uq, act_order=not args.no_act_order)
        rec["dq_bcq_uq"] = h_error(W, res.weight.dequantize(), H00)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="folder holding wikitext-2/ (default: the shared data)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--settings", nargs="+", default=["2:64", "3:128"], help="bits:group_size")
    ap.add_argument("--iters", type=int, default=4, help="decoupleq_bcq rounds after the first float step")
    ap.add_argument("--no-act-order", action="store_true", help="decoupleq_bcq's sweep in natural column order")
    ap.add_argument("--decoupleq", action="store_true",
                    help="also the uniform decoupleQ solver, and decoupleq_bcq started from its result")
    ap.add_argument("--json", default=None, help="write the records here (with provenance)")
    args = ap.parse_args()

    data = args.data or os.environ.get("DECOUPLEQ_DATA") or find_data_dir()
    if data is None or not (Path(data) / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit("needs WikiText-2: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA")
    t0 = time.perf_counter()
    layers = real_layers(args.model, Path(data), blocks=tuple(args.blocks), num_samples=args.windows,
                         seq_len=args.seq_len)
    print(f"# {len(layers)} layers of {args.model} (blocks {args.blocks}), Hessians over "
          f"{args.windows} x {args.seq_len} tokens: {time.perf_counter() - t0:.0f} s")
    records = []
    cols = ["minmax", "init", "dq_bcq"] + (["decoupleq", "dq_bcq_uq"] if args.decoupleq else [])
    for setting in args.settings:
        bits, gs = (int(v) for v in setting.split(":"))
        print(f"\nW{bits} g{gs}: H00-weighted layer error (lower is better); ratios of dq-bcq")
        print(f"  {'layer':34s} {'shape':12s} " + " ".join(f"{c:>11s}" for c in cols)
              + "  dq/minmax  dq/init   time")
        for name, W, H in layers:
            rec = run_layer(name, W, H, bits, gs, args)
            records.append(rec)
            note = "" if rec["layer_group_size"] == gs else " (per-channel)"
            print(f"  {name:34s} {str(tuple(W.shape)):12s} " + " ".join(f"{rec[c]:11.5g}" for c in cols)
                  + f"  {rec['dq_bcq'] / rec['minmax']:9.3f} {rec['dq_bcq'] / rec['init']:8.3f} "
                  f"{rec['dq_bcq_s']:5.1f}s{note}", flush=True)
        print("  mean ratio by layer type (dq-bcq / minmax, dq-bcq / init, init / minmax"
              + (", dq-bcq / decoupleq, dq-bcq(uq) / decoupleq" if args.decoupleq else "") + "):")
        mine = [r for r in records if (r["bits"], r["group_size"]) == (bits, gs)]
        for t in sorted({r["type"] for r in mine}):
            rs = [r for r in mine if r["type"] == t]
            ratios = [np.mean([r["dq_bcq"] / r["minmax"] for r in rs]), np.mean([r["dq_bcq"] / r["init"] for r in rs]),
                      np.mean([r["init"] / r["minmax"] for r in rs])]
            if args.decoupleq:
                ratios.append(np.mean([r["dq_bcq"] / r["decoupleq"] for r in rs]))
                ratios.append(np.mean([r["dq_bcq_uq"] / r["decoupleq"] for r in rs]))
            print(f"    {t:10s} " + " ".join(f"{v:7.3f}" for v in ratios) + f"   ({len(rs)} layers)")
    if args.json:
        dump_json(args.json, records, args)
        print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
