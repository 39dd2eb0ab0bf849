"""Step time and peak memory: float-part SFT of a W2 g64 model against full fine-tuning of the FP model.

Both runs use the same model (SmolLM2-135M by default), batch, sequence
length, optimizer (AdamW) and tokens, each in its own subprocess so that its
peak resident memory is its own:

- ``fp-full``: the float32 model, every parameter trained.
- ``quant-sft``: the model quantized to 2 bits in groups of 64, only the
  scales, zeros and norm weights trained (``decoupleq.prepare_for_sft``).

The quantized model is read from ``--quantized FILE`` (a ``decoupleq.save``
file, e.g. from ``examples/sft_float_parts.py --save-quantized``) or made on
the spot with RTN, min-max init (step time and memory do not depend on how good the codes
are, only on their shapes). Peak RSS is measured from the first training step
on (the process's peak is reset after the model is built, Linux >= 4.0), and
the whole-process peak is reported beside it. The tokens are seeded random
ids, the same for both runs.

    python benchmarks/bench_sft.py                  # 2 warm-up + 8 timed steps of 4 x 256 tokens each
    python benchmarks/bench_sft.py --json out.json --batch-size 8 --seq-len 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

MODES = ("fp-full", "quant-sft")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _windows(args, vocab_size):
    """Training windows: seeded random token ids, the same in every run.

    Step time and memory of a dense model do not depend on which tokens are
    fed, and random ids need neither the tokenizer nor the text.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, ((args.warmup + args.steps) * args.batch_size, args.seq_len), generator=g)


def worker(args) -> dict:
    import torch

    import decoupleq
    from decoupleq.sft import prepare_for_sft, sft_parameter_count
    from decoupleq.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.mode == "quant-sft" and args.quantized:
        # Rebuilt from the config stored in the file: the FP weights are never loaded.
        model = decoupleq.load(args.quantized)
        how = f"loaded {os.path.basename(args.quantized)}"
    else:
        model = load_model(args.model).model
        how = "float32"
    windows = _windows(args, model.config.vocab_size)
    if args.mode == "quant-sft" and not args.quantized:
        calib = windows[: args.calib_samples, : args.calib_seq_len]
        # min-max init: data-free and seconds to make (RTN's default, NeUQI, searches each group's grid).
        cfg = decoupleq.QuantConfig(method="rtn", bits=args.bits, group_size=args.group_size, init="minmax")
        decoupleq.quantize(model, calib, cfg, blockwise=False)
        how = f"RTN min-max W{args.bits} g{args.group_size}"
    if args.mode == "fp-full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        params = prepare_for_sft(model)
    counts = sft_parameter_count(model)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    build_s = time.perf_counter() - t0

    import gc

    gc.collect()
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    model.train()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = windows[step * args.batch_size:(step + 1) * args.batch_size]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(dt)
    peak_steps = _status_mib("VmHWM") if reset else None
    return {
        "mode": args.mode,
        "model": args.model,
        "weights": how,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "trainable": counts["trainable"],
        "model_values": counts["model"],
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_all": times,
        "rss_before_steps_mib": rss_before,
        "peak_rss_steps_mib": peak_steps,
        "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build_s": build_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def _worker_argv(args, mode):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", args.model,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--bits", str(args.bits), "--group-size", str(args.group_size),
            "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quantized:
        argv += ["--quantized", args.quantized]
    if args.bf16:
        argv.append("--bf16")
    return argv


def _fmt_mib(v):
    return "n/a" if v is None else f"{v:,.0f} MiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--quantized", default=None, help="a decoupleq.save file of the quantized model")
    p.add_argument("--calib-samples", type=int, default=4, help="RTN calibration windows (no --quantized)")
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="both runs under CPU bf16 autocast")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    results = {}
    for mode in args.modes.split(","):
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}")
        t = time.perf_counter()
        proc = subprocess.run(_worker_argv(args, mode), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"{mode}: worker failed (exit {proc.returncode})")
            return 1
        results[mode] = json.loads(lines[-1][len("RESULT "):])
        print(f"{mode}: done in {time.perf_counter() - t:.0f}s", flush=True)

    print()
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'run':<11} {'weights':<22} {'trainable':>22} {'step (median)':>14} {'peak RSS (steps)':>17} "
          f"{'peak RSS (process)':>19}")
    for mode, r in results.items():
        share = 100 * r["trainable"] / r["model_values"]
        print(f"{mode:<11} {r['weights'][:22]:<22} {r['trainable']:>12,} ({share:6.2f}%) {r['step_s_median']:>13.3f}s "
              f"{_fmt_mib(r['peak_rss_steps_mib']):>17} {_fmt_mib(r['peak_rss_process_mib']):>19}")
    if len(results) == 2:
        fp, q = results["fp-full"], results["quant-sft"]
        print(f"quant-sft / fp-full: step time x{q['step_s_median'] / fp['step_s_median']:.2f}, "
              f"peak RSS during steps x{(q['peak_rss_steps_mib'] or 0) / (fp['peak_rss_steps_mib'] or 1):.2f}, "
              f"trainable values x{q['trainable'] / fp['trainable']:.4f}")
    if args.json:
        dump_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "worker"},
                              "results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
