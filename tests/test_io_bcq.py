"""save / load of BCQ layers (format version 3), older files still loading,
and ``decoupleq info`` on a model with BCQ layers."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from decoupleq import cli
from decoupleq.bcq import BCQWeight, bcq_from_uniform, bits_per_weight
from decoupleq.io import FORMAT_VERSION, METADATA_KEY, load, read_metadata, save
from decoupleq.nn import QuantLinear
from decoupleq.nn_bcq import BCQLinear

from _pipeline_models import logits, one_thread, tiny_llama, token_batches

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _swap(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def bcq_llama():
    """A tiny Llama whose attention projections of block 0 are BCQ (2 and 3 bits, grouped and
    per channel) and whose MLP down projection is a uniform RTN code written as BCQ."""
    model = tiny_llama(seed=21, layers=1)
    rng = np.random.default_rng(0)
    for name, bits, gs in [("model.layers.0.self_attn.q_proj", 2, 16), ("model.layers.0.self_attn.k_proj", 3, -1)]:
        lin = model.get_submodule(name)
        m, n = lin.weight.shape
        G = 1 if gs == -1 else n // gs
        w = BCQWeight(rng.integers(0, 1 << bits, (m, n)).astype(np.uint8),
                      (rng.random((m, G, bits)) * 0.05).astype(np.float32),
                      (rng.standard_normal((m, G)) * 0.01).astype(np.float32), bits, gs)
        _swap(model, name, BCQLinear.from_bcq(lin, w, method="test"))
    lin = model.get_submodule("model.layers.0.mlp.down_proj")
    W = lin.weight.detach().numpy()
    s = ((W.max(1) - W.min(1)) / 3).astype(np.float32)[:, None]
    z = W.min(1)[:, None] + 2 * s
    q = np.clip(np.round((W - z) / s), -2, 1).astype(np.int8)
    _swap(model, "model.layers.0.mlp.down_proj",
          BCQLinear.from_bcq(lin, bcq_from_uniform(q, s, z, 2, -1), method="rtn"))
    return model


def test_bcq_model_round_trip_is_bit_exact(tmp_path):
    model = bcq_llama()
    path = tmp_path / "bcq.safetensors"
    save(model, path)
    meta = read_metadata(str(path))
    assert meta["format_version"] == FORMAT_VERSION == 3
    info = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert info["type"] == "bcq_linear" and info["codes"] == "decoupleq-bcq-lanes8-v1" and info["bits"] == 2
    names = set(load_file(str(path)))
    assert {"model.layers.0.self_attn.q_proj.planes", "model.layers.0.self_attn.q_proj.alpha",
            "model.layers.0.self_attn.q_proj.offset"} <= names
    loaded = load(path)  # rebuilt from the stored config
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        assert isinstance(loaded.get_submodule(name), BCQLinear)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = token_batches(n=2, seq=16, seed=5)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # into a full-precision model of the same architecture, in place
    fresh = tiny_llama(seed=99, layers=1)
    load(path, model=fresh)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_version_2_file_written_before_bcq_still_loads():
    path = os.path.join(DATA, "tiny_llama_v2.safetensors")
    assert read_metadata(path)["format_version"] == 2
    model = load(path)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    want = np.load(os.path.join(DATA, "tiny_llama_v2_logits.npy"))
    got = logits(model, token_batches(n=1, seq=8, seed=5)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bcq_layer_in_a_version_2_file_is_refused(tmp_path):
    model = bcq_llama()
    path = tmp_path / "m.safetensors"
    save(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["format_version"] = 2
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="BCQ layers need format_version >= 3"):
        load(bad)


def test_bcq_tensor_shape_mismatch_is_named(tmp_path):
    model = bcq_llama()
    path = tmp_path / "m.safetensors"
    save(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.alpha"
    tensors[key] = tensors[key][:, :, :1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=raw)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load(bad)


def test_info_shows_bcq_layers_and_their_true_bits(tmp_path, capsys):
    model = bcq_llama()
    save(model, tmp_path / "model.safetensors")
    assert cli.main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("bcq"))
    assert "3 layers" in line and "bits [2, 3]" in line
    # weighted by each layer's weight count, from the layouts (not from the code under test's output)
    sizes = [(64 * 64, bits_per_weight(2, 64, 16)), (32 * 64, bits_per_weight(3, 64, -1)),
             (64 * 96, bits_per_weight(2, 96, -1))]
    want = sum(w * b for w, b in sizes) / sum(w for w, _ in sizes)
    assert f"{want:.3f} bits per weight" in line
    # q_proj 64x64 at 2 bits, g16: 8 words per row (64 cols = 8 steps, 16 per block) + 4 groups x 3 floats
    assert bits_per_weight(2, 64, 16) == (32 * 8 + 32 * 4 * 3) / 64


def test_packed_mb_counts_bcq_layers_by_their_words_and_16_bit_alpha_offset():
    from decoupleq.bcq import row_words
    from decoupleq.cli import packed_mb

    model = bcq_llama()
    want = 0.0
    bcq_tensors = set()
    for m in model.modules():
        if isinstance(m, BCQLinear):
            G = m.n_groups
            want += m.out_features * (4 * row_words(m.bits, m.in_features) + 2 * G * (m.bits + 1))
            bcq_tensors |= {id(m.planes), id(m.alpha), id(m.offset)}
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in bcq_tensors or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        want += t.numel() * t.element_size()
    assert packed_mb(model) == pytest.approx(want / 1e6, rel=1e-12)
