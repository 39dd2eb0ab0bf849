"""Quantize SmolLM2-135M to 2 bits (groups of 64), then fine-tune only its float parts.

The integer codes stay frozen; the per-group scales and zeros of every
quantized layer and the RMSNorm weights are trained with the ordinary
language-modelling loss on WikiText-2 *validation* text (the calibration
split), and perplexity is measured on WikiText-2 *test* before and after,
on the same token budget as the model benchmark (``benchmarks/bench_models.py``:
the first 16 windows of 512 tokens).

    python examples/sft_float_parts.py                       # quantize (decoupleQ), fine-tune, report
    python examples/sft_float_parts.py --save-quantized q.safetensors    # keep the quantized model
    python examples/sft_float_parts.py --load q.safetensors  # skip quantization next time

Reported: perplexity before and after, trainable values against the model's
size, mean step time, and the peak resident memory of the fine-tuning loop
(the process's peak is reset just before it, so quantization does not count).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path


def _reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged model name, HF folder or .gguf")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2/ (default: ../shared/data)")
    p.add_argument("--method", default="decoupleq", choices=("rtn", "gptq", "decoupleq"))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--no-blockwise", action="store_true", help="skip block-wise tuning during quantization")
    p.add_argument("--load", default=None, help="a decoupleq.save file: skip quantization")
    p.add_argument("--save-quantized", default=None, help="write the quantized model (before SFT) here")
    p.add_argument("--save", default=None, help="write the fine-tuned model here")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-norms", action="store_true", help="train scales and zeros only")
    p.add_argument("--bf16", action="store_true", help="train under torch.autocast('cpu', dtype=torch.bfloat16)")
    # The budget of benchmarks/bench_models.py, so the numbers sit beside its table.
    p.add_argument("--eval-windows", type=int, default=16, help="test windows scored (default 16)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per test window (default 512)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    import decoupleq
    from decoupleq import data, evaluate
    from decoupleq.sft import sft_parameter_count
    from decoupleq.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else data.find_data_dir(Path(__file__).resolve().parents[1])
    if data_dir is None or not (data_dir / "wikitext-2" / "valid.txt").is_file():
        sys.exit("WikiText-2 not found: pass --data-dir (the folder holding wikitext-2/) or set DECOUPLEQ_DATA")
    valid_path = data_dir / "wikitext-2" / "valid.txt"
    test_path = data_dir / "wikitext-2" / "test.txt"
    eval_kw = dict(max_windows=args.eval_windows, seq_len=args.eval_seq_len)

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    valid_text = data.read_text(valid_path)
    if args.load:
        model = decoupleq.load(args.load, model=model)
        print(f"loaded the quantized model from {args.load}")
    else:
        calib = data.from_text(valid_text, tokenizer, num_samples=args.calib_samples,
                               seq_len=args.calib_seq_len, seed=args.seed)
        qcfg = decoupleq.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size)
        t = time.perf_counter()
        decoupleq.quantize(model, calib, qcfg, blockwise=False if args.no_blockwise else None)
        print(f"quantized ({args.method}, W{args.bits} g{args.group_size}) in {time.perf_counter() - t:.0f}s")
        if args.save_quantized:
            decoupleq.save(model, args.save_quantized)
    model.eval()

    t = time.perf_counter()
    before = evaluate.perplexity(model, test_path, tokenizer, **eval_kw)
    eval_s = time.perf_counter() - t
    print(f"test perplexity before SFT: {before}  ({eval_s:.0f}s)")

    params = decoupleq.prepare_for_sft(model, norms=not args.no_norms)
    counts = sft_parameter_count(model)
    print(f"trainable: {counts['trainable']:,} values in {len(params)} tensors, "
          f"{100 * counts['trainable'] / counts['model']:.3f}% of the model's {counts['model']:,} "
          f"({counts['codes']:,} of them frozen integer codes)")

    train_ids = data.tokenize(tokenizer, valid_text)
    windows = data.random_windows(train_ids, num_samples=args.steps * args.batch_size, seq_len=args.seq_len,
                                  seed=args.seed + 1)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # Linear decay to zero: late steps only polish what the early ones found.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    peak_reset = _reset_peak_rss()
    rss_start = _peak_rss_mib()
    model.train()
    step_times, losses = [], []
    for step in range(args.steps):
        batch = windows[step * args.batch_size:(step + 1) * args.batch_size]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {step_times[-1]:.2f}s", flush=True)
    model.eval()
    peak = _peak_rss_mib()
    for p in params:
        p.requires_grad_(False)

    after = evaluate.perplexity(model, test_path, tokenizer, **eval_kw)
    timed = step_times[1:] or step_times  # the first step pays one-time allocations
    step_s = sum(timed) / len(timed)
    print()
    print(f"model                 {loaded.name}, W{args.bits} g{args.group_size} ({'loaded' if args.load else args.method})")
    print(f"SFT                   {args.steps} steps x {args.batch_size} x {args.seq_len} tokens of {valid_path.name}, "
          f"AdamW lr {args.lr:g}, {'bf16 autocast' if args.bf16 else 'float32'}")
    print(f"test perplexity       {before.ppl:.3f} -> {after.ppl:.3f}  [{after.budget}]")
    print(f"trainable values      {counts['trainable']:,} of {counts['model']:,} "
          f"({100 * counts['trainable'] / counts['model']:.3f}%)")
    print(f"step time             {step_s:.3f}s mean (forward + backward + AdamW)")
    print(f"peak RSS during SFT   {peak:.0f} MiB{'' if peak_reset else ' (process peak: could not reset)'}, "
          f"{rss_start:.0f} MiB when it started")
    print(f"total wall time       {time.perf_counter() - t0:.0f}s")
    if args.save:
        decoupleq.save(model, args.save)
        print(f"saved the fine-tuned model to {args.save}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": loaded.name, "bits": args.bits, "group_size": args.group_size,
            "method": "loaded" if args.load else args.method, "steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lr": args.lr, "bf16": args.bf16,
            "ppl_before": before.to_dict(), "ppl_after": after.to_dict(),
            "trainable": counts["trainable"], "model_values": counts["model"], "step_s": step_s,
            "peak_rss_mib": peak, "peak_rss_reset": peak_reset, "losses": losses,
        }, indent=2))
    return 0 if math.isfinite(after.ppl) else 1


if __name__ == "__main__":
    sys.exit(main())
