"""Per-layer relative losses kept in saved models, and ``decoupleq info --plot`` drawing them.

A tiny Llama built from its config, quantized with GPTQ on random token ids; the report that
``quantize`` attaches is the reference for what the files store.
"""
import json
import math
import struct
import sys
import zlib

import pytest
import torch

import decoupleq
from decoupleq import cli
from decoupleq.io import read_metadata

transformers = pytest.importorskip("transformers")
from _pipeline_models import one_thread, tiny_llama  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _quantize(model, method="gptq", skip=()):
    ids = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(4))
    cfg = decoupleq.QuantConfig(bits=2, group_size=16, method=method)
    return decoupleq.quantize(model, ids, cfg, blockwise=False, verbose=False, skip=list(skip))


def _report_losses(model) -> dict:
    return {r.name: r.rel_loss for r in model.decoupleq_report.layers}


@pytest.fixture(scope="module")
def gptq_model():
    with one_thread():
        model = _quantize(tiny_llama(seed=2))
    return model, _report_losses(model)


def _png_size(path) -> tuple:
    """(width, height) of a PNG whose every chunk's CRC checks, IHDR first and IEND last."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        pos += 12 + length
    assert pos == len(data) and kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return width, height


def test_report_has_a_finite_loss_per_layer(gptq_model):
    model, want = gptq_model
    assert len(want) == 14  # 7 linear layers x 2 blocks
    assert all(math.isfinite(v) and 0 < v < 1 for v in want.values())
    assert model.decoupleq_layer_losses == want


def test_folder_stores_the_reports_losses_and_info_plots_them(gptq_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, want = gptq_model
    folder = tmp_path / "q"
    decoupleq.save(model, folder)
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["layer_losses"] == want  # float for float: JSON keeps every bit
    assert q["method"] == "gptq"
    png = tmp_path / "losses.png"
    assert cli.main(["info", str(folder), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "relative loss of 14 layers" in out and f"plot:      {png}" in out
    assert _png_size(png) == (960, 540)  # 8 x 4.5 inches at 120 dpi
    # Drawn in the model's layer order, not config.json's sorted one.
    from decoupleq.hf_folder import folder_layers

    assert list(folder_layers(folder)[1])[:3] == [f"model.layers.0.self_attn.{k}_proj" for k in "qkv"]

    # Loaded back (decoupleq.load and from_pretrained), the model carries the same figures,
    # and a second save keeps them.
    assert decoupleq.load(folder).decoupleq_layer_losses == want
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.decoupleq_layer_losses == want
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["layer_losses"] == want


def test_single_file_stores_the_losses_and_info_plots_them(gptq_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, want = gptq_model
    path = tmp_path / "m.safetensors"
    decoupleq.save(model, path)
    assert read_metadata(path)["layer_losses"] == want
    assert decoupleq.load(path).decoupleq_layer_losses == want
    png = tmp_path / "file.png"
    assert cli.main(["info", str(path), "--plot", str(png)]) == 0
    assert "relative loss of 14 layers" in capsys.readouterr().out
    assert _png_size(png) == (960, 540)


def test_the_checksums_cover_the_stored_losses(gptq_model, tmp_path, capsys):
    model, want = gptq_model
    folder = tmp_path / "q"
    decoupleq.save(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    name = sorted(want)[3]
    cfg["quantization_config"]["layer_losses"][name] *= 0.5  # a flattering edit
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(ValueError, match="does not match the checksum"):
        decoupleq.load(folder)
    png = tmp_path / "x.png"
    assert cli.main(["info", str(folder), "--plot", str(png)]) == 2
    assert "does not match the checksum" in capsys.readouterr().err and not png.exists()


def test_losses_merge_over_quantize_calls(tmp_path):
    model = tiny_llama(seed=5)
    _quantize(model, skip=["*.mlp.*"])
    first = _report_losses(model)
    _quantize(model)  # the MLP layers that are still float
    second = _report_losses(model)
    assert len(first) == 8 and len(second) == 6 and not set(first) & set(second)
    assert model.decoupleq_layer_losses == {**first, **second}
    decoupleq.save(model, tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layer_losses"]
    assert stored == {**first, **second}


def test_data_free_rtn_stores_nulls_and_plot_says_why(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = _quantize(tiny_llama(seed=6), method="rtn")
    assert all(math.isnan(v) for v in _report_losses(model).values())
    folder = tmp_path / "q"
    decoupleq.save(model, folder)
    stored = json.loads((folder / "config.json").read_text())["quantization_config"]["layer_losses"]
    assert set(stored) == set(_report_losses(model)) and set(stored.values()) == {None}
    loaded = decoupleq.load(folder).decoupleq_layer_losses
    assert set(loaded) == set(stored) and all(math.isnan(v) for v in loaded.values())
    png = tmp_path / "x.png"
    assert cli.main(["info", str(folder), "--plot", str(png)]) == 2
    assert "data-free RTN" in capsys.readouterr().err and not png.exists()


def test_folders_and_files_without_losses_still_load(gptq_model, tmp_path, capsys):
    """What an earlier decoupleq wrote: no layer_losses key at all."""
    model, _ = gptq_model
    bare = transformers.AutoModelForCausalLM.from_pretrained(_saved(model, tmp_path / "src"))
    del bare.decoupleq_layer_losses  # a model quantized before figures were kept
    folder = tmp_path / "old"
    decoupleq.save(bare, folder)
    assert "layer_losses" not in json.loads((folder / "config.json").read_text())["quantization_config"]
    assert not hasattr(decoupleq.load(folder), "decoupleq_layer_losses")
    png = tmp_path / "x.png"
    assert cli.main(["info", str(folder), "--plot", str(png)]) == 2
    assert "stores no per-layer losses" in capsys.readouterr().err and not png.exists()
    assert cli.main(["info", str(folder)]) == 0
    assert "losses:    none stored" in capsys.readouterr().out

    path = tmp_path / "old.safetensors"
    decoupleq.save(bare, path)
    assert "layer_losses" not in read_metadata(path)
    assert not hasattr(decoupleq.load(path), "decoupleq_layer_losses")


def _saved(model, folder):
    decoupleq.save(model, folder)
    return folder


def test_plot_argument_is_checked_before_any_work(gptq_model, tmp_path, capsys, monkeypatch):
    model, _ = gptq_model
    folder = _saved(model, tmp_path / "q")
    assert cli.main(["info", str(folder), "--plot", str(tmp_path / "no-such-dir" / "x.png")]) == 2
    err = capsys.readouterr()
    assert "--plot" in err.err and "does not exist" in err.err and err.out == ""
    assert cli.main(["info", str(folder), "--plot", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # Without matplotlib (the 'notebook' extra): a clear error naming --plot, before anything is printed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["info", str(folder), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr()
    assert "--plot needs matplotlib" in err.err and err.out == ""


@pytest.mark.parametrize("losses,match", [
    ({"model.layers.0.mlp.up_proj": "0.1"}, "must be a finite number or null"),
    ({"model.layers.0.mlp.up_proj": True}, "must be a finite number or null"),
    ({"model.layers.0.mlp.up_proj": float("inf")}, "must be a finite number or null"),
    ({"model.layers.0.mlp.up_proj": 10 ** 400}, "must be a finite number or null"),
    ({"lm_head": 0.1}, "names layers that are not quantized"),
    ([0.1], "must be an object"),
])
def test_bad_stored_losses_are_refused_by_name(losses, match):
    from decoupleq.hf_config import DecoupleQConfig

    with pytest.raises(ValueError, match=f"quantization_config: 'layer_losses'.*{match}"):
        DecoupleQConfig(layers={"model.layers.0.mlp.up_proj": {}}, layer_losses=losses)


def test_a_format_2_file_has_no_losses_to_draw(tmp_path, capsys):
    import os

    old = os.path.join(os.path.dirname(__file__), "data", "tiny_llama_v2.safetensors")
    assert cli.main(["info", old]) == 0
    assert "losses:    none stored" in capsys.readouterr().out
    png = tmp_path / "x.png"
    assert cli.main(["info", old, "--plot", str(png)]) == 2
    assert "stores no per-layer losses" in capsys.readouterr().err and not png.exists()
