"""A hostile file costs load() no more than twice the time and memory of a good file of its size.

The forgery: a good checkpoint plus hundreds of empty tensors under distinct layer indices
(``x.0.y``, ``x.1.y``...), its config's ``num_hidden_layers`` raised to match and the whole
file re-signed. Every check on the config passes (the indices "back" the layer count), so
only building the model shows the lie; each fake index costs the file ~200 bytes, and each
Llama layer costs a meta-device build ~3-5 ms. The good file is a real tiny Llama, quantized
and saved, with as many layers as make it at least as large as the forgery.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import decoupleq
from decoupleq.config import QuantConfig
from decoupleq.io import METADATA_KEY, load, save

from _pipeline_models import one_thread, tiny_llama

FAKE_LAYERS = 400


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _quantized_llama(layers):
    model = tiny_llama(seed=0, layers=layers, tie=True)
    ids = torch.randint(2, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    decoupleq.quantize(model, ids, QuantConfig(bits=2, group_size=16, method="rtn"), blockwise=False, verbose=False)
    return model


def _forge(good_path, path, fake_layers):
    from decoupleq._io_schema import META_DIGEST_KEY, tensor_digest, text_digest

    with safe_open(str(good_path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(good_path))
    for i in range(fake_layers):
        tensors[f"x.{i}.y"] = torch.zeros(0)
    meta["model"]["hf_config"]["num_hidden_layers"] = fake_layers
    meta["checksums"] = {k: tensor_digest(t) for k, t in tensors.items()}
    text = json.dumps(meta, sort_keys=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: text, META_DIGEST_KEY: text_digest(text)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    forged = d / "forged.safetensors"
    save(_quantized_llama(1), d / "one.safetensors")
    _forge(d / "one.safetensors", forged, FAKE_LAYERS)
    layers = 1
    while True:  # the smallest real model at least as large as the forgery
        good = d / f"good{layers}.safetensors"
        save(_quantized_llama(layers), good)
        if os.path.getsize(good) >= os.path.getsize(forged):
            break
        layers += 1
    return forged, good


def _best_time(path, repeats=5):
    """The least CPU time of this process over ``repeats`` loads: CPU, not wall time, so that
    other work on a shared machine does not count (load runs on this thread alone)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        try:
            load(path)
        except ValueError:
            pass
        best = min(best, time.process_time() - t0)
    return best


def test_forged_layer_count_is_refused_naming_the_cause(files):
    forged, _ = files
    with pytest.raises(ValueError, match=r"builds a LlamaForCausalLM with more than \d+ params, for the \d+ tensors"):
        load(forged)


def test_forged_layer_count_costs_at_most_twice_a_good_file_of_its_size(files):
    forged, good = files
    load(good)  # warm: imports and transformers' first-use work count for neither
    # Interleaved and the best of several, so the machine's load hits both alike.
    t_good, t_forged = _best_time(good), _best_time(forged)
    assert t_forged <= 2 * t_good, (t_forged, t_good)


_RSS_PROBE = r"""
import sys, resource
import decoupleq
from decoupleq.io import load
try:  # warm, on the same file: what imports and first use allocate is not the file's cost
    load(sys.argv[1])
except ValueError:
    pass
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
before = rss_kib()
try:
    load(sys.argv[1])
except ValueError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def _peak_growth_mib(path):
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return max(float(out.stdout.split()[-1]), 0.0)


def test_forged_layer_count_costs_at_most_twice_the_memory_of_a_good_file(files):
    forged, good = files
    # The peak above the warm process's resident size; 1 MiB of floor so that two
    # near-zero figures are not compared as a ratio of noise.
    assert _peak_growth_mib(forged) <= 2 * max(_peak_growth_mib(good), 1.0)
