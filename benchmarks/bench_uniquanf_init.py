"""UniQuanF's unified initialisation against min-max uniform quantization on real SmolLM2-135M layers.

For the linears of a few blocks, the Hessian of each layer's inputs is taken
over WikiText-2 calibration windows, and the layer error
``sum_r (w_hat_r - w_r) H00 (w_hat_r - w_r)^T`` (damped H, 1%) is compared for:

- ``bcq``: the unified initialisation (C core), before any training;
- ``uq``: min-max UQ with the same scale and zero (rounded to nearest);
- ``rtn``: the library's RTN (min-max range widened to contain 0).

Example (under a minute on 2 cores):
    python benchmarks/bench_uniquanf_init.py --blocks 0 15 29 --windows 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from decoupleq import HessianAccumulator, QuantConfig, damp, quantize_weight
from decoupleq.data import find_data_dir, from_text, read_text
from decoupleq.uniquanf_init import unified_init
from decoupleq.zoo import load_model


def layer_error(W, What, H00):
    D = What.astype(np.float64) - W.astype(np.float64)
    return float(np.sum((D @ H00) * D))


def minmax_uq(W, init, bits, group_size):
    g = W.shape[1] if group_size == -1 else group_size
    u = W.reshape(W.shape[0], -1, g) / init.scale[..., None] + init.zero[..., None]
    q = np.clip(np.floor(u + 0.5), 0, (1 << bits) - 1)
    return (init.scale[..., None] * (q - init.zero[..., None])).reshape(W.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--settings", nargs="+", default=["2:64", "3:128", "4:-1"], help="bits:group_size")
    args = ap.parse_args()

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    text = read_text(find_data_dir() / "wikitext-2-raw" / "wiki.test.raw")
    ids = from_text(text, tok, num_samples=args.windows, seq_len=args.seq_len, seed=1)
    layers = {}
    for b in args.blocks:
        for name, m in model.model.layers[b].named_modules():
            if isinstance(m, torch.nn.Linear):
                layers[f"{b}.{name}"] = m
    accs = {n: HessianAccumulator(m.in_features) for n, m in layers.items()}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: accs[n].add(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in layers.items()]
    t0 = time.perf_counter()
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    print(f"Hessians of {len(layers)} layers over {args.windows} x {args.seq_len} tokens: {time.perf_counter() - t0:.1f}s")
    for setting in args.settings:
        bits, gs = (int(x) for x in setting.split(":"))
        t0 = time.perf_counter()
        print(f"\nW{bits} g{gs}: layer, bcq/uq, bcq/rtn (below 1: the BCQ init is better)")
        ratios_uq, ratios_rtn, t_init = [], [], 0.0
        for name, m in layers.items():
            W = m.weight.detach().float().numpy()
            H = accs[name].hessian()
            H00 = damp(H, 0.01)
            t1 = time.perf_counter()
            init = unified_init(W, bits, gs)
            t_init += time.perf_counter() - t1
            e_bcq = layer_error(W, init.dequantize(), H00)
            e_uq = layer_error(W, minmax_uq(W, init, bits, gs), H00)
            e_rtn = float(quantize_weight(W, H, QuantConfig(method="rtn", bits=bits, group_size=gs)).loss.sum())
            ratios_uq.append(e_bcq / e_uq)
            ratios_rtn.append(e_bcq / e_rtn)
            print(f"  {name:24s} {tuple(W.shape)!s:12s} {e_bcq / e_uq:6.3f} {e_bcq / e_rtn:6.3f}")
        print(f"  worst bcq/uq {max(ratios_uq):.3f}, worst bcq/rtn {max(ratios_rtn):.3f}; "
              f"init time {t_init:.2f}s for {len(layers)} layers ({time.perf_counter() - t0:.1f}s in all)")


if __name__ == "__main__":
    main()
