"""A tiny Mixtral quantized with its experts: perplexity on its own sampled text.

Builds a Mixtral from a config (random weights, ``initializer_range`` 0.1 so that
its next-token distributions are far from uniform; 2 blocks, 8 experts, top-2,
hidden 128), samples calibration and evaluation text from the full-precision
model itself (``generate``, pure sampling), then quantizes copies with
decoupleQ (+ block tuning, the default) and reports the perplexity of each on
the evaluation text against full precision:

- W4 g32 and W2 g32 with every expert quantized (this package's MoE support);
- W4 g32 with the experts skipped (what the pipeline did before: attention only),
  for reference.

Also the share of expert weights quantized, the expert layers that took the
pooled fallback Hessian, and the time. About a minute of one CPU thread.

    python benchmarks/bench_moe.py --json moe.json
"""
from __future__ import annotations

import argparse
import logging
import math
import time

from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script


def build(seed: int = 0):
    import torch
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=8, num_experts_per_tok=2,
        bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=0.1,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def sample(model, n: int, length: int, seed: int):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(torch.zeros(n, 1, dtype=torch.long), do_sample=True, max_length=length,
                              min_length=length, top_k=0, pad_token_id=1, eos_token_id=None)


def perplexity(model, ids) -> float:
    import torch

    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences (128 tokens each)")
    ap.add_argument("--eval", type=int, default=8, help="evaluation sequences (128 tokens each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)

    import torch

    import decoupleq
    from decoupleq.config import ModelQuantConfig, QuantConfig
    from decoupleq.moe import parameter_counts

    torch.set_num_threads(args.threads)
    fp_model = build()
    calib = sample(fp_model, args.calib, 128, seed=1)
    held_out = sample(fp_model, args.eval, 128, seed=2)
    fp = perplexity(fp_model, held_out)
    print(f"full precision: ppl {fp:.3f} on {args.eval} x 128 of its own sampled tokens")
    records = [{"setting": "fp32", "ppl": fp}]
    for name, bits, skip in (("W4 g32, experts quantized", 4, ()), ("W2 g32, experts quantized", 2, ()),
                             ("W4 g32, experts kept (attention only)", 4, ("*.experts.*",))):
        model = build()
        t0 = time.perf_counter()
        decoupleq.quantize(model, calib, ModelQuantConfig(quant=QuantConfig(bits=bits, group_size=32),
                                                          skip=skip, verbose=False))
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, held_out)
        c = parameter_counts(model)
        ex = c["experts_quantized"] + c["experts_kept"]
        fallbacks = len(model.decoupleq_report.moe_fallbacks)
        print(f"{name}: ppl {ppl:.3f} (x{ppl / fp:.3f}), experts {100 * c['experts_quantized'] / ex:.1f}% "
              f"quantized, {fallbacks} fallback layers, {seconds:.1f} s")
        records.append({"setting": name, "bits": bits, "ppl": ppl, "seconds": seconds, "params": c,
                        "fallback_layers": fallbacks})
    if args.json:
        dump_json(args.json, records, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
