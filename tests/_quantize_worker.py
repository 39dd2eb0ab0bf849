"""A quantize run in its own process, for the resume and distributed tests.

    python _quantize_worker.py OUT [--layers N] [--method M] [--checkpoint DIR] [--resume]
        [--kill-after-solves K] [--batches-per-step S] [--target T]

Quantizes a tiny Llama (random weights from a config, seed 0) on 12 random
token batches and saves it to OUT with ``decoupleq.save`` (rank 0 of a
distributed run; every rank writes OUT.rankR.json with a digest of its
state and the bytes it moved). ``--kill-after-solves K`` sends SIGKILL to
this process when the solver is called for the (K+1)-th time: a hard kill
in the middle of a run, after whatever the run folder holds by then.
Under torchrun-style environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) the library joins the gloo group itself.
"""
import argparse
import hashlib
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pipeline_models import tiny_llama, token_batches  # noqa: E402

import decoupleq  # noqa: E402
import decoupleq.solver  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--method", default="decoupleq")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after-solves", type=int, default=None)
    p.add_argument("--batches-per-step", type=int, default=1)
    p.add_argument("--target", default="quantized_inputs")
    p.add_argument("--no-blockwise", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)

    if a.kill_after_solves is not None:
        real = decoupleq.solver.quantize_weight
        calls = {"n": 0}

        def counting(*args, **kw):
            if calls["n"] == a.kill_after_solves:
                os.kill(os.getpid(), signal.SIGKILL)
            calls["n"] += 1
            return real(*args, **kw)

        decoupleq.solver.quantize_weight = counting

    model = tiny_llama(layers=a.layers)
    calib = token_batches(n=12, seq=16)
    cfg = decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(method=a.method, bits=2, group_size=32, iterations=3),
        blockwise=decoupleq.BlockTuneConfig(enabled=not a.no_blockwise, lr=1e-3, epochs=2,
                                            batches_per_step=a.batches_per_step, target=a.target),
    )
    decoupleq.quantize(model, calib, cfg, checkpoint_dir=a.checkpoint, resume=a.resume)
    d = decoupleq.distributed.current()
    if d.rank == 0:
        decoupleq.save(model, a.out)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.dtype != torch.bool
                 else v.numpy().tobytes())
    with open(f"{a.out}.rank{d.rank}.json", "w") as f:
        json.dump({"digest": h.hexdigest(), "bytes_moved": d.bytes_moved, "world_size": d.world_size,
                   "layers": [[r.name, r.n_tokens] for r in model.decoupleq_report.layers]}, f)


if __name__ == "__main__":
    main()
