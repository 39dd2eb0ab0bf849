"""Prefill inside a torch model: QuantLinear's large-batch path against the alternatives.

A SmolLM2-135M forward over a window of tokens, all 30 blocks' linear layers
W2 g64 (RTN: the speed does not depend on the method), timed three ways in one
run: the full-precision model; QuantLinear as shipped (above 16 rows the C
core dequantizes and torch's GEMM multiplies); and the same layers routed
through ``packed_matmul``'s own large-batch path (dequantized tiles + OpenBLAS
sgemm), whose idle workers spin against torch's threads.

    python benchmarks/bench_prefill.py --tokens 256 --repeats 5
"""
import argparse
import time

import torch

import decoupleq
import decoupleq.nn as dq_nn
from decoupleq.zoo import load_model


def mean_forward_seconds(model, ids, repeats):
    with torch.no_grad():
        model(ids)  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            model(ids)
    return (time.perf_counter() - t) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    fp = load_model("smollm2-135m").model
    ids = torch.randint(0, fp.config.vocab_size, (1, args.tokens), generator=gen)
    q = load_model("smollm2-135m").model
    calib = torch.randint(0, q.config.vocab_size, (1, 64), generator=gen)
    decoupleq.quantize(q, calib, decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(method="rtn", bits=2, group_size=64), blockwise=False, verbose=False))

    rows = [("fp32 model (torch)", mean_forward_seconds(fp, ids, args.repeats)),
            ("W2 g64, C dequant + torch GEMM (default)", mean_forward_seconds(q, ids, args.repeats))]
    shipped = dq_nn.SMALL_BATCH_MAX
    dq_nn.SMALL_BATCH_MAX = 1 << 62  # every batch through packed_matmul (OpenBLAS above 16 rows)
    try:
        rows.append(("W2 g64, packed_matmul (OpenBLAS sgemm)", mean_forward_seconds(q, ids, args.repeats)))
    finally:
        dq_nn.SMALL_BATCH_MAX = shipped
    base = rows[0][1]
    print(f"SmolLM2-135M forward, {args.tokens} tokens, {torch.get_num_threads()} threads, mean of {args.repeats}")
    for label, sec in rows:
        print(f"  {label:42s} {sec * 1000:8.1f} ms  {sec / base:5.2f}x the fp32 time")


if __name__ == "__main__":
    main()
