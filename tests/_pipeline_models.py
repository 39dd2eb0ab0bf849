"""Tiny models built from a config (random weights, no downloads) for the pipeline tests."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")


@contextlib.contextmanager
def one_thread():
    """torch with one thread: the test machine's two cores are shared, and
    small ops with two OpenMP threads there are ~100x slower than with one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_llama(seed=0, layers=2, tie=False, dtype=torch.float32):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed=0, layers=2):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=layers, n_head=4,
        bos_token_id=0, eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0, layers=2):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )
    return transformers.BertModel(cfg).eval()


class TinyCNN(nn.Module):
    """Conv (3 -> 8, padding 1), conv (8 -> 16, stride 2, reflect padding), linear head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def token_batches(n=8, seq=24, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, seq), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out)
