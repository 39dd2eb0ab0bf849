"""transformers integration: save_pretrained -> from_pretrained of decoupleq models.

Tiny models built from configs (random weights); the quantized model's own
logits are the reference, and the reloaded model must give them bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import decoupleq
from decoupleq.nn import QuantLinear
from decoupleq.nn_bcq import BCQLinear

transformers = pytest.importorskip("transformers")
from _pipeline_models import one_thread, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402
from zoo_helpers import read, train_tokenizer  # noqa: E402


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {
    "llama_tied": (lambda: tiny_llama(seed=1, tie=True), transformers.AutoModelForCausalLM, 32),
    "qwen2": (tiny_qwen2, transformers.AutoModelForCausalLM, 32),
    "gpt2": (tiny_gpt2, transformers.AutoModelForCausalLM, 16),   # Conv1D layers
    "bert": (tiny_bert, transformers.AutoModel, 16),               # an encoder: AutoModel
}


def _rtn(model, group_size, bits=2, **kw):
    ids = torch.randint(2, 96, (2, 16))
    cfg = decoupleq.QuantConfig(bits=bits, group_size=group_size, method="rtn")
    return decoupleq.quantize(model, ids, cfg, blockwise=False, verbose=False, **kw)


def _out(model, x):
    with torch.no_grad():
        return model(x)[0]


def _quantized_names(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, BCQLinear))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_from_pretrained_is_bit_identical(name, tmp_path):
    make, auto, gs = MODELS[name]
    with one_thread():
        model = _rtn(make(), gs)
        x = torch.randint(2, 96, (2, 12))
        want = _out(model, x)
        model.save_pretrained(tmp_path)
        cfg = json.loads((tmp_path / "config.json").read_text())
        q = cfg["quantization_config"]
        assert q["quant_method"] == "decoupleq" and q["bits"] == 2 and q["group_size"] == gs
        assert set(q["layers"]) == set(_quantized_names(model))
        loaded = auto.from_pretrained(tmp_path)
        assert _quantized_names(loaded) == _quantized_names(model)
        assert not any(t.is_meta for t in loaded.state_dict().values())
        assert torch.equal(_out(loaded, x), want)
        assert loaded.is_quantized and loaded.decoupleq_config == model.decoupleq_config
        # Saved again as loaded, it is the same folder content.
        loaded.save_pretrained(tmp_path / "again")
        assert torch.equal(_out(auto.from_pretrained(tmp_path / "again"), x), want)


def _mixed_model():
    """2-bit layers by default, down_proj at 4 and 6 bits (packed / int8 codes), one BCQ layer."""
    from decoupleq.bcq import bcq_from_uniform

    model = tiny_llama(seed=3)
    _rtn(model, 32, skip=["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"])
    layers = model.model.layers
    ids = torch.randint(2, 96, (2, 16))
    decoupleq.quantize(model, ids, decoupleq.QuantConfig(bits=4, group_size=-1, method="rtn"), blockwise=False,
                       verbose=False, skip=["model.layers.1.mlp.down_proj"])
    decoupleq.quantize(model, ids, decoupleq.QuantConfig(bits=6, group_size=16, method="rtn"), blockwise=False,
                       verbose=False)
    # One uniform layer rewritten as a BCQ layer (exact to float32 rounding).
    q = layers[1].self_attn.o_proj
    w = bcq_from_uniform(q.codes.numpy(), q.scale.detach().numpy(), q.zero.detach().numpy(), q.bits, q.group_size)
    layers[1].self_attn.o_proj = BCQLinear.from_bcq(torch.nn.Linear(q.in_features, q.out_features, bias=False), w)
    return model


def test_per_layer_overrides_and_bcq_layers_round_trip(tmp_path):
    with one_thread():
        model = _mixed_model()
        x = torch.randint(2, 96, (1, 10))
        want = _out(model, x)
        model.save_pretrained(tmp_path)
        layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
        assert layers["model.layers.0.mlp.down_proj"] == {"bits": 4, "group_size": -1}
        assert layers["model.layers.1.mlp.down_proj"] == {"bits": 6, "group_size": 16}
        assert layers["model.layers.1.self_attn.o_proj"]["type"] == "bcq_linear"
        assert layers["model.layers.0.self_attn.q_proj"] == {}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert isinstance(loaded.model.layers[1].self_attn.o_proj, BCQLinear)
        assert loaded.model.layers[1].mlp.down_proj.bits == 6
        assert not loaded.model.layers[1].mlp.down_proj.is_packed
        assert torch.equal(_out(loaded, x), want)


def test_automodel_of_a_causal_lm_folder_is_its_base_model(tmp_path):
    with one_thread():
        model = _rtn(tiny_llama(seed=5), 32)
        x = torch.randint(2, 96, (1, 8))
        with torch.no_grad():
            want = model.model(x).last_hidden_state
        model.save_pretrained(tmp_path)
        base = transformers.AutoModel.from_pretrained(tmp_path)
        assert type(base).__name__ == "LlamaModel"
        assert isinstance(base.layers[0].self_attn.q_proj, QuantLinear)
        assert torch.equal(_out(base, x), want)


def _llama_with_tokenizer(seed, **config):
    """(tiny float Llama, its tokenizer trained on real text): 2 blocks of width 64, the
    tokenizer's BOS and EOS ids in the config."""
    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=40_000), vocab_size=280)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, **config)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    with one_thread():
        model, tok = _llama_with_tokenizer(7, tie_word_embeddings=False)
        ids = torch.randint(0, len(tok), (2, 16))
        decoupleq.quantize(model, ids, decoupleq.QuantConfig(bits=2, group_size=32, method="rtn"),
                           blockwise=False, verbose=False)
    path = tmp_path_factory.mktemp("tiny-q") / "folder"
    decoupleq.save(model, path, tokenizer=tok)
    return model, tok, path


