"""Mixture-of-experts blocks: every expert quantized, each from the tokens routed to it.

Two forms of experts are found inside a model's blocks:

- **fused experts** (transformers 5: ``MixtralExperts``, ``Qwen2MoeExperts``,
  ``Qwen3MoeExperts``...): one module holding 3-D parameters ``gate_up_proj``
  ``[E, 2*I, H]`` and ``down_proj`` ``[E, H, I]``. Before quantizing, such a
  module is replaced by a ``RoutedExperts`` with the same forward and the same
  weights (views, no copy), whose expert ``e`` is a child module ``"e"`` with
  two ``nn.Linear`` layers, ``gate_up_proj`` (2I x H) and ``down_proj``
  (H x I). Those are quantized like any layer and become ``QuantLinear``:
  ``RoutedExperts`` is the quantized storage form of fused experts, and
  ``unfuse_for_layers`` rebuilds it when a saved model is loaded. A converted
  module none of whose layers is planned for quantization is put back as it
  was.
- **a list of expert MLPs** (transformers 4: ``block_sparse_moe.experts`` of
  ``MixtralBlockSparseTop2MLP`` with ``w1``/``w2``/``w3``, ``Qwen2MoeMLP``
  with ``gate_proj``/``up_proj``/``down_proj``): an ``nn.ModuleList`` named
  ``experts`` of at least two modules of one class; their ``nn.Linear``
  layers are quantized as they are.

Each expert layer's Hessian is accumulated by a hook on the layer, so it sees
exactly the tokens the router sent to that expert (an expert runs only on its
routed tokens). Within a block, the experts' layers are quantized in stages,
all experts at once: first every layer fed the expert's input (``gate_up_proj``,
or ``w1`` and ``w3``, which share one Hessian per expert), then every layer
after them (``down_proj``), so one pass over the calibration set serves a
stage of all experts.

**Too few tokens.** An expert layer whose own Hessian comes from fewer than
``ModelQuantConfig.expert_min_tokens`` tokens (64 by default; an expert the
router never chose has 0) falls back to the *pooled* Hessian of its stage:
the token-weighted mean ``sum_e n_e H_e / sum_e n_e`` over the same layer of
every expert of that MoE block (for the first stage, the Hessian of every
routed token of the block's input). The fallbacks are logged (one warning at
the end of ``quantize``) and recorded in ``LayerReport.hessian`` ("pooled N",
with the pool's token count) and in ``QuantReport.moe_fallbacks``. A fixed minimum rather than a multiple
of the input width: with a CPU-sized calibration set (32 x 256 tokens) a
real MoE model's experts see a few hundred to a few thousand tokens each, less
than their input width, and a rule tied to the width would pool nearly all
of them. If no expert of the stage saw a token, the layer is solved against the
identity (plain weight error) and reported "identity".

**Padding.** A calibration batch's ``attention_mask`` is applied to each
``RoutedExperts`` expert's routed rows, so padding tokens stay out of its
Hessian; a list of expert MLPs does not show its routing, and there every
routed token counts, padding included.

**Routers stay in full precision.** An ``nn.Linear`` direct child of an MoE
block with ``E`` or 1 outputs (the router of transformers 4's Mixtral, the
``shared_expert_gate`` of Qwen2-MoE) decides which experts run and how much
they count; it is small, so it is kept (listed in ``QuantReport.skipped``).
transformers 5's routers hold a bare ``weight`` parameter and are not layers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Flags transformers' ``use_experts_implementation`` sets; the value each must have for
# the layout RoutedExperts reproduces ([gate; up] concatenated, (out, in) matrices, no bias).
_LAYOUT_FLAGS = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                 "has_post_expert_norm": False}


# ---------------------------------------------------------------------------
# The quantizable form of fused experts
# ---------------------------------------------------------------------------


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate) * up)`` with ``[gate; up] = gate_up_proj(x)``.

    Layers: ``gate_up_proj`` (2*I x H), ``down_proj`` (H x I), ``nn.Linear``
    without bias, or their ``QuantLinear`` twins once quantized.
    """

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__()
        #: While the expert runs inside ``RoutedExperts``: the (n,) indices of its tokens among
        #: the block's flattened tokens, so calibration hooks can apply a padding mask.
        self.routed = None
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class RoutedExperts(nn.Module):
    """Fused experts as E child modules ``"0"`` ... ``"E-1"`` (``ExpertMLP``), same forward.

    ``forward(hidden_states (T, H), top_k_index (T, k) int, top_k_weights (T, k) float)``
    returns (T, H) in ``hidden_states``' dtype: for every token, the sum over its k
    chosen experts of ``weight * expert(token)``, each expert run once on the tokens
    routed to it (transformers' eager experts loop, which the fused module's other
    implementations match). An index equal to E (a token no local expert takes) is
    ignored, as there.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts = int(num_experts)
        self.hidden_dim = int(hidden)
        self.intermediate_dim = int(intermediate)
        for e in range(self.num_experts):
            self.add_module(str(e), ExpertMLP(hidden, intermediate, act_fn, device=device, dtype=dtype))

    def __getitem__(self, e: int) -> ExpertMLP:
        return self._modules[str(int(e))]

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            expert = self[e]
            expert.routed = tok
            try:
                y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            finally:
                expert.routed = None
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _fused_parts(module: nn.Module):
    """(E, H, I, act_fn) of a transformers fused-experts module this file can convert, else None."""
    gu = module._parameters.get("gate_up_proj") if hasattr(module, "_parameters") else None
    dp = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    if not (isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.ndim == 3 and dp.ndim == 3):
        return None
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(dp.shape) != (E, H, two_i // 2):
        return None
    # Nothing else with weights: RoutedExperts carries over these two tensors and act_fn only.
    act = getattr(module, "act_fn", None)
    if set(module._parameters) != {"gate_up_proj", "down_proj"} or not callable(act):
        return None
    if any(True for c in module.children() for _ in c.parameters()):
        return None
    if any(getattr(module, k, v) != v for k, v in _LAYOUT_FLAGS.items()):
        return None
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # a transformers without the default: nothing to compare with
            return None
        if gate is not _default_apply_gate:
            return None
    return E, H, two_i // 2, module.act_fn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module with the layout ``RoutedExperts`` reproduces."""
    return _fused_parts(module) is not None


