"""Tiny GGUF files written with the ``gguf`` package from a model built from a config.

Gemma 3 is used because it is outside ``zoo``'s own GGUF table, so it goes through
transformers' GGUF loader, like Gemma 3 270M itself. Its tokenizer is stored as a byte-level
BPE vocabulary ("gpt2" tokenizer model) with merges, taken from a tokenizer trained on real text.
"""
import json

import numpy as np


def tiny_gemma3(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random Gemma3ForCausalLM (text only) small enough for a unit test."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=1024, sliding_window=16)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma initialises its norms at 0 (scale 1 + w): make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    return model


def write_gemma3_gguf(path, model, tokenizer, add_bos: bool = True) -> None:
    """Write ``model`` (a Gemma3ForCausalLM) and its byte-level BPE ``tokenizer`` as a float32 GGUF.

    Tensor names come from gguf's own Gemma 3 name table; RMSNorm weights are stored as
    ``1 + w``, as llama.cpp's converter stores Gemma norms.
    """
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(add_bos)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        data = tensor.detach().float().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        w.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
