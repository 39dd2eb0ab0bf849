"""Tiny mixture-of-experts models built from configs (random weights, no downloads)."""
from __future__ import annotations

import torch
from torch import nn

from _pipeline_models import _quiet_transformers, transformers


def tiny_mixtral(seed=0, layers=2, experts=4, top_k=2, init=0.02):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=0, eos_token_id=1,
        pad_token_id=None, tie_word_embeddings=False, initializer_range=init,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed=0, layers=2):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, decoder_sparse_step=1, mlp_only_layers=[],
        bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
    )
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def tiny_qwen3_moe(seed=0, layers=2):
    _quiet_transformers()
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, decoder_sparse_step=1, mlp_only_layers=[],
        bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def starve_last_expert(model, layer: int = 0) -> None:
    """Make the last expert of one Mixtral layer unreachable, whatever the tokens.

    Channel 63 of the residual stream is made a positive constant at that layer's MoE
    input (every embedding holds 0.5 there, about 7 after the norm, and no earlier
    layer writes to it), and the last expert's router row reads only that channel, with
    weight -10: a logit near -70 for every token. The other experts' rows ignore channel
    63 and are scaled up 50 times, so they are chosen by the varying channels with
    logits of a few units: top-k never picks the last expert and spreads the rest.
    """
    m = model.model
    with torch.no_grad():
        m.embed_tokens.weight[:, 63] = 0.5
        for i in range(layer + 1):
            m.layers[i].self_attn.o_proj.weight[63, :] = 0.0
            if i < layer:
                m.layers[i].mlp.experts.down_proj[:, 63, :] = 0.0
        w = m.layers[layer].mlp.gate.weight
        w[:, 63] = 0.0
        w[:-1] *= 50.0
        w[-1].zero_()
        w[-1, 63] = -10.0


class ListMoE(nn.Module):
    """transformers 4's MoE form: a router ``gate`` (nn.Linear, E outputs) and an ``experts``
    ``nn.ModuleList`` of SwiGLU MLPs with ``w1`` (gate), ``w3`` (up) and ``w2`` (down)."""

    class MLP(nn.Module):
        def __init__(self, h, i):
            super().__init__()
            self.w1 = nn.Linear(h, i, bias=False)
            self.w2 = nn.Linear(i, h, bias=False)
            self.w3 = nn.Linear(h, i, bias=False)

        def forward(self, x):
            return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

    def __init__(self, h, i, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(h, experts, bias=False)
        self.experts = nn.ModuleList(self.MLP(h, i) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(torch.softmax(self.gate(x), -1), self.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, pos, None])
        return out.reshape(shape)


class ListMoENet(nn.Module):
    """Embedding, two residual blocks of (norm, linear, norm, ListMoE), a head."""

    class Block(nn.Module):
        def __init__(self, h, i, experts, top_k):
            super().__init__()
            self.norm1 = nn.LayerNorm(h)
            self.proj = nn.Linear(h, h)
            self.norm2 = nn.LayerNorm(h)
            self.moe = ListMoE(h, i, experts, top_k)

        def forward(self, x):
            x = x + self.proj(self.norm1(x))
            return x + self.moe(self.norm2(x))

    def __init__(self, seed=0, vocab=96, h=64, i=64, experts=4, top_k=2):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(self.Block(h, i, experts, top_k) for _ in range(2))
        self.head = nn.Linear(h, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)