def test_generate_and_pipeline_from_the_folder(llama_with_tokenizer):
    model, tok, path = llama_with_tokenizer
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    with one_thread():
        ids = tok("The tower is", return_tensors="pt").input_ids
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), want)
        pipe = transformers.pipeline("text-generation", model=str(path))
        assert isinstance(pipe.model.model.layers[0].mlp.up_proj, QuantLinear)
        text = pipe("The tower is", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(want[0], skip_special_tokens=True)


def test_decoupleq_save_and_load_write_and_read_the_same_sharded_folder(llama_with_tokenizer, tmp_path):
    model, tok, _ = llama_with_tokenizer
    x = torch.randint(0, len(tok), (1, 9))
    with one_thread():
        want = _out(model, x)
        decoupleq.save(model, tmp_path / "sharded", tokenizer=tok, max_shard_size="60KB")
        names = set(os.listdir(tmp_path / "sharded"))
        assert "model.safetensors.index.json" in names
        assert sum(n.endswith(".safetensors") for n in names) > 1
        assert torch.equal(_out(decoupleq.load(tmp_path / "sharded"), x), want)
        assert torch.equal(_out(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded"), x), want)
        # Replaced whole by a second save; no temporary folder is left beside it.
        decoupleq.save(model, tmp_path / "sharded")
        assert sorted(os.listdir(tmp_path)) == ["sharded"]
        assert "model.safetensors.index.json" not in os.listdir(tmp_path / "sharded")
    # The single-file format is still written for a .safetensors name, and still loads.
    decoupleq.save(model, tmp_path / "one.safetensors")
    with one_thread():
        assert torch.equal(_out(decoupleq.load(tmp_path / "one.safetensors"), x), want)


# ---------------------------------------------------------------------------
# A folder that does not hold what its config says never loads random layers.
# ---------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path):
    with one_thread():
        model = _rtn(tiny_llama(seed=2), 32)
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = str(folder / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=meta)


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def _misshape_q_scale(t):
    key = "model.layers.0.self_attn.q_proj.scale"
    t[key] = t[key][:, :1].clone()


def _edit_k_zero(t):
    t["model.layers.0.self_attn.k_proj.zero"][0, 0] += 1.0


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.packed"), r"model\.layers\.1\.mlp\.up_proj\.packed.*missing"),
    (_misshape_q_scale, r"q_proj\.scale.*shape"),
    (lambda t: t.pop("model.norm.weight"), r"missing \['model\.norm\.weight'\]"),
    (_edit_k_zero, r"k_proj\.zero.*checksum"),  # the bytes fail their checksum
], ids=["missing_quantized_tensor", "misshaped_quantized_tensor", "missing_float_tensor", "edited_tensor_bytes"])
def test_a_damaged_shard_is_refused(folder, edit, match):
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=match):
        _load(folder)


