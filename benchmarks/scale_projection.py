"""A cost model of ``quantize`` on a large Llama spread over N machines (bench_scale.py --project).

Measured here, on one core (``measure``; about 20 s of CPU):

- ``solve_s_per_mn2``: decoupleQ W2 g64 (4 iterations, NeUQI start) on a
  synthetic m x n layer takes ``c_s * m * n**2`` seconds; fitted on four
  sizes (the spread of the per-size constants is reported with it).
- ``syrk_s_per_tn2``: a Hessian accumulation of T tokens of width n takes
  ``c_h * T * n**2`` seconds (the C core's float32 syrk).
- ``gemm_flops``: torch float32 matmul throughput on one core (the block's
  forward and backward passes are matmuls).

The model (``project``), per transformer block, the blocks one after another:

- forward passes of the calibration tokens: one for the Hessians of each of
  the 4 layer-input groups (true sequential: q/k/v, o, gate/up, down; each
  runs the block up to that group, counted as a whole forward each) plus one
  for the next block's inputs: 5 * 2 * P_block flops per token;
- block tuning: ``epochs`` passes of forward + backward, 3 * 2 * P_block
  flops per token;
- Hessians: the syrk of every token into the 4 inputs (widths h, h, h, f);
- the layer solves: sum over the 7 layers of ``c_s * m * n**2``;
- all of it divided over N machines of C cores at efficiency ``eff`` (the
  tokens and the rows split evenly: ``shards`` a multiple of N);
- communication at ``bandwidth`` bytes/s per machine, not overlapped with
  compute: each rank receives every shard's Hessian sum (S * n**2 * 8 bytes
  per input, ``shards`` = S, at least N), the other ranks' rows of every
  layer (int8 codes + float32 scales/zeros + float64 losses/trace), and per
  tuning step the float parts' gradients of ``batches_per_step`` batches
  (float64, all-reduced: 2x its size);
- memory per rank: the block's float32 weights, its share of the calibration
  activations (inputs and labels, float32), the Hessians it holds at once
  (S / N shard accumulators of the widest input, float64 sum + float32
  partial, plus the gathered round and the running sum), and the solver's
  workspace for the widest layer (assumed 8 float32 copies of its rows'
  weights plus H, its float32 copy and its factor).

Not modelled: the embedding/head, start-up and loading time, stragglers,
overlap of communication and compute, NUMA, GPU forward passes (the model is
for CPUs), and the activation cache spilling to disk past its budget.
"""
from __future__ import annotations

import time

LLAMAS = {
    # hidden, intermediate, layers, heads, kv heads (Llama-2 7B and 70B)
    "llama-7b": dict(h=4096, f=11008, L=32, heads=32, kv=32),
    "llama-70b": dict(h=8192, f=28672, L=80, heads=64, kv=8),
}


def measure() -> dict:
    """One-core constants (run with every thread count set to 1)."""
    import numpy as np
    import torch

    import decoupleq
    from decoupleq.reference.synthetic import synthetic_problem

    torch.set_num_threads(1)
    cfg = decoupleq.QuantConfig(bits=2, group_size=64, iterations=4)
    per = []
    for m, n in [(256, 256), (512, 256), (256, 512), (512, 512)]:
        W, H = synthetic_problem(m, n, seed=0)
        t0 = time.perf_counter()
        decoupleq.quantize_weight(W, H, cfg)
        per.append(((m, n), (time.perf_counter() - t0) / (m * n * n)))
    c_s = sorted(c for _, c in per)[len(per) // 2]
    X = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)
    acc = decoupleq.HessianAccumulator(512)
    acc.add(X[:64])
    t0 = time.perf_counter()
    for _ in range(4):
        acc.add(X)
    c_h = (time.perf_counter() - t0) / (4 * 4096 * 512 * 512)
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    flops = 8 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    return {"solve_s_per_mn2": c_s, "solve_s_per_mn2_by_size": [[list(s), c] for s, c in per],
            "syrk_s_per_tn2": c_h, "gemm_flops": flops}


def _layers(c: dict) -> list:
    """(name, m, n) of one block's seven linears."""
    h, f, hd = c["h"], c["f"], c["h"] // c["heads"]
    kv = c["kv"] * hd
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", f, h), ("up", f, h), ("down", h, f)]


def project(consts: dict, model: str, machines: int, *, cores: int = 32, eff: float = 0.7,
            bandwidth: float = 12.5e9, tokens: int = 128 * 2048, epochs: int = 1, batches_per_step: int = 4,
            seq: int = 2048, group: int = 64, shards: int | None = None) -> dict:
    """Time, memory per rank and bytes of one run (see the module docstring)."""
    c = LLAMAS[model]
    N = machines
    S = max(shards or N, N)
    layers = _layers(c)
    p_block = sum(m * n for _, m, n in layers)
    widths = [c["h"], c["h"], c["h"], c["f"]]  # Hessian inputs: qkv, o, gate/up, down
    speed = cores * eff  # one-core units
    t_fwd = tokens * 5 * 2 * p_block / consts["gemm_flops"] / (N * speed)
    t_tune = epochs * tokens * 3 * 2 * p_block / consts["gemm_flops"] / (N * speed)
    t_hess = sum(tokens * n * n for n in widths) * consts["syrk_s_per_tn2"] / (N * speed)
    t_solve = sum(m * n * n for _, m, n in layers) * consts["solve_s_per_mn2"] / (N * speed)
    # Bytes each rank receives per block.
    hess_bytes = sum(S * n * n * 8 for n in widths) * (N - 1) / N if N > 1 else 0
    row_bytes = sum(m * n + m * (n // group) * 8 + m * 8 * 6 for _, m, n in layers) * (N - 1) / N if N > 1 else 0
    float_params = sum(2 * m * (n // group) for _, m, n in layers) + 2 * c["h"]
    steps = max(1, tokens // seq // batches_per_step) * epochs
    grad_bytes = steps * 2 * batches_per_step * float_params * 8 if N > 1 else 0
    t_comm = (hess_bytes + row_bytes + grad_bytes) / bandwidth
    per_block = t_fwd + t_tune + t_hess + t_solve + t_comm
    f = c["f"]
    mem = {
        "block_weights_gb": p_block * 4 / 1e9,
        "activations_gb": 2 * tokens / N * c["h"] * 4 / 1e9,
        "hessians_gb": (-(-S // N) * f * f * 12 + 2 * N * f * f * 8 / N + f * f * 8) / 1e9,
        "solver_gb": (8 * (c["h"] * f) / N * 4 + 3 * f * f * 8) / 1e9,
    }
    mem["total_gb"] = sum(mem.values())
    parts = {"forward": t_fwd, "tuning": t_tune, "hessians": t_hess, "solve": t_solve, "communication": t_comm}
    return {
        "model": model, "machines": N, "shards": S, "cores_per_machine": cores, "efficiency": eff,
        "bandwidth_bytes_per_s": bandwidth, "calibration_tokens": tokens, "tuning_epochs": epochs,
        "hours": per_block * c["L"] / 3600, "per_block_s": parts, "bound_by": max(parts, key=parts.get),
        "bytes_received_per_rank_per_block": {"hessians": hess_bytes, "rows": row_bytes, "gradients": grad_bytes},
        "largest_hessian_all_gather_bytes": S * f * f * 8 if N > 1 else 0,
        "memory_per_rank_gb": mem,
    }