def _looks_fused(module: nn.Module) -> bool:
    """3-D ``gate_up_proj`` / ``down_proj`` parameters, whatever the layout flags."""
    p = getattr(module, "_parameters", {})
    return any(isinstance(p.get(k), torch.Tensor) and p[k].ndim == 3 for k in ("gate_up_proj", "down_proj"))


def routed_from_fused(module: nn.Module) -> RoutedExperts:
    """A ``RoutedExperts`` whose weights are views of ``module``'s fused parameters (no copy).

    Works on the meta device too (a skeleton to load into)."""
    E, H, I, act = _fused_parts(module)
    gu, dp = module.gate_up_proj, module.down_proj
    new = RoutedExperts(E, H, I, act, device="meta", dtype=gu.dtype)
    for e in range(E):
        ex = new[e]
        ex.gate_up_proj.weight = nn.Parameter(gu.detach()[e], requires_grad=gu.requires_grad)
        ex.down_proj.weight = nn.Parameter(dp.detach()[e], requires_grad=dp.requires_grad)
    new.train(module.training)
    return new


def _fused_modules(root: nn.Module, prefix: str = ""):
    """[(dotted name, module)] of convertible fused-experts modules under ``root``."""
    found = []
    for name, m in root.named_modules():
        if name and is_fused_experts(m):
            found.append((f"{prefix}.{name}" if prefix else name, m))
        elif name and _looks_fused(m):
            log.warning("%s: a %s with fused expert parameters in a layout decoupleq does not convert "
                        "(transposed, biased, interleaved or custom gate): its experts stay in full precision",
                        f"{prefix}.{name}" if prefix else name, type(m).__name__)
    return found


# ---------------------------------------------------------------------------
# Before and after planning (pipeline hooks)
# ---------------------------------------------------------------------------


@dataclass
class Conversion:
    """The fused-experts modules replaced by ``RoutedExperts`` before planning."""

    done: list = field(default_factory=list)  # (full name, parent, attribute, original, new)


def convert_fused(journal, spec) -> Conversion:
    """Replace every convertible fused-experts module inside ``spec``'s blocks by a ``RoutedExperts``.

    The swaps go through ``journal`` so a failed ``quantize`` puts the originals back."""
    conv = Conversion()
    for i, block in enumerate(spec.blocks):
        for rel, m in _fused_modules(block):
            full = spec.full_name(i, rel)
            new = routed_from_fused(m)
            journal.swap(full, new)
            parent_name, _, child = full.rpartition(".")
            parent = journal.root.get_submodule(parent_name) if parent_name else journal.root
            conv.done.append((full, parent, child, m, new))
            log.debug("%s: %d fused experts split into per-expert layers", full, new.num_experts)
    return conv


