"""Greedy decoding speed of SmolLM2-135M: QuantLinear (packed kernels) against the float model.

Loads the packaged SmolLM2-135M (``decoupleq.zoo.load_model("smollm2-135m")``),
quantizes two copies of it, W2 g64 and W4 per-channel, and times
``model.generate(..., do_sample=False, use_cache=True)`` on the same prompt with
the same number of new tokens (``min_new_tokens == max_new_tokens``, so an
end-of-text token cannot shorten a run) for the float32 model and both
quantized ones, in one process, side by side.

The quantized copies are made by round-to-nearest on the min-max grid
(``method="rtn"``, done here layer by layer with the C core, no calibration
data): decoding speed depends only on the bit width, group size and shapes of
the stored weights, not on how the codes were chosen, so the cheapest method
gives the same timings as GPTQ or decoupleQ would (the W2 RTN text is
gibberish; that is RTN at 2 bits, not the kernels). Under ``torch.no_grad`` (which
``generate`` uses) every ``QuantLinear`` runs the packed kernel: batch 1 per
decoded token straight from the packed codes, the prompt (prefill) through
dequantized tiles and sgemm. The tied embedding / LM head stays float.

Reported per model: prefill time (one ``generate`` with one new token),
decode tokens/s over the remaining tokens ((N - 1) / (t_N - t_1), best of the
repeats), end-to-end tokens/s, and the speed-up against the float model.

    python benchmarks/bench_decode.py --threads 2 --new-tokens 64 --json decode.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script

PROMPT = "The history of the printing press begins"


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rtn_copy(fp, bits: int, group_size: int):
    """A copy of ``fp`` whose decoder-layer linears are QuantLinear, by min-max RTN."""
    from torch import nn

    from decoupleq import QuantConfig, quantize_weight
    from decoupleq.nn import QuantLinear

    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size)
    model = copy.deepcopy(fp)
    for block in model.model.layers:
        for name, layer in list(block.named_modules()):
            if not isinstance(layer, nn.Linear):
                continue
            qw = quantize_weight(layer.weight.detach(), None, cfg)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, QuantLinear.from_quantized(layer, qw))
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch (and so kernel) threads (default 2)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default 3)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", metavar="PATH", help="write the records to PATH")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.new_tokens < 2 or args.repeats < 1:
        ap.error("--threads >= 1, --new-tokens >= 2 and --repeats >= 1 are required")

    import torch

    import decoupleq
    from decoupleq.zoo import load_model

    torch.set_num_threads(args.threads)
    decoupleq._C.set_blas_threads(args.threads)
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    fp = lm.model.eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids

    models = [("fp32", None, fp)]
    for label, bits, gs in (("W2 g64", 2, 64), ("W4 chan", 4, -1)):
        t0 = time.perf_counter()
        m = rtn_copy(fp, bits, gs)
        print(f"quantized {label} (rtn) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        models.append((label, {"bits": bits, "group_size": gs}, m.eval()))

    def generate(model, n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=tok.eos_token_id)

    records = []
    for label, quant, model in models:
        out = generate(model, args.new_tokens)  # warm-up (and the text)
        assert out.shape[1] == ids.shape[1] + args.new_tokens
        t1 = best_time(lambda: generate(model, 1), args.repeats)
        tn = best_time(lambda: generate(model, args.new_tokens), args.repeats)
        decode = (args.new_tokens - 1) / max(tn - t1, 1e-9)
        weights = sum(b.nbytes for n_, b in model.named_buffers() if n_.endswith(".packed"))
        records.append({
            "model": label, "quant": quant, "method": "rtn" if quant else None,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
            "prefill_s": t1, "total_s": tn, "decode_tok_s": decode,
            "end_to_end_tok_s": args.new_tokens / tn, "packed_code_bytes": weights,
            "text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
        })
    base = records[0]["decode_tok_s"]
    for r in records:
        r["decode_speedup"] = r["decode_tok_s"] / base

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SmolLM2-135M greedy decoding, prompt {records[0]['prompt_tokens']} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} threads, best of {args.repeats}; "
          f"kernel {decoupleq.backend_info()['kernel']}; load average {load:.2f}")
    print(f"{'model':10s} {'prefill ms':>10s} {'decode tok/s':>13s} {'e2e tok/s':>10s} {'vs fp32':>8s}")
    for r in records:
        print(f"{r['model']:10s} {r['prefill_s'] * 1e3:10.1f} {r['decode_tok_s']:13.1f} "
              f"{r['end_to_end_tok_s']:10.1f} {r['decode_speedup']:7.2f}x")
    for r in records:
        print(f"  {r['model']:8s} -> {r['text'][:70]!r}")
    if args.json:
        dump_json(args.json, {"records": records, "threads": args.threads, "load_average": load,
                              "torch": torch.__version__, "cpus": os.cpu_count()}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
