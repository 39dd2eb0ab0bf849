"""Architecture adapters: where a model's blocks are and how a block's layers are grouped.

Known Hugging Face families (chosen by ``model.config.model_type``):

==============  =======================  ==============================================
family          blocks                   true-sequential groups (names inside a block)
==============  =======================  ==============================================
llama, qwen2,   ``model.layers``         [k, v, q], [o], [up, gate], [down]
mistral
gpt2            ``transformer.h``        [attn.c_attn], [attn.c_proj], [mlp.c_fc], [mlp.c_proj]
opt             ``model.decoder.layers`` [k, v, q], [out_proj], [fc1], [fc2]
gpt_neox        ``gpt_neox.layers``      [query_key_value], [dense], [dense_h_to_4h], [dense_4h_to_h]
bert, roberta   ``*.encoder.layer``      [query, key, value], [attention.output.dense],
                                         [intermediate.dense], [output.dense]
==============  =======================  ==============================================

(Paths are tried with and without the task head's prefix, so ``LlamaModel``
and ``LlamaForCausalLM`` both work.)

Any other ``nn.Module``: the blocks are the largest ``nn.ModuleList`` (by
parameter count) of at least two modules of one class that contain
quantizable layers; with none, the whole model is one block (a small CNN, for
example). Groups are then found by running the block once: layers in
execution order, consecutive layers fed the very same input tensor merged
into one group (which gives ``[q, k, v]`` for a typical attention).

Quantizable layers are ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d``
with ``groups == 1``; only layers inside blocks are quantized, so
embeddings and output heads stay in full precision.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from .nn import QUANT_MODULES, is_hf_conv1d

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchAdapter:
    """Where the blocks of one model family are and how their layers are grouped.

    Attributes:
        name: the family.
        model_types: ``config.model_type`` values it applies to.
        block_paths: dotted paths of the block list, tried in order; ``*``
            stands for any single attribute (``"*.encoder.layer"``).
        groups: true-sequential groups of layer names relative to a block.
    """

    name: str
    model_types: tuple
    block_paths: tuple
    groups: tuple


_LLAMA_GROUPS = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)

ADAPTERS = (
    ArchAdapter("llama", ("llama", "qwen2", "mistral"), ("model.layers", "layers"), _LLAMA_GROUPS),
    ArchAdapter(
        "gpt2",
        ("gpt2",),
        ("transformer.h", "h"),
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
    ArchAdapter(
        "opt",
        ("opt",),
        ("model.decoder.layers", "decoder.layers"),
        (
            ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    ArchAdapter(
        "gpt_neox",
        ("gpt_neox",),
        ("gpt_neox.layers", "layers"),
        (
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
    ArchAdapter(
        "bert",
        ("bert", "roberta"),
        ("*.encoder.layer", "encoder.layer"),
        (
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",),
            ("intermediate.dense",),
            ("output.dense",),
        ),
    ),
)


def get_adapter(model: nn.Module) -> ArchAdapter | None:
    """The adapter for ``model.config.model_type``, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    return None


def is_quantizable(module: nn.Module) -> bool:
    """Linear, HF Conv1D, or an ungrouped Conv2d (already quantized layers excluded)."""
    if isinstance(module, QUANT_MODULES):
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def quantizable_layers(module: nn.Module) -> dict:
    """``{relative dotted name: layer}`` of the quantizable layers inside ``module``."""
    return {name: m for name, m in module.named_modules() if name and is_quantizable(m)}


def _resolve(model: nn.Module, path: str):
    """Modules at a dotted path where ``*`` matches any one child; [(full_path, module)]."""
    found = [("", model)]
    for part in path.split("."):
        nxt = []
        for prefix, m in found:
            children = m.named_children() if part == "*" else [(part, getattr(m, part, None))]
            for name, child in children:
                if isinstance(child, nn.Module):
                    nxt.append((f"{prefix}.{name}" if prefix else name, child))
        found = nxt
    return found


