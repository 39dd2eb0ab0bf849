"""Real layers for the solver benchmark: the captured inputs of every linear layer of a few
blocks of a packaged model, calibrated on WikiText-2 valid.

Each layer comes back as (name, W float32 (out, in), H float64 (in, in)), H the mean outer
product of the inputs the full-precision model feeds that layer (undamped, as
``HessianAccumulator.hessian()`` returns it).
"""
from __future__ import annotations

import numpy as np


def real_layers(model_name: str, data_dir, *, blocks=(0, 15, 29), num_samples: int = 16,
                seq_len: int = 256, seed: int = 0):
    import torch

    from decoupleq import HessianAccumulator
    from decoupleq.data import calibration_data
    from decoupleq.models import find_blocks
    from decoupleq.zoo import load_model

    lm = load_model(model_name)
    model = lm.model.eval()
    calib = calibration_data(str(data_dir / "wikitext-2" / "valid.txt"), tokenizer=lm.tokenizer,
                             num_samples=num_samples, seq_len=seq_len, seed=seed)
    spec = find_blocks(model)
    picked = [b for b in blocks if b < len(spec.blocks)]
    accs, hooks = {}, []
    for i in picked:
        for name, module in spec.blocks[i].named_modules():
            if isinstance(module, torch.nn.Linear):
                full = f"{spec.block_name(i)}.{name}"
                acc = accs[full] = (module, HessianAccumulator(module.in_features))

                def hook(mod, inp, out, acc=acc[1]):
                    acc.add(inp[0].detach().reshape(-1, inp[0].shape[-1]))

                hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for row in calib:
                model(row[None, :])
    finally:
        for h in hooks:
            h.remove()
    out = []
    for full, (module, acc) in accs.items():
        W = np.ascontiguousarray(module.weight.detach().float().numpy())
        out.append((full, W, acc.hessian()))
    return out
