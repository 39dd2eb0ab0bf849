"""Loading a quantized model: SmolLM2-135M, W2 g64 RTN, saved and loaded back.

Side by side, each in a fresh process (``--side-by-side``, the default): time and
peak RSS above the process's size before the call (``/proc/self/clear_refs``
resets the peak) of transformers' ``from_pretrained`` of the float32 model, of
``from_pretrained`` of the W2 g64 folder (``decoupleq.save``: built on the meta
device, each tensor materialised straight into its quantized layer), and of
``decoupleq.load`` of the single-file format (builds the float model first), with
the target: peak <= 1.5 x the folder's weights + the float embedding, and no
slower than the float32 load.

Then what the single-file ``load()``'s checks cost:
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


# Run in a fresh process per measurement, so one load's memory does not hide another's peak.
_CHILD = r"""
import json, sys, time
import torch, transformers, decoupleq

def kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])

torch.set_num_threads(int(sys.argv[3]))
base = kb("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current size
t0 = time.perf_counter()
if sys.argv[1] == "from_pretrained":
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
else:
    model = decoupleq.load(sys.argv[2])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": (kb("VmHWM:") - base) * 1024 / 1e6}))
"""


def measure(kind: str, path: str, threads: int, repeats: int) -> dict:
    """Median time and peak RSS increase of one way of loading, each run in a fresh process."""
    import subprocess

    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, kind, path, str(threads)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss_mb")}


def _weights_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")) / 1e6


def side_by_side(fp_dir: str, q_dir: str, q_file: str, embed_mb: float, args) -> dict:
    """The float32 model's from_pretrained beside the quantized folder's and the single file's loads."""
    res = {"fp32_weights_mb": _weights_mb(fp_dir), "w2g64_weights_mb": _weights_mb(q_dir),
           "float_embedding_mb": embed_mb}
    for key, kind, path in (("fp32_from_pretrained", "from_pretrained", fp_dir),
                            ("w2g64_from_pretrained", "from_pretrained", q_dir),
                            ("w2g64_single_file_load", "load", q_file)):
        for k, v in measure(kind, path, args.threads, args.repeats).items():
            res[f"{key}_{k}"] = v
    res["target_peak_rss_mb"] = 1.5 * res["w2g64_weights_mb"] + embed_mb
    res["meets_memory_target"] = res["w2g64_from_pretrained_peak_rss_mb"] <= res["target_peak_rss_mb"]
    res["meets_time_target"] = res["w2g64_from_pretrained_seconds"] <= res["fp32_from_pretrained_seconds"]
    print(f"{'':28s} {'seconds':>9s} {'peak RSS MB':>12s}   (weights on disk)")
    for key, mb in (("fp32_from_pretrained", res["fp32_weights_mb"]),
                    ("w2g64_from_pretrained", res["w2g64_weights_mb"]),
                    ("w2g64_single_file_load", res["w2g64_weights_mb"])):
        print(f"{key:28s} {res[key + '_seconds']:9.3f} {res[key + '_peak_rss_mb']:12.1f}   ({mb:.1f} MB)")
    print(f"target: peak <= 1.5 x {res['w2g64_weights_mb']:.1f} + {embed_mb:.1f} (float embedding) = "
          f"{res['target_peak_rss_mb']:.1f} MB: {'met' if res['meets_memory_target'] else 'NOT met'}; "
          f"no slower than fp32: {'met' if res['meets_time_target'] else 'NOT met'}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-side-by-side", dest="side_by_side", action="store_false",
                    help="only the single-file load()'s checks")
    ap.add_argument("--no-checks", dest="checks", action="store_false",
                    help="only the side-by-side loads")
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
    out = {}
    with tempfile.TemporaryDirectory() as d:
        fp_dir = os.path.join(d, "fp32")
        if args.side_by_side:
            lm.model.save_pretrained(fp_dir)  # the float32 model, before quantizing
        embed_mb = lm.model.get_input_embeddings().weight.numel() * 4 / 1e6
        decoupleq.quantize(lm.model, ids, QuantConfig(bits=2, group_size=64, method="rtn"), blockwise=False,
                           verbose=False)
        path = os.path.join(d, "m.safetensors")
        decoupleq.save(lm.model, path)
        out["file_mb"] = os.path.getsize(path) / 1e6
        if args.side_by_side:
            q_dir = os.path.join(d, "w2g64")
            decoupleq.save(lm.model, q_dir)
            out.update(side_by_side(fp_dir, q_dir, path, embed_mb, args))
        if not args.checks:
            if args.json:
                dump_json(args.json, out, args)
            return 0

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
        if not isinstance(v, bool):
            print(f"{k:32s} {v:10.3f}")
    if args.json:
        dump_json(args.json, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
