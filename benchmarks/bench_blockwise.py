"""Block-wise tuning settings side by side: tuned MSE and time per block for several (lr, epochs).

The default of ``BlockTuneConfig`` (one epoch at lr 2e-4) rests on this
comparison. For each setting, a fresh SmolLM2-135M has its first ``--blocks``
decoder blocks quantized (decoupleQ, W2 g64 by default) on the same WikiText-2
calibration windows, with block tuning at that setting; the script prints,
per block, the MSE to the full-precision block output before and after tuning
and the tuning wall time, all from ``model.decoupleq_report``. The layer
solves are identical in every run (same weights, same inputs into block 0),
so block 0's "before" MSE is the same for all settings; later blocks see the
outputs of an earlier block tuned differently.

    python benchmarks/bench_blockwise.py                    # 4 settings x 2 blocks, a few minutes
    python benchmarks/bench_blockwise.py --settings 1e-4:2,2e-4:1 --blocks 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(1e-4, 1), (1e-4, 2), (2e-4, 1), (4e-4, 1)]


def parse_settings(text: str) -> list:
    out = []
    for item in text.split(","):
        try:
            lr, epochs = item.split(":")
            out.append((float(lr), int(epochs)))
        except ValueError:
            raise SystemExit(f"--settings: {item!r} is not LR:EPOCHS, e.g. 2e-4:1") from None
    return out


def run(lr: float, epochs: int, args, data: Path) -> dict:
    import torch  # noqa: F401  (loaded by the model anyway; imported here to keep --help fast)

    import decoupleq
    from decoupleq.data import calibration_data
    from decoupleq.zoo import load_model

    lm = load_model("smollm2-135m")
    calib = calibration_data(data / "wikitext-2" / "valid.txt", tokenizer=lm.tokenizer,
                             num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
    blocks = list(lm.model.model.layers[: args.blocks])
    config = decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size),
        blockwise=decoupleq.BlockTuneConfig(lr=lr, epochs=epochs), verbose=False)
    t0 = time.perf_counter()
    decoupleq.quantize(lm.model, calib, config, blocks=blocks)
    seconds = time.perf_counter() - t0
    report = lm.model.decoupleq_report
    rows = []
    for b in report.blocks:
        t = b.tune
        rows.append(dict(block=b.index, mse_before=t.loss_before, mse_after=t.loss_after, restored=t.restored,
                         tune_seconds=t.seconds, block_seconds=b.seconds))
    return dict(lr=lr, epochs=epochs, blocks=rows, seconds=seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=None, help="comma list of LR:EPOCHS (default 1e-4:1,1e-4:2,2e-4:1,4e-4:1)")
    ap.add_argument("--blocks", type=int, default=2, help="leading decoder blocks to quantize (default 2)")
    ap.add_argument("--method", default="decoupleq", choices=("rtn", "gptq", "decoupleq"))
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length (default 256)")
    ap.add_argument("--data", type=Path, default=None, help="folder holding wikitext-2/ (default ../shared/data)")
    ap.add_argument("--json", type=Path, default=None, help="write the records to this file")
    args = ap.parse_args(argv)
    settings = SETTINGS if args.settings is None else parse_settings(args.settings)
    if args.blocks < 1:
        ap.error("--blocks must be >= 1")

    if args.data is not None:
        os.environ["DECOUPLEQ_DATA"] = str(args.data)
    from decoupleq.data import find_data_dir

    data = find_data_dir(REPO)
    if data is None or not (data / "wikitext-2" / "valid.txt").is_file():
        sys.exit("WikiText-2 not found: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA")

    records = []
    for lr, epochs in settings:
        print(f"tuning at lr {lr:g} x {epochs} epoch(s) ...", file=sys.stderr, flush=True)
        records.append(run(lr, epochs, args, data))
        if args.json is not None:  # after every setting, so a long run leaves partial results
            dump_json(args.json, records, args)

    print(f"\nSmolLM2-135M, first {args.blocks} blocks, {args.method} W{args.bits} "
          f"{'per-channel' if args.group_size == -1 else f'g{args.group_size}'}, "
          f"{args.num_samples} x {args.seq_len} WikiText-2 valid tokens; load average {os.getloadavg()[0]:.2f}\n")
    print("| lr | epochs | block | MSE before | MSE after | restored | tuning (s) | block (s) |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in records:
        for b in r["blocks"]:
            print(f"| {r['lr']:g} | {r['epochs']} | {b['block']} | {b['mse_before']:.4f} | {b['mse_after']:.4f} | "
                  f"{'yes' if b['restored'] else 'no'} | {b['tune_seconds']:.1f} | {b['block_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
