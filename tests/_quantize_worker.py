"""A quantize run in its own process, for the resume and distributed tests.

    python _quantize_worker.py OUT [--layers N] [--method M] [--checkpoint DIR] [--resume]
        [--kill-after-solves K] [--batches-per-step S] [--target T] [--model scale] [--shards S]
        [--num-batches N] [--seq L] [--fail-rank R --fail-after-solves K [--linger SECONDS]]

Quantizes a tiny Llama (random weights from a config, seed 0) on 12 random
token batches and saves it to OUT with ``decoupleq.save`` (rank 0 of a
distributed run; every rank writes OUT.rankR.json with a digest of its
state and the bytes it moved). ``--kill-after-solves K`` sends SIGKILL to
this process when the solver is called for the (K+1)-th time: a hard kill
in the middle of a run, after whatever the run folder holds by then.
Under torchrun-style environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) the library joins the gloo group itself. ``--model scale`` is
benchmarks/bench_scale.py's "tiny" Llama (4 blocks, hidden 128, vocab 512)
instead; the record then also holds a digest of every layer's Hessian.
``--fail-rank R --fail-after-solves K`` makes rank R's (K+1)-th solve raise,
and that process stay alive ``--linger`` seconds after the error (as a
caller that catches it would), so only the library can tell the others.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pipeline_models import tiny_llama, token_batches  # noqa: E402

import decoupleq  # noqa: E402
import decoupleq.distributed  # noqa: E402
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
    p.add_argument("--model", default="tiny", choices=["tiny", "scale"])
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--num-batches", type=int, default=12)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--fail-after-solves", type=int, default=0)
    p.add_argument("--linger", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)

    hessians = []
    real_hessian = decoupleq.distributed.Dist.hessian

    def recording(self, acc):
        H, n = real_hessian(self, acc)
        hessians.append(hashlib.sha256(np.ascontiguousarray(H).tobytes()).hexdigest())
        return H, n

    decoupleq.distributed.Dist.hessian = recording
    rank = int(os.environ.get("RANK", "0"))
    if a.fail_rank == rank:
        real_solve = decoupleq.solver.quantize_weight
        solves = {"n": 0}

        def failing(*args, **kw):
            if solves["n"] == a.fail_after_solves:
                raise RuntimeError("injected failure")
            solves["n"] += 1
            return real_solve(*args, **kw)

        decoupleq.solver.quantize_weight = failing

    if a.kill_after_solves is not None:
        real = decoupleq.solver.quantize_weight
        calls = {"n": 0}

        def counting(*args, **kw):
            if calls["n"] == a.kill_after_solves:
                os.kill(os.getpid(), signal.SIGKILL)
            calls["n"] += 1
            return real(*args, **kw)

        decoupleq.solver.quantize_weight = counting

    if a.model == "scale":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=512, max_position_embeddings=512, hidden_size=128, intermediate_size=256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()
        calib = token_batches(n=a.num_batches, seq=a.seq, vocab=512)
        quant = decoupleq.QuantConfig(method=a.method, bits=2, group_size=64, iterations=4)
        tune = decoupleq.BlockTuneConfig(enabled=not a.no_blockwise, epochs=1, batches_per_step=a.batches_per_step)
    else:
        model = tiny_llama(layers=a.layers)
        calib = token_batches(n=a.num_batches, seq=a.seq)
        quant = decoupleq.QuantConfig(method=a.method, bits=2, group_size=32, iterations=3)
        tune = decoupleq.BlockTuneConfig(enabled=not a.no_blockwise, lr=1e-3, epochs=2,
                                         batches_per_step=a.batches_per_step, target=a.target)
    cfg = decoupleq.ModelQuantConfig(quant=quant, blockwise=tune, shards=a.shards, verbose=False)
    try:
        decoupleq.quantize(model, calib, cfg, checkpoint_dir=a.checkpoint, resume=a.resume)
    except Exception as exc:
        with open(f"{a.out}.rank{rank}.error", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        if a.fail_rank == rank:
            time.sleep(a.linger)  # a caller that outlives the error: only the library can tell the others
        raise
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
                   "layers": [[r.name, r.n_tokens] for r in model.decoupleq_report.layers],
                   "hessians": hessians}, f)


if __name__ == "__main__":
    main()