def revert_unplanned(conv: Conversion, planned_names) -> None:
    """Put back the original fused module wherever no layer inside its replacement is planned."""
    planned = list(planned_names)
    for full, parent, child, original, new in conv.done:
        if not any(n.startswith(full + ".") for n in planned):
            setattr(parent, child, original)


def router_layers(block: nn.Module) -> list:
    """Relative names of the routing layers of a block's MoE modules (kept in full precision):
    ``nn.Linear`` direct children of a module holding experts, with E or 1 outputs."""
    names = []
    for name, m in block.named_modules():
        experts = getattr(m, "experts", None)
        if not isinstance(experts, nn.Module) or not _expert_list(experts):
            continue
        E = len(_expert_list(experts))
        for cname, c in m.named_children():
            if cname != "experts" and type(c) is nn.Linear and c.out_features in (E, 1):
                names.append(f"{name}.{cname}" if name else cname)
    return names


def _expert_list(m: nn.Module) -> list:
    """The experts of a container (RoutedExperts, or a ModuleList of >= 2 modules of one class)."""
    if isinstance(m, RoutedExperts):
        return [m[e] for e in range(m.num_experts)]
    if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
        return list(m)
    return []


# ---------------------------------------------------------------------------
# Inside a block: stages, shared keys, Hessians
# ---------------------------------------------------------------------------


def _containers(block: nn.Module) -> list:
    """[(relative name, experts list)] of the expert containers in a block."""
    out = []
    for name, m in block.named_modules():
        if isinstance(m, RoutedExperts) or (name.rpartition(".")[2] == "experts" and _expert_list(m)):
            ex = _expert_list(m)
            if ex:
                out.append((name, ex))
    return out


@dataclass
class BlockExperts:
    """The expert layers planned in one block and how they are quantized.

    Attributes:
        names: relative names of the planned expert layers.
        stages: per container, the lists of layer names (relative to an expert) of each stage.
        keys: {layer name: Hessian key}; layers of one expert in one stage share a key.
        pools: {layer name: pool id}; the pool is the same stage of every expert of its container.
        min_tokens: below this many own tokens a layer takes its pool's Hessian.
    """

    names: set
    stages: list
    keys: dict
    pools: dict
    min_tokens: int
    _groups: list = field(default_factory=list)
    experts: dict = field(default_factory=dict)  # layer name -> its ExpertMLP (RoutedExperts only)

    def token_mask(self, name: str, mask):
        """The calibration batch's (batch, seq) token mask restricted to the tokens routed to
        expert layer ``name``'s expert (the rows of its input), or None (no mask, or an expert
        list whose routing is not visible: every routed token then counts)."""
        expert = self.experts.get(name)
        if mask is None or expert is None or expert.routed is None:
            return None
        flat = mask.reshape(-1)
        if expert.routed.numel() and int(expert.routed.max()) >= flat.numel():
            return None  # not the block's tokens in the mask's order: count them all
        return flat[expert.routed.to(flat.device)]

    def other_order(self, order: list) -> list:
        return [n for n in order if n not in self.names]

    def arrange(self, groups: list, order: list, true_sequential: bool) -> list:
        """``groups`` (of the block's other layers) with the expert stages inserted where the
        first expert layer ran (at the end if none ran); one group in all without true-sequential."""
        if not true_sequential:
            return [[n for g in groups for n in g] + [n for g in self._groups for n in g]]
        first = next((k for k, n in enumerate(order) if n in self.names), None)
        if first is None:
            return groups + self._groups
        after = set(order[first:])
        at = next((k for k, g in enumerate(groups) if g and g[0] in after), len(groups))
        return groups[:at] + self._groups + groups[at:]

    def hessian(self, name: str, accs: dict, cache: dict, reduce=None):
        """(H, own tokens, where H came from: "own", "pooled N" or "identity") of expert layer ``name``.

        Args:
            accs: {Hessian key: HessianAccumulator} of the current group.
            cache: a dict kept over the group, {key: (H, tokens)} (each Hessian reduced once).
            reduce: ``acc -> (H, tokens)`` over every process (``Dist.hessian``; raises
                ValueError when no process saw a token); None: this process's accumulator.
                Every process makes the same calls in the same order, so collectives match.
        """
        def stats(key):
            if key not in cache:
                acc = accs.get(key)
                try:
                    cache[key] = reduce(acc) if reduce is not None else (acc.hessian(), int(acc.n_tokens))
                except ValueError:  # no token anywhere
                    cache[key] = (None, 0)
            return cache[key]

        H, n_own = stats(self.keys[name])
        if n_own >= self.min_tokens and H is not None:
            return H, n_own, "own"
        pool = self.pools[name]
        if ("pool", pool) not in cache:
            # Sorted, not a set's order: every process reduces the members in the same order.
            members = sorted({self.keys[n] for n, p in self.pools.items() if p == pool}, key=repr)
            total, Hp = 0, None
            for k in members:
                Hk, nk = stats(k)
                if Hk is None or nk == 0:
                    continue
                # Weighted by tokens: the pool is the mean outer product over every routed token.
                Hp = Hk * nk if Hp is None else Hp + Hk * nk
                total += nk
            cache[("pool", pool)] = (Hp / total, total) if Hp is not None else (None, 0)
        Hp, n_pool = cache[("pool", pool)]
        if Hp is None:
            return np.eye(accs[self.keys[name]].n_features), n_own, "identity"
        return Hp, n_own, f"pooled {n_pool}"


