"""Seconds per distillation step (teacher forward + student forward and backward + AdamW), side by side.

One step of ``decoupleq.distill`` on one window, against the same step done
other ways, each mode in its own subprocess (so its peak memory is its own):

- ``fp``: the lower bound. The student is a float32 copy of the teacher;
  the same loss (MSE of the final hidden states), and AdamW on the weights of
  every linear layer the quantized model quantizes. Per layer that is the
  same matrix products as a quantized layer (forward, grad_x, grad_W).
- ``quant-int8``: ``decoupleq.distill`` with every ``QuantLinear`` run
  through the int8-codes path of ``decoupleq.sft`` (codes unpacked at every
  call, W made by torch ops in forward and again in backward): how every
  quantized layer trained before the packed path. Selected here only, by
  swapping ``decoupleq.sft.quant_linear_forward``.
- ``quant``: ``decoupleq.distill`` as it runs (W made from the packed codes
  by the C core).

The quantized model is RTN with min-max init (data-free, seconds to make; a
step costs the same whatever the codes are). Windows are seeded random token
ids, the same in every mode. Each mode runs ``--warmup`` untimed steps, then
``--steps`` timed ones; wall and process CPU seconds per step are printed,
with the load average (timings on a shared machine move with it).

    python benchmarks/bench_distill.py                        # SmolLM2-135M W2 g64, 256 tokens, 3 steps
    python benchmarks/bench_distill.py --json out.json --modes quant-int8,quant
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

from bench_sft import _reset_peak_rss, _status_mib  # benchmarks/ is sys.path[0] when run as a script
from provenance import dump_json

MODES = ("fp", "quant-int8", "quant")


def _int8_forward(layer, x):
    """A QuantLinear's training call through the int8-codes path (unpacked at every call)."""
    from decoupleq.sft import quant_linear

    zero = None if layer.symmetric else layer.zero
    return quant_linear(x, layer.codes, layer.scale, zero, layer.bias, layer.group_size)


def _fp_steps(student, teacher, windows, n_steps):
    """The lower bound: distillation's step on a float student, its linear weights trained."""
    import torch
    from torch import nn

    from decoupleq.blockwise import _Adam
    from decoupleq.distill import DEFAULT_BETAS, DEFAULT_LR, final_hidden_module

    body = final_hidden_module(student)
    params = [m.weight for m in body.modules() if isinstance(m, nn.Linear)]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = _Adam(params, lr=DEFAULT_LR, betas=DEFAULT_BETAS, eps=1e-8, weight_decay=0.0, decoupled=True)
    t_body = final_hidden_module(teacher)
    student.eval()
    teacher.eval()
    for i in range(n_steps):
        ids = windows[i:i + 1]
        with torch.no_grad():
            target = t_body(input_ids=ids)[0]
        loss = (body(input_ids=ids)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sum(p.numel() for p in params)


def worker(args) -> dict:
    import torch

    import decoupleq
    import decoupleq.sft
    from decoupleq.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher = load_model(args.model).model
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, teacher.config.vocab_size, (args.warmup + args.steps, args.seq_len), generator=g)
    student = copy.deepcopy(teacher)
    if args.mode != "fp":
        cfg = decoupleq.QuantConfig(method="rtn", bits=args.bits, group_size=args.group_size, init="minmax")
        decoupleq.quantize(student, windows[:1, :16], cfg, blockwise=False)
    if args.mode == "quant-int8":
        decoupleq.sft.quant_linear_forward = _int8_forward
    build_s = time.perf_counter() - t0

    def run(n, start):
        if args.mode == "fp":
            return _fp_steps(student, teacher, windows[start:start + n], n)
        r = decoupleq.distill(student, teacher, windows[start:start + n], steps=n, verbose=False)
        return r.n_params

    import gc

    if args.warmup:
        run(args.warmup, 0)
    gc.collect()
    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    trained = run(args.steps, args.warmup)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {
        "mode": args.mode,
        "model": args.model,
        "weights": "float32" if args.mode == "fp" else f"RTN min-max W{args.bits} g{args.group_size}",
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "step_s": wall / args.steps,
        "step_cpu_s": cpu / args.steps,
        "trained_values": trained,
        "rss_before_steps_mib": rss_before,
        "peak_rss_steps_mib": _status_mib("VmHWM") if reset else None,
        "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_1min": [load0, os.getloadavg()[0]],
        "build_s": build_s,
    }


def _worker_argv(args, mode):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", args.model,
            "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--bits", str(args.bits), "--group-size", str(args.group_size)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}")
    results = {}
    for mode in modes:
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
    print(f"{args.model}, one {args.seq_len}-token window per step (teacher forward + student forward/backward "
          f"+ AdamW), {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'mode':<11} {'weights':<24} {'step (wall)':>12} {'step (CPU)':>11} {'peak RSS (steps)':>17} "
          f"{'load avg':>11}")
    for mode, r in results.items():
        peak = "n/a" if r["peak_rss_steps_mib"] is None else f"{r['peak_rss_steps_mib']:,.0f} MiB"
        load = "-".join(f"{v:.1f}" for v in r["loadavg_1min"])
        print(f"{mode:<11} {r['weights'][:24]:<24} {r['step_s']:>11.2f}s {r['step_cpu_s']:>10.2f}s {peak:>17} "
              f"{load:>11}")
    if "quant" in results:
        q = results["quant"]
        for other in ("quant-int8", "fp"):
            if other in results:
                o = results[other]
                print(f"quant / {other}: wall x{q['step_s'] / o['step_s']:.2f}, "
                      f"CPU x{q['step_cpu_s'] / o['step_cpu_s']:.2f}")
    if args.json:
        dump_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "worker"},
                              "results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