@dataclass
class BlockSpec:
    """The blocks of a model.

    Attributes:
        prefix: dotted path of the block list in the model ("" when the whole
            model is one block); block i's layers are named ``prefix.i.<name>``.
        blocks: the block modules.
        adapter: the family adapter, or None.
        whole_model: True when the model itself is the single block.
        names: explicit dotted names of the blocks (blocks given as modules).
    """

    prefix: str
    blocks: list
    adapter: ArchAdapter | None = None
    whole_model: bool = False
    names: list | None = None

    def block_name(self, i: int) -> str:
        if self.whole_model:
            return ""
        if self.names is not None:
            return self.names[i]
        return f"{self.prefix}.{i}" if self.prefix else str(i)

    def full_name(self, i: int, layer: str) -> str:
        base = self.block_name(i)
        if not layer:  # the block is itself the layer
            return base
        return f"{base}.{layer}" if base else layer


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _auto_blocks(model: nn.Module):
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not any(quantizable_layers(c) for c in m):
            continue
        size = _n_params(m)
        if best is None or size > best[0]:
            best = (size, name, m)
    return best


def find_blocks(model: nn.Module, blocks=None) -> BlockSpec:
    """Locate the blocks to quantize.

    Args:
        model: the model.
        blocks: None (adapter, then automatic), a dotted path (``"model.layers"``),
            or an ``nn.ModuleList`` / list of modules that are submodules of ``model``.

    Raises:
        ValueError: a path that does not exist or modules not inside ``model``.
    """
    adapter = get_adapter(model)
    if blocks is not None:
        if isinstance(blocks, str):
            found = _resolve(model, blocks)
            if len(found) != 1:
                raise ValueError(f"blocks path {blocks!r} does not name exactly one module of the model")
            path, mod = found[0]
            if isinstance(mod, (nn.ModuleList, nn.Sequential)):
                if len(mod) == 0:
                    raise ValueError(f"blocks path {blocks!r} names an empty module list")
                return BlockSpec(path, list(mod), adapter)
            return BlockSpec("", [mod], adapter, names=[path])
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            blocks = [blocks]
        try:
            items = list(blocks)
        except TypeError:
            raise TypeError(
                f"blocks must be a dotted path, an nn.ModuleList or a list of modules, got {type(blocks).__name__}"
            ) from None
        if not items or not all(isinstance(b, nn.Module) for b in items):
            raise ValueError("blocks must be a non-empty list of nn.Module")
        names = {id(m): n for n, m in model.named_modules()}
        missing = [i for i, b in enumerate(items) if id(b) not in names]
        if missing:
            raise ValueError(f"blocks[{missing[0]}] is not a submodule of the model")
        if len(items) == 1 and items[0] is model:
            return BlockSpec("", items, adapter, whole_model=True)
        # Name each block by its own path so layer names are the model's names.
        return BlockSpec("", items, adapter, names=[names[id(b)] for b in items])
    if adapter is not None:
        for path in adapter.block_paths:
            found = _resolve(model, path)
            found = [(p, m) for p, m in found if isinstance(m, nn.ModuleList) and len(m) > 0]
            if len(found) == 1:
                return BlockSpec(found[0][0], list(found[0][1]), adapter)
        log.info("no %s block list at %s; finding blocks automatically", adapter.name, adapter.block_paths)
    best = _auto_blocks(model)
    if best is not None:
        return BlockSpec(best[1], list(best[2]), adapter)
    return BlockSpec("", [model], adapter, whole_model=True)


def adapter_groups(adapter: ArchAdapter | None, names) -> list | None:
    """The adapter's groups restricted to ``names`` (layers that will be quantized), or None.

    Returns None when the adapter has no groups or none of its names is present
    (a model that only looks like the family).
    """
    if adapter is None or not adapter.groups:
        return None
    present = set(names)
    groups = [[n for n in g if n in present] for g in adapter.groups]
    groups = [g for g in groups if g]
    if not groups:
        return None
    return groups