def block_experts(block: nn.Module, layers: dict, order: list, keys: dict, min_tokens: int):
    """The ``BlockExperts`` of a block's planned layers, or None when it has no expert layer.

    Args:
        block: the block.
        layers: {relative name: (module, config)} planned in the block.
        order, keys: what the block's discovery pass saw (execution order and input keys of
            the layers that ran on the first batch).
        min_tokens: ``ModelQuantConfig.expert_min_tokens``.
    """
    names, stages, ekeys, pools, groups, modules = set(), [], {}, {}, [], {}
    for cname, experts in _containers(block):
        prefix = f"{cname}." if cname else ""
        per_expert = []
        for e, ex in enumerate(experts):
            base = f"{prefix}{e}."
            rel = [n[len(base):] for n in layers if n.startswith(base)]
            per_expert.append(rel)
        if not any(per_expert):
            continue
        pattern = _stage_pattern(prefix, experts, per_expert, order, keys)
        stages.append((cname, pattern))
        for s, stage in enumerate(pattern):
            group = []
            for e, rel in enumerate(per_expert):
                for layer in stage:
                    if layer not in rel:
                        continue
                    full = f"{prefix}{e}.{layer}"
                    names.add(full)
                    group.append(full)
                    # One accumulator per (expert, stage): w1 and w3 see the same tokens.
                    ekeys[full] = ("expert", cname, e, s)
                    pools[full] = (cname, s, layer)
                    if isinstance(experts[e], ExpertMLP):
                        modules[full] = experts[e]
            if group:
                groups.append(group)
    if not names:
        return None
    # A pool per stage shared by all layers of the stage: key members by (container, stage).
    pools = {n: p[:2] for n, p in pools.items()}
    return BlockExperts(names, stages, ekeys, pools, int(min_tokens), groups, modules)


def _stage_pattern(prefix: str, experts: list, per_expert: list, order: list, keys: dict) -> list:
    """Stages of one expert's layers (names relative to the expert), e.g. [["gate_up_proj"], ["down_proj"]]
    or [["w1", "w3"], ["w2"]]: taken from the first expert that ran on the discovery batch (its layers
    in execution order, consecutive ones with the same input merged); if none ran, from definition
    order (a ``RoutedExperts``' order is its execution order)."""
    for e, rel in enumerate(per_expert):
        base = f"{prefix}{e}."
        ran = [n for n in order if n.startswith(base)]
        if ran and len(ran) == len(rel):
            pattern = []
            for n in ran:
                if pattern and keys[n] == keys[f"{base}{pattern[-1][-1]}"]:
                    pattern[-1].append(n[len(base):])
                else:
                    pattern.append([n[len(base):]])
            return pattern
    seen = []
    for rel in per_expert:
        for n in rel:
            if n not in seen:
                seen.append(n)
    return [[n] for n in seen]


# ---------------------------------------------------------------------------
# Loading: rebuild RoutedExperts where a file stored quantized expert layers
# ---------------------------------------------------------------------------


def unfuse_for_layers(model: nn.Module, layer_names):
    """Replace each fused-experts module of ``model`` that a stored layer name runs through
    (``...experts.3.down_proj`` under a fused ``...experts``) by its ``RoutedExperts``.

    Returns a function that puts the original modules back (for a load that fails later)."""
    names = list(layer_names)
    done = []
    for full, m in _fused_modules(model):
        if any(n.startswith(full + ".") for n in names):
            parent_name, _, child = full.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            done.append((parent, child, m))
            setattr(parent, child, routed_from_fused(m))

    def undo():
        for parent, child, original in reversed(done):
            setattr(parent, child, original)

    return undo