def test_edited_config_fails(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.gate_proj"] = {"bits": 3}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config does not match the checksum"):
        _load(folder)
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.gate_proj"] = {}
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.nothing_here"] = {}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="nothing_here.*not a module"):
        _load(folder)
    del cfg["quantization_config"]["layers"]["model.layers.0.mlp.nothing_here"]
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.gate_proj"] = {"run": "os.system"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown keys"):
        _load(folder)


def test_shards_not_written_by_decoupleq_are_refused(folder):
    from safetensors.torch import load_file, save_file

    path = str(folder / "model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not written by decoupleq"):
        _load(folder)


def test_a_float_model_is_not_quantized_while_loading(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=decoupleq_config())


def decoupleq_config():
    from decoupleq.hf_config import DecoupleQConfig

    return DecoupleQConfig(bits=2, group_size=32)


def test_decoupleq_load_checks_the_folder_config_first(folder):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, match in (("auto_map", {"AutoModelForCausalLM": "evil.Model"}, "selects code"),
                              ("architectures", ["os.system"], "not one of transformers' model classes"),
                              ("vocab_size", 2**33, "exceeds every tensor dimension")):
        edited = dict(cfg, **{key: value})
        (folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match):
            decoupleq.load(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="not a decoupleq folder"):
        decoupleq.load(folder)


def test_a_shard_index_naming_files_outside_the_folder_is_refused(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="not a safetensors file in the folder"):
        decoupleq.load(folder)


def test_bfloat16_load_keeps_float32_scales(folder):
    with one_thread():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        q = model.model.layers[0].self_attn.q_proj
        assert q.scale.dtype == torch.float32 and q.zero.dtype == torch.float32
        assert model.model.norm.weight.dtype == torch.bfloat16
        out = _out(model, torch.randint(2, 96, (1, 6)))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())


def test_cli_output_is_a_hugging_face_folder(tmp_path, capsys):
    from decoupleq import cli
    from zoo_helpers import text_slice

    with one_thread():
        model, tok = _llama_with_tokenizer(11)
        model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    text = text_slice("wikitext-2/valid.txt", tmp_path / "valid.txt")
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tmp_path / "fp"), "--method", "rtn", "--group-size", "32", "--calib", str(text),
                     "--num-samples", "2", "--seq-len", "16", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "decoupleq"
    with one_thread():
        model, _, _ = cli.load_quantized(out)
        x = torch.randint(0, len(tok), (1, 8))
        assert torch.equal(_out(transformers.AutoModelForCausalLM.from_pretrained(out), x), _out(model, x))
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Hugging Face layout" in printed and "14 quantized" in printed


def test_without_decoupleq_transformers_refuses_the_folder_instead_of_loading_random_layers(folder):
    code = (
        "import sys, transformers\n"
        "try:\n"
        "    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "except RuntimeError as exc:\n"
        "    assert 'mismatch' in str(exc), exc\n"
        "    print('refused')\n"
        "else:\n"
        "    raise SystemExit('loaded without decoupleq')\n"
        "import decoupleq\n"  # transformers already imported: registered at once
        "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(type(model.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["refused", "QuantLinear"]


def test_import_registers_without_importing_transformers_early():
    code = (
        "import sys, decoupleq\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['decoupleq'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['decoupleq'].__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["DecoupleQHfQuantizer", "DecoupleQConfig"]


@pytest.mark.slow
def test_smollm2_w2g64_round_trip(tmp_path):
    from decoupleq.zoo import load_model

    lm = load_model("smollm2-135m")
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    decoupleq.quantize(lm.model, ids, decoupleq.QuantConfig(bits=2, group_size=64, method="rtn"),
                       blockwise=False, verbose=False)
    want = _out(lm.model, ids)
    decoupleq.save(lm.model, tmp_path / "q", tokenizer=lm.tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 30 * 7
    assert torch.equal(_out(loaded, ids), want)
    gen = transformers.pipeline("text-generation", model=str(tmp_path / "q"))
    assert gen("The capital of France is", max_new_tokens=3, do_sample=False)[0]["generated_text"]
