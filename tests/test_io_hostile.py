"""load() on hostile and careless input: refuse with a clear ValueError, change nothing, run nothing.

The corpus in tests/data/hostile/ (written by tests/data/make_hostile.py) is loaded in every run,
with and without a model to load into.
"""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import decoupleq
from decoupleq.config import QuantConfig
from decoupleq.io import METADATA_KEY, load, read_metadata, save

from _pipeline_models import one_thread

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from make_hostile import base_model, cases  # noqa: E402

HOSTILE = os.path.join(os.path.dirname(__file__), "data", "hostile")
with open(os.path.join(HOSTILE, "manifest.json")) as _f:
    MANIFEST = json.load(_f)


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _snapshot(model):
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return types, state


def _assert_unchanged(model, snap):
    types, state = snap
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def _quantized_base():
    model = base_model()
    ids = torch.randint(2, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    decoupleq.quantize(model, ids, QuantConfig(bits=2, group_size=16, method="rtn"), blockwise=False, verbose=False)
    return model


def test_corpus_matches_its_generator():
    assert sorted(MANIFEST) == sorted(f"{name}.safetensors" for name in cases())
    assert all(os.path.getsize(os.path.join(HOSTILE, f)) < 64 * 1024 for f in MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_hostile_file_is_refused_and_a_passed_model_unchanged(name):
    path = os.path.join(HOSTILE, name)
    regex = MANIFEST[name]
    with pytest.raises(ValueError, match=regex):
        load(path)
    for skeleton in (base_model(seed=7), _quantized_base()):
        snap = _snapshot(skeleton)
        with pytest.raises(ValueError, match=regex):
            load(path, model=skeleton)
        _assert_unchanged(skeleton, snap)


def test_the_corpus_base_file_loads(tmp_path):
    """The corpus's damage is what fails: the same model saved cleanly loads bit for bit."""
    model = _quantized_base()
    path = tmp_path / "good.safetensors"
    save(model, path)
    loaded = load(path)
    _assert_unchanged(loaded, _snapshot(model))
    into = load(path, model=base_model(seed=7))
    _assert_unchanged(into, _snapshot(model))


@pytest.mark.parametrize(
    "name", ["vocab_2_pow_33.safetensors", "layers_100000.safetensors", "layers_100000_with_bait.safetensors"]
)
def test_lying_sizes_fail_fast_without_allocating(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=MANIFEST[name]):
        load(os.path.join(HOSTILE, name))
    assert time.perf_counter() - t0 < 2.0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, grown_mib


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_every_sampled_bit_flip_is_refused_or_harmless(tmp_path):
    """300 single-bit flips, 150 in the header and 150 in the tensor bytes: each either raises
    ValueError or loads a model bit-identical to the one saved."""
    model = _quantized_base()
    good = tmp_path / "good.safetensors"
    save(model, good)
    data = good.read_bytes()
    header_bits = (8 + int.from_bytes(data[:8], "little")) * 8
    rng = random.Random(1234)
    positions = rng.sample(range(header_bits), 150) + rng.sample(range(header_bits, len(data) * 8), 150)
    want = _snapshot(model)
    bad = tmp_path / "bad.safetensors"
    outcomes = {"refused": 0, "identical": 0}
    for bit in positions:
        bad.write_bytes(_flip(data, bit))
        try:
            loaded = load(bad)
        except ValueError:
            outcomes["refused"] += 1
            continue
        _assert_unchanged(loaded, want)  # any flip that loads must change nothing
        outcomes["identical"] += 1
    assert outcomes["refused"] >= 290, outcomes  # all data flips, nearly all header flips


def test_verify_false_skips_only_the_checksums(tmp_path):
    model = _quantized_base()
    good = tmp_path / "good.safetensors"
    save(model, good)
    data = good.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(_flip(data, (8 + hlen) * 8 + 3))  # the first byte of the embedding
    with pytest.raises(ValueError, match="does not match its checksum"):
        load(flipped)
    loaded = load(flipped, verify=False)
    diff = loaded.model.embed_tokens.weight != model.model.embed_tokens.weight
    assert int(diff.sum()) == 1  # exactly the flipped value
    with pytest.raises(TypeError, match="verify must be a bool"):
        load(good, verify="no")


def test_version_2_file_without_checksums_still_loads(tmp_path):
    model = _quantized_base()
    good = tmp_path / "v3.safetensors"
    save(model, good)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["format_version"] = 2
    meta.pop("checksums")
    old = tmp_path / "v2.safetensors"
    save_file(load_file(str(good)), str(old), metadata={METADATA_KEY: json.dumps(meta)})
    _assert_unchanged(load(old), _snapshot(model))


def test_directories_and_special_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        load("/dev/null")
    with pytest.raises(ValueError, match="is a directory"):
        read_metadata(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------
# save: links, permissions, leftovers of killed saves
# ---------------------------------------------------------------------------


def test_save_writes_through_a_symlink(tmp_path):
    model = _quantized_base()
    real = tmp_path / "store" / "model.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    save(model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert read_metadata(real)["format"] == "decoupleq"
    _assert_unchanged(load(link), _snapshot(model))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_file_mode_follows_the_umask(tmp_path, mask):
    model = _quantized_base()
    old = os.umask(mask)
    try:
        save(model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o666 & ~mask


def test_temp_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "m.safetensors"
    code = (
        "import sys, time\n"
        "from decoupleq.io import _atomic_write\n"
        "def slow(tmp):\n"
        "    open(tmp, 'wb').write(b'x' * 4096)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "_atomic_write(sys.argv[1], slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(leftovers) == 1 and leftovers[0].startswith(".m.safetensors.")
        # While that save runs, another save leaves its temporary file alone (it is locked).
        save(_quantized_base(), target)
        assert leftovers[0] in os.listdir(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert leftovers[0] in os.listdir(tmp_path)  # SIGKILL runs no cleanup
    unrelated = tmp_path / ".other.safetensors.abcdefgh.tmp"
    unrelated.write_bytes(b"not ours")
    save(_quantized_base(), target)
    assert sorted(os.listdir(tmp_path)) == [".other.safetensors.abcdefgh.tmp", "m.safetensors"]


def test_failing_load_leaves_a_plain_torch_model_unchanged(tmp_path):
    """Not a Hugging Face model: the same guarantees for a CNN skeleton and bad files of several kinds."""
    from _pipeline_models import TinyCNN

    model = TinyCNN(seed=1).eval()
    images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    decoupleq.quantize(model, images, QuantConfig(bits=3, group_size=8, iterations=1, method="rtn"),
                       batch_size=4, blockwise=False, verbose=False)
    good = tmp_path / "cnn.safetensors"
    save(model, good)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(good))

    def bad_file(edit_meta=None, edit_tensors=None):
        from decoupleq._io_schema import META_DIGEST_KEY, tensor_digest, text_digest

        m, t = json.loads(json.dumps(meta)), dict(tensors)
        if edit_meta:
            edit_meta(m)
        if edit_tensors:
            edit_tensors(t)
        m["checksums"] = {k: tensor_digest(v) for k, v in t.items()}
        text = json.dumps(m)
        path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(t, str(path), metadata={METADATA_KEY: text, META_DIGEST_KEY: text_digest(text)})
        return path

    cases = [
        (bad_file(edit_tensors=lambda t: t.pop("head.bias")), r"'head\.bias' of quantized layer 'head' is missing"),
        (bad_file(edit_tensors=lambda t: t.update({"extra": torch.ones(2)})), r"unexpected \['extra'\]"),
        (bad_file(edit_tensors=lambda t: t.update({"conv2.scale": torch.ones(16, 8)})),
         r"conv2\.scale.*\(16, 8\).*needs \(16, 9\)"),
        (bad_file(edit_meta=lambda m: m["layers"]["conv2"].update(kernel_size=[3, "3"])), r"conv2.*'kernel_size'"),
        (bad_file(edit_meta=lambda m: m["layers"]["conv2"].update(padding_mode="evil")), r"conv2.*'padding_mode'"),
        (bad_file(edit_meta=lambda m: m["layers"]["conv2"].update(type="linear")), r"conv2.*linear layer.*Conv2d"),
    ]
    for path, regex in cases:
        skeleton = TinyCNN(seed=5)
        snap = _snapshot(skeleton)
        with pytest.raises(ValueError, match=regex):
            load(path, model=skeleton)
        _assert_unchanged(skeleton, snap)
    back = load(good, model=TinyCNN(seed=5))
    _assert_unchanged(back, _snapshot(model))


def test_builtin_gpu_attention_loads_with_sdpa(tmp_path, caplog):
    """A model saved with transformers' own flash attention (nothing to download) loads on the
    CPU with "sdpa"; a Hub kernel name is refused (the corpus's attn_hub_kernel file)."""
    model = _quantized_base()
    good = tmp_path / "good.safetensors"
    save(model, good)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["model"]["attn_implementation"] = "flash_attention_2"
    from decoupleq._io_schema import META_DIGEST_KEY, text_digest

    text = json.dumps(meta)
    path = tmp_path / "fa2.safetensors"
    save_file(load_file(str(good)), str(path), metadata={METADATA_KEY: text, META_DIGEST_KEY: text_digest(text)})
    with caplog.at_level("WARNING", logger="decoupleq"):
        loaded = load(path)
    assert loaded.config._attn_implementation == "sdpa"
    assert "loading with 'sdpa'" in caplog.text
    _assert_unchanged(loaded, _snapshot(model))


_ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 9, 2**31, 2**63, 1.5, float("nan"), "", "x", "int8", "linear",
               "conv2d", "decoupleq-lanes8-v1", [], [1, 2], {}, {"a": 1}, "float32", "__class__", "os.system", 16, 80]


def _json_paths(o, p=()):
    yield p
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _json_paths(v, p + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _json_paths(v, p + (i,))


def test_mutated_metadata_raises_only_value_errors(tmp_path):
    """A seeded fuzz of the metadata document (1-3 values replaced by odd ones or removed, the file
    re-signed so the checks behind the checksums are what run): every load either succeeds or raises
    ValueError, never another exception, and a model passed in is unchanged when it raises."""
    from make_hostile import read, write

    good = tmp_path / "good.safetensors"
    save(_quantized_base(), good)
    meta, tensors, _ = read(str(good))
    paths = [p for p in _json_paths(meta) if p and p[0] != "checksums"]
    rng = random.Random(20261202)
    skeleton = base_model(seed=3)
    snap = _snapshot(skeleton)
    bad = tmp_path / "bad.safetensors"
    refused = 0
    for _ in range(60):
        m = json.loads(json.dumps(meta))
        for _ in range(rng.randint(1, 3)):
            p = rng.choice(paths)
            o = m
            try:
                for k in p[:-1]:
                    o = o[k]
                if rng.random() < 0.15 and isinstance(o, dict):
                    o.pop(p[-1], None)
                else:
                    o[p[-1]] = rng.choice(_ODD_VALUES)
            except (KeyError, IndexError, TypeError):  # an earlier edit removed the path
                pass
        write(str(bad), m, dict(tensors))
        for model in (None, skeleton):
            try:
                load(bad, model=model)
            except ValueError:
                refused += 1
                if model is not None:
                    _assert_unchanged(skeleton, snap)
                continue
            if model is not None:  # it loaded: the model now holds the file, start afresh
                skeleton = base_model(seed=3)
                snap = _snapshot(skeleton)
    assert refused >= 60  # most edits hit a checked field