# ---------------------------------------------------------------------------
# Counting parameters
# ---------------------------------------------------------------------------


def parameter_counts(model: nn.Module) -> dict:
    """Weights quantized vs kept in floating point, overall and for experts.

    Returns:
        {"quantized": weights stored as codes (out * in of every quantized layer),
         "kept": elements of every other parameter (embeddings, norms, routers,
         quantized layers' bias; tied tensors once; scales and zeros not counted),
         "experts_quantized", "experts_kept": the same for expert weights}.
    """
    from .nn import QUANT_MODULES
    from .nn_bcq import BCQLinear

    kinds = QUANT_MODULES + (BCQLinear,)
    quantized = kept = ex_q = ex_k = 0
    owned, seen = set(), set()
    expert_ids = set()
    for _, m in model.named_modules():
        if isinstance(m, RoutedExperts) or _looks_fused(m):
            expert_ids.update(id(x) for x in m.modules())
        elif getattr(m, "experts", None) is not None and isinstance(m.experts, nn.Module) \
                and _expert_list(m.experts):
            expert_ids.update(id(x) for x in m.experts.modules())
    for _, m in model.named_modules():
        if isinstance(m, kinds):
            n = int(m.out_features) * int(m.in_features)
            quantized += n
            if id(m) in expert_ids:
                ex_q += n
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if t is not getattr(m, "bias", None):
                    owned.add(id(t))
    for _, m in model.named_modules():
        for t in m.parameters(recurse=False):
            if id(t) in owned or id(t) in seen:
                continue
            seen.add(id(t))
            kept += t.numel()
            if id(m) in expert_ids and t is not getattr(m, "bias", None):
                ex_k += t.numel()
    return {"quantized": quantized, "kept": kept, "experts_quantized": ex_q, "experts_kept": ex_k}


#: Tensors of a stored quantized layer that replace its weight (its bias is a kept parameter).
_LAYER_TENSORS = ("packed", "codes", "scale", "zero", "planes", "alpha", "offset")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_FUSED_NAME = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj|up_proj)$")


def file_parameter_counts(layers: dict, shapes: dict, dtypes: dict) -> dict:
    """``parameter_counts`` of a saved model, from its file's header alone.

    Args:
        layers: the file's quantized layer descriptions ({name: info with out_features, in_features}).
        shapes, dtypes: {tensor name: shape} and {tensor name: safetensors dtype} of the stored
            tensors (tied tensors are stored once).

    Returns:
        The same keys as ``parameter_counts``: "kept" counts the stored floating-point tensors
        other than the quantized layers' codes, scales and zeros (persistent float buffers
        included); expert weights are those under an ``experts`` module.
    """
    owned = {f"{name}.{t}" for name in layers for t in _LAYER_TENSORS}
    quantized = ex_q = 0
    for name, info in layers.items():
        n = int(info["out_features"]) * int(info["in_features"])
        quantized += n
        if _is_expert_name(name):
            ex_q += n
    kept = ex_k = 0
    for key, shape in shapes.items():
        if key in owned or dtypes.get(key) not in _FLOAT_DTYPES:
            continue
        n = int(np.prod(shape)) if shape else 1
        kept += n
        if (_is_expert_name(key) and not key.endswith(".bias")) or _FUSED_NAME.search(key):
            ex_k += n
    return {"quantized": quantized, "kept": kept, "experts_quantized": ex_q, "experts_kept": ex_k}


def _is_expert_name(name: str) -> bool:
    """A layer or tensor inside an expert: ``...experts.<index>.<layer>``."""
    return re.search(r"(^|\.)experts\.\d+\.", name) is not None


def describe_counts(c: dict) -> list:
    """Lines for a summary: weights quantized vs parameters kept, and the experts' share."""
    total = c["quantized"] + c["kept"]
    lines = [f"{c['quantized']:,} weights quantized ({100 * c['quantized'] / max(total, 1):.1f}% of "
             f"{total:,}), {c['kept']:,} parameters kept in floating point"]
    ex = c["experts_quantized"] + c["experts_kept"]
    if ex:
        lines.append(f"MoE experts: {c['experts_quantized']:,} of {ex:,} expert weights quantized "
                     f"({100 * c['experts_quantized'] / ex:.1f}%), {c['experts_kept']:,} kept")
    return lines
