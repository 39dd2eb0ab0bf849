"""What load()'s checks cost: SmolLM2-135M, W2 g64 RTN, saved and loaded back.

Loads the packaged SmolLM2-135M, quantizes it by round-to-nearest (no
calibration data: the checks do not depend on how the codes were chosen),
saves it, then times ``decoupleq.load(path)`` (rebuild from the stored config)
with ``verify=True`` (the default: per-tensor and metadata SHA-256) and
``verify=False``, and ``load(path, model=skeleton)`` into a fresh float model;
the median of ``--repeats`` runs each. Also times one SHA-256 pass over the
file's bytes and the refusal of a file whose config claims ``vocab_size =
2**33`` (built from the same file).

    python benchmarks/bench_load.py --repeats 3 --json load.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

from provenance import dump_json  # benchmarks/ is sys.path[0] when run as a script


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import decoupleq
    from decoupleq._io_schema import META_DIGEST_KEY, tensor_digest, text_digest
    from decoupleq.config import QuantConfig
    from decoupleq.zoo import load_model

    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    ids = torch.zeros(1, 8, dtype=torch.long)
    decoupleq.quantize(lm.model, ids, QuantConfig(bits=2, group_size=64, method="rtn"), blockwise=False,
                       verbose=False)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        decoupleq.save(lm.model, path)
        out["file_mb"] = os.path.getsize(path) / 1e6

        def sha_pass():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)

        out["sha256_pass_s"] = median_time(sha_pass, args.repeats)
        out["load_verify_s"] = median_time(lambda: decoupleq.load(path), args.repeats)
        out["load_no_verify_s"] = median_time(lambda: decoupleq.load(path, verify=False), args.repeats)
        skeleton = load_model("smollm2-135m").model
        out["load_into_model_s"] = median_time(lambda: decoupleq.load(path, model=skeleton), args.repeats)

        # The same file with a lying vocab_size, re-signed: refused before anything is built.
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["decoupleq"])
        meta["model"]["hf_config"]["vocab_size"] = 2**33
        tensors = load_file(path)
        meta["checksums"] = {k: tensor_digest(t) for k, t in tensors.items()}
        text = json.dumps(meta, sort_keys=True)
        lying = os.path.join(d, "lying.safetensors")
        save_file(tensors, lying, metadata={"decoupleq": text, META_DIGEST_KEY: text_digest(text)})

        def refuse():
            try:
                decoupleq.load(lying)
            except ValueError:
                return
            raise AssertionError("the lying file loaded")

        out["refuse_vocab_2_pow_33_s"] = median_time(refuse, args.repeats)
    for k, v in out.items():
        print(f"{k:26s} {v:8.3f}")
    if args.json:
        dump_json(args.json, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
