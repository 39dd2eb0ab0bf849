"""A model quantized streamed from disk against loaded in RAM: peak RSS, time, identical bytes.

    python benchmarks/bench_stream.py                                   # SmolLM2-135M, gptq, 8 x 256
    python benchmarks/bench_stream.py --model DIR --method rtn --json stream.json

Each side runs in its own fresh process (so ``ru_maxrss`` is that side's peak alone),
one after the other, with the same calibration windows (WikiText-2 valid text, the
model's tokenizer) and settings:

- ``ram``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=float32)``,
  ``decoupleq.quantize``, ``decoupleq.save`` (what ``decoupleq quantize MODEL`` does);
- ``stream``: ``decoupleq.quantize_from_disk(folder, ..., out=...)``.

MODEL is a Hugging Face folder of float safetensors; the default, the packaged
SmolLM2-135M, is its converted cache folder (``decoupleq.zoo.model_folder``).
Reported per side: wall time of the whole quantize + save, peak RSS, and the
SHA-256 of the output folder (the two must be equal). Timings on a shared machine
are noisy: the record says so (``--note``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def worker(args) -> None:
    import torch

    import decoupleq
    from decoupleq import BlockTuneConfig, ModelQuantConfig, QuantConfig

    torch.set_num_threads(args.threads)
    calib = torch.load(args.calib_file)
    mcfg = ModelQuantConfig(quant=QuantConfig(method=args.method, bits=2, group_size=64),
                            blockwise=BlockTuneConfig(enabled=args.blockwise), verbose=False)
    t0 = time.perf_counter()
    if args.side == "ram":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
        decoupleq.quantize(model, calib, mcfg)
        decoupleq.save(model, args.out)
    else:
        decoupleq.quantize_from_disk(args.model, calib, mcfg, out=args.out)
    seconds = time.perf_counter() - t0
    from decoupleq.stream import folder_digest

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"side": args.side, "seconds": seconds, "peak_rss_mb": rss / 2**20,
                      "sha256": folder_digest(args.out)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="Hugging Face folder or packaged model name")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--blockwise", action="store_true", help="block tuning on (default off)")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(DATA / "valid.txt"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--note", default="timings taken on a shared, loaded machine")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calib-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side is not None:
        return worker(args)

    import torch
    from transformers import AutoTokenizer

    from decoupleq.data import calibration_data
    from decoupleq.zoo import model_folder

    folder = model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    calib = calibration_data(args.text, tokenizer=tok, num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = os.path.join(tmp, "calib.pt")
        torch.save(calib, calib_file)
        for side in ("ram", "stream"):
            cmd = [sys.executable, __file__, "--side", side, "--model", str(folder), "--method", args.method,
                   "--threads", str(args.threads), "--calib-file", calib_file, "--out", os.path.join(tmp, side)]
            if args.blockwise:
                cmd.append("--blockwise")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            rows[side] = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    ram, st = rows["ram"], rows["stream"]
    record = {
        "model": str(folder), "method": args.method, "blockwise": args.blockwise,
        "calibration": f"{args.num_samples} x {args.seq_len} tokens of {args.text}", "threads": args.threads,
        "ram": ram, "stream": st, "rss_ratio": st["peak_rss_mb"] / ram["peak_rss_mb"],
        "identical_bytes": ram["sha256"] == st["sha256"], "note": args.note,
    }
    print(f"{'':8} {'in RAM':>10} {'streamed':>10}")
    print(f"{'time s':8} {ram['seconds']:10.1f} {st['seconds']:10.1f}")
    print(f"{'peak MB':8} {ram['peak_rss_mb']:10.0f} {st['peak_rss_mb']:10.0f}   "
          f"(streamed / in RAM = {record['rss_ratio']:.2f})")
    print(f"identical output bytes: {record['identical_bytes']}   ({args.note})")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from provenance import dump_json

        dump_json(args.json, record, args)


if __name__ == "__main__":
    main()
