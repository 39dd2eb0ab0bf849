"""save / load: bit-exact round trips, atomic writes, clear errors on bad files."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import decoupleq
from decoupleq.config import QuantConfig
from decoupleq.io import FORMAT_VERSION, METADATA_KEY, _atomic_write, load, read_metadata, save
from decoupleq.nn import QuantConv2d, QuantLinear

from _pipeline_models import TinyCNN, logits, one_thread, tiny_gpt2, tiny_llama, token_batches


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


CFG = QuantConfig(bits=2, group_size=16, iterations=2)


@pytest.fixture(scope="module")
def quantized_llama():
    with one_thread():
        model = tiny_llama(seed=11, tie=True)
        decoupleq.quantize(model, token_batches(n=4, seq=16), CFG, verbose=False)
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_llama_round_trip_is_bit_exact_without_original_weights(quantized_llama, tmp_path):
    path = tmp_path / "llama.safetensors"
    save(quantized_llama, path)
    loaded = load(path)  # rebuilt from the stored config
    assert type(loaded) is type(quantized_llama) and not loaded.training
    _assert_same_state(quantized_llama, loaded)
    ids = token_batches(n=2, seq=16, seed=5)
    assert torch.equal(logits(loaded, ids), logits(quantized_llama, ids))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie kept
    assert loaded.decoupleq_config == quantized_llama.decoupleq_config


def test_file_is_safetensors_with_documented_metadata(quantized_llama, tmp_path):
    path = tmp_path / "m.safetensors"
    save(quantized_llama, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        keys = set(f.keys())
    assert meta["format"] == "decoupleq" and meta["format_version"] == FORMAT_VERSION
    assert meta["quantization"]["quant"]["bits"] == 2 and meta["quantization"]["quant"]["group_size"] == 16
    info = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert info == {
        "type": "linear", "origin": "linear", "in_features": 64, "out_features": 64, "bits": 2,
        "group_size": 16, "symmetric": False, "method": "decoupleq", "bias": False, "bias_dtype": None,
        "codes": "decoupleq-lanes8-v1",
    }
    assert meta["model"]["class"] == "LlamaForCausalLM" and meta["model"]["hf_config"]["hidden_size"] == 64
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in keys
    tensors = load_file(str(path))
    # 2-bit codes packed: 64 columns = 8 steps = one lane-word of 8 uint32 per row.
    assert "model.layers.0.self_attn.q_proj.codes" not in tensors
    packed = tensors["model.layers.0.self_attn.q_proj.packed"]
    assert packed.dtype == torch.uint32 and packed.shape == (64, 8)
    assert tensors["model.layers.0.self_attn.q_proj.scale"].shape == (64, 4)
    assert tensors["model.layers.0.self_attn.q_proj.scale"].dtype == torch.float32


def test_gpt2_and_bf16_round_trip(tmp_path):
    model = tiny_gpt2(seed=2)
    decoupleq.quantize(model, token_batches(n=3, seq=12), CFG, verbose=False)
    model.to(torch.bfloat16)
    path = tmp_path / "g.safetensors"
    save(model, path)
    loaded = load(path)
    _assert_same_state(model, loaded)
    assert loaded.transformer.h[0].attn.c_attn.origin == "conv1d"
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    assert loaded.transformer.h[0].attn.c_attn.scale.dtype == torch.float32
    ids = token_batches(n=2, seq=12, seed=3)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_cnn_loads_into_a_given_skeleton(tmp_path):
    model = TinyCNN(seed=1).eval()
    images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    decoupleq.quantize(model, images, QuantConfig(bits=3, group_size=8, iterations=2), batch_size=4, verbose=False)
    path = tmp_path / "cnn.safetensors"
    save(model, path)
    with pytest.raises(ValueError, match="not a Hugging Face model.*model="):
        load(path)
    skeleton = TinyCNN(seed=99)
    loaded = load(path, model=skeleton)
    assert loaded is skeleton and isinstance(loaded.conv2, QuantConv2d) and loaded.conv2.padding_mode == "reflect"
    _assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # Loading again into the (now quantized) model is fine too.
    load(path, model=loaded)


def test_save_replaces_atomically_and_leaves_no_temp_files(quantized_llama, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous contents")
    save(quantized_llama, path)
    assert read_metadata(path)["format_version"] == FORMAT_VERSION
    assert os.listdir(tmp_path) == ["m.safetensors"]

    before = path.read_bytes()

    def interrupted(tmp):
        with open(tmp, "wb") as f:
            f.write(before[: len(before) // 3])  # a partial file...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(path, interrupted)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]

    fresh = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        _atomic_write(fresh, lambda tmp: (_ for _ in ()).throw(OSError("disk full")))
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no file at all, no leftovers


def test_truncated_file_is_a_clear_error(quantized_llama, tmp_path):
    path = tmp_path / "m.safetensors"
    save(quantized_llama, path)
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load(path)


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(src))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    _write_signed(tensors, meta, dst)


def _write_signed(tensors, meta, dst):
    """Write a file with checksums that match its (edited) contents: the structural checks
    behind the checksums are what these tests are about."""
    from decoupleq._io_schema import META_DIGEST_KEY, tensor_digest, text_digest

    if meta.get("format_version", 0) >= 3:
        meta["checksums"] = {k: tensor_digest(t) for k, t in tensors.items()}
    text = json.dumps(meta)
    extra = {META_DIGEST_KEY: text_digest(text)} if meta.get("format_version", 0) >= 3 else {}
    save_file(tensors, str(dst), metadata={METADATA_KEY: text, **extra})


def test_wrong_version_and_foreign_files(quantized_llama, tmp_path):
    good = tmp_path / "good.safetensors"
    save(quantized_llama, good)
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, edit_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}.*reads format_version {FORMAT_VERSION}"):
        load(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a decoupleq checkpoint"):
        load(plain)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_mismatched_shapes_are_named(quantized_llama, tmp_path):
    good = tmp_path / "good.safetensors"
    save(quantized_llama, good)
    bad = tmp_path / "bad.safetensors"
    key = "model.layers.0.mlp.up_proj.scale"

    _rewrite(good, bad, edit_tensors=lambda t: t.update({key: t[key][:, :3].contiguous()}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.scale.*\(96, 3\).*\(96, 4\)"):
        load(bad)

    def claim_other_width(m):
        m["layers"]["model.layers.1.self_attn.o_proj"]["in_features"] = 32
    _rewrite(good, bad, edit_meta=claim_other_width)
    # 32 and 64 columns both pack into one lane-word per row: the scales catch it.
    with pytest.raises(ValueError, match=r"o_proj\.scale.*\(64, 4\).*needs \(64, 2\)"):
        load(bad)

    def claim_four_bits(m):  # 96 columns: one lane-word per row at 2 bits, two at 4
        m["layers"]["model.layers.1.mlp.down_proj"]["bits"] = 4
    _rewrite(good, bad, edit_meta=claim_four_bits)
    with pytest.raises(ValueError, match=r"down_proj\.packed.*\(64, 8\).*needs \(64, 16\)"):
        load(bad)

    key = "model.layers.0.mlp.up_proj.packed"
    _rewrite(good, bad, edit_tensors=lambda t: t.update({key: t[key].view(torch.int32)}))
    with pytest.raises(ValueError, match=r"up_proj\.packed.*dtype I32.*needs U32"):
        load(bad)

    norm_key = "model.layers.0.input_layernorm.weight"
    _rewrite(good, bad, edit_tensors=lambda t: t.update({norm_key: torch.ones(65)}))
    with pytest.raises(ValueError, match=r"input_layernorm\.weight.*\(65,\).*\(64,\)"):
        load(bad)

    # A model skeleton of another size.
    small = tiny_llama(seed=0, layers=2)
    small.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 80, bias=False)
    with pytest.raises(ValueError, match=r"up_proj.*\(96, 64\).*\(80, 64\)"):
        load(good, model=small)


def test_save_rejects_bad_paths(quantized_llama, tmp_path):
    # A folder is now the Hugging Face layout; a folder holding other files is never replaced.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files in it"):
        save(quantized_llama, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        save(quantized_llama, tmp_path / "no" / "such" / "m.safetensors")
    with pytest.raises(TypeError, match="model must be"):
        save("model", tmp_path / "m.safetensors")


def test_unquantized_model_round_trips(tmp_path):
    model = tiny_llama(seed=4, layers=1)
    path = tmp_path / "fp.safetensors"
    save(model, path)
    loaded = load(path)
    _assert_same_state(model, loaded)
    assert loaded.decoupleq_config is None


def _as_version_1(meta, tensors):
    """Rewrite a version-2 file as version 1 wrote it: int8 codes, no "codes" field."""
    from decoupleq.packing import unpack

    meta["format_version"] = 1
    meta.pop("checksums", None)
    for name, info in meta["layers"].items():
        storage = info.pop("codes")
        if storage != "int8":
            packed = tensors.pop(f"{name}.packed")
            tensors[f"{name}.codes"] = torch.from_numpy(unpack(packed.numpy(), info["bits"], info["in_features"]))


def test_version_1_file_with_int8_codes_still_loads(quantized_llama, tmp_path):
    good = tmp_path / "v2.safetensors"
    save(quantized_llama, good)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(good))
    _as_version_1(meta, tensors)
    assert tensors["model.layers.0.mlp.up_proj.codes"].dtype == torch.int8
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(meta)})
    loaded = load(old)
    _assert_same_state(quantized_llama, loaded)  # packed on load, bit for bit
    ids = token_batches(n=2, seq=16, seed=5)
    assert torch.equal(logits(loaded, ids), logits(quantized_llama, ids))

    # A version-1 code outside the 2-bit range is named, not silently wrapped.
    tensors["model.layers.1.mlp.down_proj.codes"][3, 5] = 7
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match=r"down_proj.*codes\[3, 5\] = 7"):
        load(old)


def test_high_bit_layers_keep_int8_codes_and_packed_file_is_small(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 96)
    x = torch.randn(64, 256)
    files = {}
    for bits in (2, 4, 6):
        model = torch.nn.Sequential(copy.deepcopy(layer))
        decoupleq.quantize(model, [x], QuantConfig(bits=bits, group_size=64, iterations=1, method="rtn"),
                           verbose=False)
        path = tmp_path / f"w{bits}.safetensors"
        save(model, path)
        files[bits] = os.path.getsize(path)
        stored = load_file(str(path))
        if bits <= 4:
            assert stored["0.packed"].dtype == torch.uint32 and "0.codes" not in stored
        else:
            assert stored["0.codes"].dtype == torch.int8 and "0.packed" not in stored
        back = load(path, model=torch.nn.Sequential(copy.deepcopy(layer)))
        _assert_same_state(model, back)
    # codes bytes: 96 * 256 * bits / 8 packed, one byte per code at 6 bits; scales, zeros and
    # bias are the same in every file, the JSON header differs by a few bytes ("int8" vs the format).
    # (safetensors pads its header to a multiple of 8 bytes, and the checksums differ by file.)
    assert abs(files[4] - files[2] - 96 * 256 * 2 // 8) <= 8
    assert abs(files[6] - files[2] - 96 * 256 * (8 - 2) // 8) <= 64
