"""UniQuanF's unified initialisation against min-max uniform quantization on real SmolLM2-135M layers.

For the linears of a few blocks, the Hessian of each layer's inputs is taken
over WikiText-2 calibration windows, and the layer error
``sum_r (w_hat_r - w_r) H00 (w_hat_r - w_r)^T`` (damped H, 1%) is compared for:

- ``bcq``: the unified initialisation (C core), before any training, as in
  the paper (unweighted fit);
- ``bcq-h``: the same with the Hessian diagonal as column weights
  (``UniQuanFConfig.init_weighting="hessian_diag"``, the library default);
- ``uq``: min-max UQ with the same scale and zero (rounded to nearest);
- ``rtn``: the library's RTN (min-max range widened to contain 0).

Example (under a minute on 2 cores):
    python benchmarks/bench_uniquanf_init.py --blocks 0 15 29 --windows 4

A group size that does not divide a layer's width falls back to per-channel
for that layer, as ``decoupleq.quantize`` does by default.
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
    ap.add_argument("--windows", type=int, default=4)
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
        print(f"\nW{bits} g{gs}: layer, error ratios bcq/uq, bcq/rtn, bcq-h/uq, bcq-h/rtn (below 1: BCQ better)")
        worst, t_init = [0.0] * 4, 0.0
        for name, m in layers.items():
            W = m.weight.detach().float().numpy()
            lg = gs if gs == -1 or W.shape[1] % gs == 0 else -1
            H = accs[name].hessian()
            H00 = damp(H, 0.01)
            e_uq = e_rtn = None
            row = []
            for hdiag in (None, np.diag(H00).astype(np.float32)):
                t1 = time.perf_counter()
                init = unified_init(W, bits, lg, hdiag=hdiag)
                t_init += time.perf_counter() - t1
                if e_uq is None:
                    e_uq = layer_error(W, minmax_uq(W, init, bits, lg), H00)
                    cfg = QuantConfig(method="rtn", bits=bits, group_size=lg)
                    e_rtn = float(quantize_weight(W, H, cfg).loss.sum())
                e = layer_error(W, init.dequantize(), H00)
                row += [e / e_uq, e / e_rtn]
            worst = [max(a, b) for a, b in zip(worst, row)]
            note = "" if lg == gs else " (per-channel)"
            print(f"  {name:24s} {tuple(W.shape)!s:12s} " + " ".join(f"{r:6.3f}" for r in row) + note)
        print("  worst " + " ".join(f"{r:6.3f}" for r in worst) +
              f"; init time {t_init:.2f}s for {2 * len(layers)} fits ({time.perf_counter() - t0:.1f}s in all)")


if __name__ == "__main__":
    main()
