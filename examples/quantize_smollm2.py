"""Quantize SmolLM2-135M to 2 bits (groups of 64) with decoupleQ and block tuning, on a CPU.

    python examples/quantize_smollm2.py                 # W2 g64 decoupleQ + block tuning
    python examples/quantize_smollm2.py --method gptq --no-blockwise --bits 3 --group-size 128
    python examples/quantize_smollm2.py --out smollm2-w2g64   # also save the quantized model

Prints WikiText-2 test perplexity before and after (calibrated on the validation split), the
model size before and after, the quantization time and the peak memory. The text is read
from ``../shared/data/wikitext-2/`` next to the repository, or from ``--data`` /
``$DECOUPLEQ_DATA``. Without it, ``--calib self`` still quantizes (with text the model samples
itself) but no perplexity can be printed.

Every perplexity is measured on a fixed budget, printed next to it (``--eval-windows`` windows
of ``--eval-seq-len`` tokens from the start of the test split; ``--full-eval`` for all of it).

Caveat: SmolLM2 ships as a GGUF file whose weights were already stored 4-bit (Q4_1, blocks of
32), so W4 g32 results flatter any method; W2 is a real test.
"""
import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

import decoupleq
from decoupleq.cli import packed_mb, save_folder, state_dict_mb
from decoupleq.data import calibration_data, find_data_dir, read_text
from decoupleq.evaluate import perplexity
from decoupleq.zoo import load_model

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder or GGUF file")
    p.add_argument("--method", choices=decoupleq.config.METHODS, default="decoupleq")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64, help="-1 for per-channel")
    p.add_argument("--no-blockwise", dest="blockwise", action="store_false", help="skip block-wise tuning")
    p.add_argument("--calib", choices=("valid", "self"), default="valid",
                   help="WikiText-2 validation windows (default) or text sampled from the model itself")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16,
                   help="perplexity budget: the first N windows of the test split (default 16)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--full-eval", action="store_true", help="score the whole test split (slow on a CPU)")
    p.add_argument("--data", type=Path, default=None, help="folder holding wikitext-2/ (default: ../shared/data)")
    p.add_argument("--out", type=Path, default=None, help="save the quantized model to this folder")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data is not None:
        os.environ["DECOUPLEQ_DATA"] = str(args.data)
    data = find_data_dir(REPO)
    wiki = data / "wikitext-2" if data is not None else None
    if wiki is None or not (wiki / "test.txt").is_file():
        if args.calib == "valid":
            sys.exit("WikiText-2 not found: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA, "
                     "or use --calib self to quantize without it")
        wiki = None
    config = decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size),
        blockwise=args.blockwise,
    )

    t_load = time.perf_counter()
    lm = load_model(args.model)
    print(f"model: {lm.name} ({lm.source}), loaded in {time.perf_counter() - t_load:.1f} s")
    if lm.note:
        print(f"note: {lm.note}")
    fp_mb = state_dict_mb(lm.model)
    budget = dict(seq_len=args.eval_seq_len, max_windows=args.eval_windows, full=args.full_eval)
    test_ids = None
    if wiki is not None:
        from decoupleq.evaluate import token_stream

        test_ids = token_stream(read_text(wiki / "test.txt"), lm.tokenizer)
        t = time.perf_counter()
        before = perplexity(lm.model, test_ids, **budget)
        print(f"WikiText-2 test, full precision: {before}  ({time.perf_counter() - t:.0f} s)")

    t0, c0 = time.perf_counter(), time.process_time()
    source = wiki / "valid.txt" if args.calib == "valid" else "self"
    calib = calibration_data(source, model=lm.model, tokenizer=lm.tokenizer, num_samples=args.num_samples,
                             seq_len=args.seq_len, seed=args.seed)
    t_calib = time.perf_counter() - t0
    decoupleq.quantize(lm.model, calib, config)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    label = (f"{args.method} W{args.bits} " + ("per-channel" if args.group_size == -1 else f"g{args.group_size}")
             + (" + block tuning" if args.blockwise else ""))
    if test_ids is not None:
        t = time.perf_counter()
        after = perplexity(lm.model, test_ids, **budget)
        print(f"WikiText-2 test, {label}: {after}  ({time.perf_counter() - t:.0f} s)")
    print(f"calibration: {args.calib} ({args.num_samples} x {args.seq_len} tokens, {t_calib:.0f} s)")
    # CPU time (all threads) next to wall time: on a shared machine the wall clock says more
    # about the neighbours than about the method.
    print(f"quantization time: {seconds:.0f} s wall ({seconds / 60:.1f} min, calibration data included), "
          f"{cpu:.0f} s CPU over {torch.get_num_threads()} threads")
    packed = packed_mb(lm.model)
    print(f"size: {fp_mb:.0f} MB float32 before; {packed:.0f} MB after with codes packed at {args.bits} bits "
          f"({fp_mb / packed:.1f}x smaller)")
    if args.out is not None:
        summary = save_folder(args.out, lm.model, lm.tokenizer, {
            "model": args.model, "source": lm.source, "name": lm.name, "kind": lm.kind, "note": lm.note,
            "calibration": {"source": str(source), "num_samples": args.num_samples, "seq_len": args.seq_len,
                            "seed": args.seed, "seconds": t_calib},
            "config": lm.model.decoupleq_config, "seconds": seconds, "fp_mb": fp_mb, "packed_mb": packed,
            "layers": len(lm.model.decoupleq_report.layers),
        })
        stored = f"codes packed at {args.bits} bits" if args.bits <= 4 else "codes stored as int8"
        print(f"saved to {args.out} ({summary['file_mb']:.0f} MB on disk: {stored}, scales and zeros float32); "
              f"try: decoupleq info {args.out}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB; threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
