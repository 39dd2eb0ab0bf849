"""Quantize SmolLM2-135M with every method at several bit widths and compare.

    python benchmarks/bench_models.py --json results.json      # the full grid (hours on 2 cores)
    python benchmarks/bench_models.py --quick                  # W2 g64 only, small budgets
    python benchmarks/bench_models.py --configs 3:128 --methods rtn,gptq   # a part of the grid
    python benchmarks/bench_models.py --configs 4:-1 --methods decoupleq+bt --bt-epochs 2   # longer block tuning
    python benchmarks/bench_models.py --configs 4:-1 --methods decoupleq+bt --bt-target fp_inputs
    python benchmarks/bench_models.py --configs 2:64 --methods rtn --distill 32   # then distill the scales/zeros

For each of FP, RTN, GPTQ, decoupleQ and decoupleQ + block tuning, at W2 per-channel, W2 g64,
W3 g128 and W4 per-channel: WikiText-2 test perplexity (calibrated on the validation split),
quantization wall time (calibration forward passes included), peak resident memory, and the
size of the saved file. Every run is its own process, so its peak RSS is its own.

Perplexity is measured on a fixed budget (``--eval-windows`` windows of ``--eval-seq-len``
tokens from the start of the test split, printed in the table's header) unless
``--full-eval``. Caveat printed with the table: SmolLM2 ships as a GGUF whose weights were
stored 4-bit in blocks of 32, so W4 results (g32 most of all) flatter any method.

``--json PATH`` writes one record per run: model, method, bits, group_size, blockwise, ppl,
seconds (wall), cpu_seconds (all threads), peak_rss_mb, file_mb, packed_mb, eval and calibration
budgets, block-tuning settings (bt_lr, bt_epochs, bt_target), distill_steps (``--distill``: steps of
``decoupleq.distill`` on the calibration windows after quantizing, teacher = the model loaded again; 0 = none)
and distill_seconds (also counted in seconds), threads.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

# (method, blockwise): the rows of each configuration's block in the table.
METHODS = [("rtn", False), ("gptq", False), ("decoupleq", False), ("decoupleq", True), ("uniquanf", False)]
CONFIGS = [(2, -1), (2, 64), (3, 128), (4, -1)]
QUICK_CONFIGS = [(2, 64)]


def method_label(method, blockwise):
    if method == "fp":
        return "FP32"
    return {"rtn": "RTN", "gptq": "GPTQ", "decoupleq": "decoupleQ", "uniquanf": "UniQuanF"}[method] + (
        " + block tuning" if blockwise else "")


def config_label(bits, group_size):
    return "FP" if bits is None else f"W{bits} " + ("per-channel" if group_size == -1 else f"g{group_size}")


def parse_config(text: str) -> tuple:
    """'2:64' -> (2, 64); '4:-1' -> (4, -1), per-channel."""
    try:
        bits, group = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--configs: {text!r} is not BITS:GROUP, e.g. 2:64 or 4:-1") from None
    return bits, group


def quantized_bits_per_weight(model) -> float:
    """Bits per quantized weight with the float parts counted (float16, as ``packed`` stores
    them): codes (or BCQ sign slots) plus scale/zero (or alpha/offset)."""
    from decoupleq.bcq import bits_per_weight
    from decoupleq.config import num_groups
    from decoupleq.nn import QUANT_MODULES
    from decoupleq.nn_bcq import BCQLinear

    bits = weights = 0.0
    for m in model.modules():
        if isinstance(m, QUANT_MODULES + (BCQLinear,)):
            info = m.quant_info()
            out, n = int(info["out_features"]), int(info["in_features"])
            if isinstance(m, BCQLinear):
                bits += bits_per_weight(m.bits, n, m.group_size, param_bits=16) * out * n
            else:
                g = num_groups(n, int(info["group_size"]))  # a short last group counts whole
                floats = out * g * (1 if info.get("symmetric") else 2)
                bits += int(info["bits"]) * out * n + 16 * floats
            weights += out * n
    return bits / weights if weights else float("nan")


def run_one(spec: dict, data: Path) -> dict:
    """Quantize and evaluate once, in this process; returns the record."""
    import torch

    import decoupleq
    from decoupleq.cli import packed_mb
    from decoupleq.data import calibration_data, read_text
    from decoupleq.evaluate import perplexity, token_stream
    from decoupleq.zoo import load_model

    lm = load_model(spec["model"])
    test_ids = token_stream(read_text(data / "wikitext-2" / "test.txt"), lm.tokenizer)
    seconds = cpu = 0.0
    if spec["method"] != "fp":
        t0, c0 = time.perf_counter(), time.process_time()
        calib = calibration_data(data / "wikitext-2" / "valid.txt", tokenizer=lm.tokenizer,
                                 num_samples=spec["num_samples"], seq_len=spec["seq_len"], seed=0)
        tune = decoupleq.BlockTuneConfig(lr=spec["bt_lr"], epochs=spec["bt_epochs"], target=spec["bt_target"])
        config = decoupleq.ModelQuantConfig(
            quant=decoupleq.QuantConfig(method=spec["method"], bits=spec["bits"], group_size=spec["group_size"],
                                        init=spec.get("init")),
            blockwise=tune if spec["blockwise"] else False,
            indivisible=spec.get("indivisible", "short"),
            verbose=False)
        decoupleq.quantize(lm.model, calib, config)
        if spec["distill_steps"]:
            t1 = time.perf_counter()
            decoupleq.distill(lm.model, load_model(spec["model"]).model, calib, steps=spec["distill_steps"],
                              verbose=False)
            spec = dict(spec, distill_seconds=time.perf_counter() - t1)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ppl = perplexity(lm.model, test_ids, seq_len=spec["eval_seq_len"], max_windows=spec["eval_windows"],
                     full=spec["full_eval"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        decoupleq.save(lm.model, str(path))
        file_mb = path.stat().st_size / 1e6
    bpw = None if spec["method"] == "fp" else quantized_bits_per_weight(lm.model)
    return dict(
        spec, ppl=ppl.ppl, bits_per_weight=bpw, init=(None if spec["method"] == "fp" else config.quant.init), seconds=seconds, cpu_seconds=cpu, file_mb=file_mb, packed_mb=packed_mb(lm.model),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        eval={"windows": ppl.budget.windows, "seq_len": ppl.budget.seq_len, "tokens": ppl.budget.tokens,
              "full": ppl.budget.full},
        threads=torch.get_num_threads(), note=lm.note,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="W2 g64 only, 8 calibration windows, 4 eval windows")
    p.add_argument("--json", type=Path, default=None, help="write one record per run to this file")
    p.add_argument("--data", type=Path, default=None, help="folder holding wikitext-2/ (default ../shared/data)")
    p.add_argument("--num-samples", type=int, default=None, help="calibration windows (default 32; quick 8)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--eval-windows", type=int, default=None, help="perplexity budget in windows (default 16; quick 4)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--full-eval", action="store_true", help="score the whole test split")
    p.add_argument("--methods", default=None,
                   help="comma list among fp,rtn,gptq,decoupleq,decoupleq+bt,uniquanf (default all)")
    p.add_argument("--inits", default=None,
                   help="comma list of QuantConfig.init values (minmax,shrink,neuqi,neuqi_int): every method "
                        "but uniquanf runs once per init (default: each method's default)")
    p.add_argument("--configs", default=None,
                   help="comma list of BITS:GROUP (group -1 = per-channel), e.g. 2:-1,3:128 (default the four above)")
    p.add_argument("--bt-lr", type=float, default=None,
                   help="block tuning learning rate (default BlockTuneConfig's)")
    p.add_argument("--bt-epochs", type=int, default=None, help="block tuning epochs (default BlockTuneConfig's)")
    p.add_argument("--bt-target", default=None, help="block tuning target: quantized_inputs (default) or fp_inputs")
    p.add_argument("--indivisible", choices=("short", "per_channel", "skip", "error"), default="short",
                   help="a layer whose inputs the group size does not divide: shorter last group (default), "
                        "per-channel (the only choice uniquanf has there), keep it float, or refuse")
    p.add_argument("--distill", type=int, default=0, metavar="STEPS",
                   help="after quantizing, distill the scales/zeros for STEPS steps (default 0: none)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, in a child process
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.distill < 0:
        p.error(f"--distill must be >= 0, got {args.distill}")

    if args.data is not None:
        os.environ["DECOUPLEQ_DATA"] = str(args.data)
    from decoupleq.data import find_data_dir

    data = find_data_dir(REPO)
    if data is None or not (data / "wikitext-2" / "test.txt").is_file():
        sys.exit("WikiText-2 not found: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA")

    if args.one is not None:
        record = run_one(json.loads(args.one), data)
        args.result.write_text(json.dumps(record))
        return

    num_samples = args.num_samples or (8 if args.quick else 32)
    eval_windows = args.eval_windows or (4 if args.quick else 16)
    wanted = None if args.methods is None else set(args.methods.split(","))
    from decoupleq import BlockTuneConfig

    given = (("lr", args.bt_lr), ("epochs", args.bt_epochs), ("target", args.bt_target))
    tune = BlockTuneConfig(**{k: v for k, v in given if v is not None})
    base = dict(model=MODEL, num_samples=num_samples, seq_len=args.seq_len, eval_windows=eval_windows,
                eval_seq_len=args.eval_seq_len, full_eval=args.full_eval, bt_lr=tune.lr, bt_epochs=tune.epochs,
                bt_target=tune.target, distill_steps=args.distill, indivisible=args.indivisible)
    specs = []
    if wanted is None or "fp" in wanted:
        specs.append(dict(base, method="fp", bits=None, group_size=None, blockwise=False, distill_steps=0))
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs is not None:
        configs = [parse_config(c) for c in args.configs.split(",")]
    inits = [None] if args.inits is None else args.inits.split(",")
    for bits, gs in configs:
        for method, bt in METHODS:
            key = method + ("+bt" if bt else "")
            if wanted is None or key in wanted:
                for init in ([None] if method == "uniquanf" else inits):
                    specs.append(dict(base, method=method, bits=bits, group_size=gs, blockwise=bt, init=init))

    records = []
    for spec in specs:
        name = f"{config_label(spec['bits'], spec['group_size'])} {method_label(spec['method'], spec['blockwise'])}"
        name += f" ({spec['init']})" if spec.get("init") else ""
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec), "--result", str(out),
                   "--data", str(data)]
            res = subprocess.run(cmd)
            if res.returncode != 0 or not out.is_file():
                print(f"  {name} failed (exit {res.returncode})", file=sys.stderr)
                records.append(dict(spec, ppl=None, seconds=None, peak_rss_mb=None, file_mb=None, packed_mb=None,
                                    error=f"exit {res.returncode}"))
                continue
            rec = json.loads(out.read_text())
        print(f"  ppl {rec['ppl']:.2f}, {rec['seconds']:.0f} s, peak RSS {rec['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
        records.append(rec)
        if args.json is not None:  # written after every run so a long grid leaves partial results
            dump_json(args.json, records, args)

    budget = "whole test split" if args.full_eval else f"first {eval_windows} windows x {args.eval_seq_len} tokens"
    print(f"\nSmolLM2-135M, WikiText-2 test perplexity ({budget}); calibrated on {num_samples} x {args.seq_len} "
          f"tokens of WikiText-2 valid; block tuning lr {tune.lr:g} x {tune.epochs} epoch(s), "
          f"target {tune.target}" + (f"; distilled {args.distill} steps after quantizing" if args.distill > 0 else "")
          + "\n")
    print("| config | method | init | ppl | bits/weight | time (s) | CPU (s) | peak RSS (MB) | file (MB) | packed (MB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        cells = [config_label(r["bits"], r["group_size"]), method_label(r["method"], r["blockwise"]),
                 r.get("init") or ""]
        if r.get("ppl") is None:
            cells += ["failed", "", "", "", "", "", ""]
        else:
            bpw = r.get("bits_per_weight")
            cells += [f"{r['ppl']:.2f}", "" if bpw is None else f"{bpw:.2f}", f"{r['seconds']:.0f}",
                      f"{r['cpu_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['file_mb']:.0f}",
                      f"{r['packed_mb']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nfile = decoupleq.save output (2-4-bit codes packed, scale/zero float32); packed = codes at their "
          "bit width, scale/zero in float16; bits/weight = packed bits per quantized weight, float parts included.")
    print("Note: SmolLM2's weights were stored 4-bit (GGUF Q4_1, blocks of 32): W4 results flatter any method.")


if __name__ == "__main__":
    main()
