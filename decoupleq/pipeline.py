"""Quantize a PyTorch / Hugging Face model block by block: ``quantize(model, calibration, config)``.

For each block, in order (ALGORITHM 4.2):

1. The block's inputs for every calibration batch are cached (CPU RAM within
   ``cache_budget_mb``, memory-mapped temporary files past it). For block 0
   they come from running the model up to it; for block i > 0 they are the
   outputs of the already quantized block i - 1 (the quantized path).
2. Its quantizable layers (Linear, HF Conv1D, Conv2d) are split into
   true-sequential groups. For each group, the block in its current, partly
   quantized state runs on every cached input while hooks accumulate each
   layer's Hessian ``H = mean(x x^T)`` over tokens; then each layer is solved
   (``decoupleq.quantize_weight``) and swapped for a ``QuantLinear`` /
   ``QuantConv2d``. Layers of a group fed the very same input share one
   Hessian; a pass that does not need the block's output stops after the
   group's last layer has run.
3. With block-wise tuning on, the full-precision block's outputs on the same
   inputs (recorded during the first group's pass, before any layer of the
   block changed) are the targets for tuning the float parts (ALGORITHM 4.3).
   With ``BlockTuneConfig(target="fp_inputs")`` the targets are instead the
   full-precision model's own activations: a second cache carries the
   full-precision path from block to block, and each block is fitted to the
   full-precision block's outputs on it.
4. The quantized block runs once more on the cached inputs; its outputs
   overwrite them and become the next block's inputs.

Peak memory is the model plus one block's activations for the calibration
set (twice that with block-wise tuning, three times with the "fp_inputs"
target), plus one layer's Hessian.

RTN with block-wise tuning off needs no data: every layer is rounded from its
own weights, no calibration batch is run, and the report's per-layer losses
are NaN (there is no Hessian to weigh them by).

CPU-friendly defaults (``ModelQuantConfig``): true-sequential on, block-wise
tuning on for 1 epoch at lr 2e-4, a 4 GiB activation budget, one calibration
row per forward. The calibration set itself is the caller's choice; 32
windows of 256 tokens is a good start on a CPU (``decoupleq.data``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import moe
from .blockwise import BlockTuneResult, tune_block
from .capture import (
    ActivationCache,
    MemoryBudget,
    _StopForward,
    catch_block_inputs,
    input_key,
    layer_in_features,
    layer_tokens,
    layer_weight_matrix,
    run_block,
)
from .config import BlockTuneConfig, ModelQuantConfig, QuantConfig
from . import resume as resume_mod
from .distributed import _SINGLE
from .distributed import PeerFailure
from .distributed import current as current_dist
from .models import BlockSpec, adapter_groups, find_blocks, is_quantizable, quantizable_layers
from .nn import QuantConv2d, QuantLinear
from . import _hf_hook, layer_losses
from .rollback import Journal
from .solver import quantize_weight

# Errors that come out of a collective: the other ranks already know (or are gone).
_COLLECTIVE_ERRORS = (PeerFailure,) + ((torch.distributed.DistError,) if hasattr(torch.distributed, "DistError")
                                       else ())

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        name: full dotted module name.
        shape: (out, in_flat) of the quantized matrix.
        group_size: the group size used (-1 per-channel).
        loss: sum of the per-row errors ``(w^ - w) H00 (w^ - w)^T`` (NaN for data-free RTN).
        rel_loss: ``loss / sum_r w_r H00 w_r^T`` (0 = exact, 1 = as bad as zero weights; NaN
            for data-free RTN).
        n_tokens: tokens the Hessian was built from (0 for data-free RTN); for an MoE
            expert's layer, the tokens routed to that expert.
        seconds: solver wall time.
        hessian: where the Hessian came from: "own", or for an MoE expert that saw too
            few tokens "pooled N" (its block's experts' pooled Hessian, N tokens) or
            "identity" (``decoupleq.moe``); "none" for data-free RTN.
    """

    name: str
    shape: tuple
    group_size: int
    loss: float
    rel_loss: float
    n_tokens: int
    seconds: float
    hessian: str = "own"


@dataclass
class BlockReport:
    """One block: its true-sequential groups (layer names inside the block), time, tuning outcome."""

    index: int
    name: str
    seconds: float
    groups: list = field(default_factory=list)
    tune: BlockTuneResult | None = None


@dataclass
class QuantReport:
    """What ``quantize`` did; attached to the model as ``model.decoupleq_report``.

    ``params``: weights quantized vs kept in floating point (``decoupleq.moe.parameter_counts``:
    keys quantized, kept, experts_quantized, experts_kept). ``moe_fallbacks``: the MoE expert
    layers whose own routed tokens were too few, as (name, own tokens, Hessian used).
    """

    layers: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    moe_fallbacks: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def _model_config(config, overrides: dict) -> ModelQuantConfig:
    if config is None:
        mcfg = ModelQuantConfig()
    elif isinstance(config, QuantConfig):
        mcfg = ModelQuantConfig(quant=config)
    elif isinstance(config, ModelQuantConfig):
        mcfg = config
    else:
        raise TypeError(f"config must be a QuantConfig or ModelQuantConfig, got {type(config).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        mcfg = dataclasses.replace(mcfg, **overrides)
    return mcfg


def calibration_batches(calibration, batch_size: int = 1, vocab_size: int | None = None) -> list:
    """Normalise calibration data into a list of model inputs.

    Args:
        calibration: one of
            - an integer tensor ``[num_samples, seq_len]`` of token ids (split
              into batches of ``batch_size`` rows) or ``[seq_len]`` (one row);
            - a floating tensor ``[num_samples, ...]`` (images for a CNN),
              split along dim 0 into batches of ``batch_size``;
            - a list of such tensors (each used as one batch; a 1-D integer
              tensor becomes ``[1, seq_len]``) or of dicts of tensors
              (``model(**batch)``, e.g. ``input_ids`` and ``attention_mask``).
        batch_size: rows per batch when splitting a tensor.
        vocab_size: if given, token ids must lie in ``[0, vocab_size)``.

    Returns:
        A non-empty list of batches (tensors or dicts).

    Raises:
        TypeError / ValueError naming ``calibration``.
    """

    def check_tensor(t, where):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{where} must hold token ids (integers) or floats, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{where} is empty (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            if t.ndim not in (1, 2):
                raise ValueError(f"{where} token ids must be [seq_len] or [batch, seq_len], got shape {tuple(t.shape)}")
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or (vocab_size is not None and hi >= vocab_size):
                raise ValueError(
                    f"{where} token ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]"
                    if vocab_size is not None
                    else f"{where} token ids must be >= 0, got {lo}"
                )
            t = t.long()
            return t.unsqueeze(0) if t.ndim == 1 else t
        if not torch.isfinite(t).all():
            raise ValueError(f"{where} contains NaN or Inf")
        return t

    if isinstance(calibration, torch.Tensor):
        t = check_tensor(calibration, "calibration")
        if not t.is_floating_point() or t.ndim >= 2:
            return list(torch.split(t, batch_size, dim=0))
        raise ValueError(f"calibration float tensor must have a sample dimension, got shape {tuple(t.shape)}")
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise TypeError(
            f"calibration must be a tensor or a list of tensors/dicts, got {type(calibration).__name__}"
        )
    batches = []
    for i, item in enumerate(calibration):
        where = f"calibration[{i}]"
        if isinstance(item, torch.Tensor):
            batches.append(check_tensor(item, where))
        elif isinstance(item, dict):
            if not item:
                raise ValueError(f"{where} is an empty dict")
            batch = {}
            for k, v in item.items():
                if isinstance(v, torch.Tensor) and k == "input_ids":
                    v = check_tensor(v, f"{where}[{k!r}]")
                batch[k] = v
            batches.append(batch)
        else:
            raise TypeError(f"{where} must be a tensor or a dict of tensors, got {type(item).__name__}")
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def _skip_matcher(skip):
    if callable(skip):
        return skip
    globs = [p for p in skip if not p.startswith("re:")]
    regexes = [re.compile(p[3:]) for p in skip if p.startswith("re:")]

    def match(name, module):
        return any(fnmatch.fnmatchcase(name, g) for g in globs) or any(r.search(name) for r in regexes)

    return match


def _layer_config(name, module, qcfg: QuantConfig, policy: str, fallbacks: dict):
    """The QuantConfig for one layer, or None to leave it in full precision.

    A layer whose in_features the group size does not divide is recorded in
    ``fallbacks`` (in_features -> names), to be reported once per width."""
    n = layer_in_features(module)
    if qcfg.group_size == -1 or n % qcfg.group_size == 0:
        return qcfg
    if policy == "short":
        if qcfg.method == "uniquanf":
            raise ValueError(
                f"group_size {qcfg.group_size} does not divide in_features {n} of layer {name}: method "
                "'uniquanf' (BCQ layers) has no shorter last group; pass indivisible='per_channel', "
                "'skip' or 'error', or a group_size that divides it"
            )
        fallbacks.setdefault(n, []).append(name)
        return qcfg  # groups of group_size, the last one shorter
    if policy == "error":
        raise ValueError(
            f"group_size {qcfg.group_size} does not divide in_features {n} of layer {name} (indivisible='error')"
        )
    fallbacks.setdefault(n, []).append(name)
    return None if policy == "skip" else dataclasses.replace(qcfg, group_size=-1)


def _warn_fallbacks(fallbacks: dict, group_size: int, policy: str) -> None:
    """One warning per in_features width, not one per layer (a model repeats its widths)."""
    what = "left in full precision" if policy == "skip" else "quantized per channel"
    for n, names in fallbacks.items():
        shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
        if policy == "short":  # the intended behaviour: said once, not warned about
            log.info("group_size %d does not divide in_features %d of %d layer%s (%s): %d groups per row, "
                     "the last of %d columns", group_size, n, len(names), "" if len(names) == 1 else "s", shown,
                     -(-n // group_size), n - (n // group_size) * group_size)
            continue
        log.warning("group_size %d does not divide in_features %d of %d layer%s (%s): %s",
                    group_size, n, len(names), "" if len(names) == 1 else "s", shown, what)


@dataclass
class _BlockPlan:
    layers: dict  # relative name -> (module, QuantConfig)


def _plan(spec: BlockSpec, mcfg: ModelQuantConfig, report: QuantReport) -> list:
    skip = _skip_matcher(mcfg.skip)
    plans, fallbacks = [], {}
    for i, block in enumerate(spec.blocks):
        layers = {}
        found = quantizable_layers(block)
        if is_quantizable(block):  # blocks that are single layers (layer-by-layer quantization)
            if spec.whole_model:
                raise ValueError(
                    f"model is a single {type(block).__name__} layer: use decoupleq.quantize_weight for one matrix"
                )
            found = {"": block}
        routers = set(moe.router_layers(block))
        for rel, m in found.items():
            full = spec.full_name(i, rel)
            if rel in routers:
                log.info("%s routes an MoE block's tokens: kept in full precision", full)
                report.skipped.append(full)
                continue
            if skip(full, m):
                report.skipped.append(full)
                continue
            lcfg = _layer_config(full, m, mcfg.quant, mcfg.indivisible, fallbacks)
            if lcfg is None:
                report.skipped.append(full)
                continue
            layers[rel] = (m, lcfg)
        plans.append(_BlockPlan(layers))
    _warn_fallbacks(fallbacks, mcfg.quant.group_size, mcfg.indivisible)
    return plans


# ---------------------------------------------------------------------------
# One block
# ---------------------------------------------------------------------------


def _discover(block, call, hidden, layers: dict):
    """Run the block once; return (execution order, calls per layer, input key per layer)."""
    order, counts, keys = [], {}, {}
    handles = []
    alive = []  # holding every input keeps its address from being reused within the pass

    def make(name, module):
        def hook(mod, inp, out):
            if name not in counts:
                order.append(name)
                counts[name] = 0
                keys[name] = input_key(module, inp[0])
                alive.append(inp[0])
            counts[name] += 1

        return hook

    for name, (m, _) in layers.items():
        handles.append(m.register_forward_hook(make(name, m)))
    try:
        with torch.no_grad():
            run_block(block, call, hidden)
    finally:
        for h in handles:
            h.remove()
    return order, counts, keys


def _groups(order, keys, adapter_names, true_sequential):
    if not true_sequential:
        return [list(order)]
    groups = []
    if adapter_names:
        placed = set()
        for g in adapter_names:
            g = [n for n in g if n in keys]
            if g:
                groups.append(g)
                placed.update(g)
        rest = [n for n in order if n not in placed]
        if rest:
            log.debug("layers outside the family's groups, quantized last: %s", rest)
    else:
        rest = list(order)
    for n in rest:
        if groups and groups[-1][-1] in rest and keys[groups[-1][-1]] == keys[n]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _swap_in_quantized(journal: Journal, spec: BlockSpec, i: int, name: str, module: nn.Module, qw) -> nn.Module:
    """Replace layer ``name`` of block i by its QuantLinear / QuantConv2d; returns the new module
    (a block that is itself the layer, ``name == ""``, is replaced in ``spec.blocks`` too).
    The swap is recorded in ``journal`` so a later failure can undo it."""
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    new = cls.from_quantized(module, qw)
    journal.swap(spec.full_name(i, name), new)
    if name == "":
        spec.blocks[i] = new
    return new


def _relative_loss(W: torch.Tensor, H: torch.Tensor, damping: float, loss: float) -> float:
    W64 = W.to(torch.float64)
    H64 = torch.as_tensor(H, dtype=torch.float64)
    lam = damping * float(torch.diagonal(H64).mean())
    if lam == 0.0 and float(torch.diagonal(H64).abs().sum()) == 0.0:
        lam = damping
    ref = float(((W64 @ H64) * W64).sum()) + lam * float(W64.square().sum())
    return loss / ref if ref > 0 else float("nan")


def _quantize_block(
    journal, i, block, spec, plan, calls, inputs, budget, mcfg, report, bars, need_output, fp_inputs=None,
    dist=_SINGLE,
):
    """Quantize (and tune) block i; returns (tuning result, block, next inputs, next fp inputs).

    ``fp_inputs``: the full-precision model's inputs to this block (tuning
    target ``"fp_inputs"``), or None. The full-precision block's outputs on
    them are both this block's tuning labels and the next block's fp_inputs.
    ``dist``: this process's share of a distributed run (``decoupleq.distributed``):
    ``inputs`` are then its calibration batches only.
    """
    t_block = time.perf_counter()
    layers = plan.layers
    n = len(inputs)
    order, counts, keys = _discover(block, calls[0], inputs[0], layers)
    # MoE experts run only on the tokens routed to them: one that the first batch did not
    # reach is still quantized, in its stage (decoupleq.moe).
    experts = moe.block_experts(block, layers, order, keys, mcfg.expert_min_tokens)
    never = [name for name in layers if name not in counts and not (experts and name in experts.names)]
    for name in never:
        log.warning("layer %s was never called by its block: left in full precision", spec.full_name(i, name))
        report.skipped.append(spec.full_name(i, name))
    plain = experts.other_order(order) if experts else order
    groups = _groups(plain, keys, adapter_groups(spec.adapter, plain), mcfg.true_sequential)
    reused = any(c > 1 for c in counts.values())
    if experts:
        groups = experts.arrange(groups, order, mcfg.true_sequential)

    tune = mcfg.blockwise
    fp_outputs = None
    if fp_inputs is not None:
        # Run before any layer of the block changes: the full-precision path.
        fp_outputs = ActivationCache(budget, mcfg.tmpdir, name=f"fp_outputs{i}")
        with torch.no_grad():
            for j in range(n):
                fp_outputs.append(run_block(block, calls[j], fp_inputs[j]))
        fp_inputs.close()
        labels = fp_outputs if counts else None
    else:
        labels = ActivationCache(budget, mcfg.tmpdir, name=f"labels{i}") if tune.enabled and counts else None
    try:
        for gi, group in enumerate(groups):
            record = labels is not None and fp_outputs is None and gi == 0
            # One accumulator per distinct input within the group.
            reps, owner = {}, {}
            for name in group:
                if experts and name in experts.names:
                    k = experts.keys[name]  # one per (expert, stage): its routed tokens
                else:
                    k = keys[name] if not reused else (name,)
                if k not in reps:
                    m = layers[name][0]
                    reps[k] = (name, dist.accumulator(layer_in_features(m)))
                owner[name] = k
            rep_names = {v[0] for v in reps.values()}
            fired = set()
            state = {"mask": None}
            stop_early = not record and not reused

            def make(name, module, acc):
                full = spec.full_name(i, name)
                expert = experts is not None and name in experts.names

                def hook(mod, inp, out):
                    # An expert's input rows are its routed tokens: the batch's mask, restricted.
                    mask = experts.token_mask(name, state["mask"]) if expert else state["mask"]
                    with _naming(full):  # a bad activation is this layer's Hessian's problem
                        acc.add(layer_tokens(module, inp[0], mask))
                    fired.add(name)
                    if stop_early and len(fired) == len(rep_names):
                        raise _StopForward

                return hook

            handles = [
                layers[name][0].register_forward_hook(make(name, layers[name][0], acc))
                for name, acc in reps.values()
            ]
            try:
                with torch.no_grad():
                    for j in range(n):
                        state["mask"] = calls[j].mask
                        dist.batch = j  # the shard its tokens go to (a sharded accumulator)
                        fired.clear()
                        try:
                            y = run_block(block, calls[j], inputs[j])
                        except _StopForward:
                            continue
                        if record:
                            labels.append(y)
            finally:
                for h in handles:
                    h.remove()

            hessians = {}  # layers fed the same input share one H
            accs = {k: acc for k, (_, acc) in reps.items()}
            for name in group:
                module, lcfg = layers[name]
                full = spec.full_name(i, name)
                acc = reps[owner[name]][1]
                t0 = time.perf_counter()
                source = "own"
                with _naming(full):
                    if experts and name in experts.names:
                        H, n_tokens, source = experts.hessian(name, accs, hessians, dist.hessian)
                        if source != "own":
                            report.moe_fallbacks.append((full, n_tokens, source))
                    else:
                        if owner[name] not in hessians:
                            hessians[owner[name]] = dist.hessian(acc)  # (H, tokens), summed over ranks
                        H, n_tokens = hessians[owner[name]]
                W = layer_weight_matrix(module)
                with _naming(full):
                    qw = dist.quantize_weight(W, H, lcfg)
                    new = _swap_in_quantized(journal, spec, i, name, module, qw)
                if name == "":
                    block = new
                loss = float(qw.loss.sum())
                rel = _relative_loss(W, torch.as_tensor(H), lcfg.damping, loss)
                dt = time.perf_counter() - t0
                report.layers.append(
                    LayerReport(full, tuple(W.shape), lcfg.group_size, loss, rel, n_tokens, dt, source)
                )
                log.debug("%s %s: loss %.6g (relative %.4g) in %.2fs", full, tuple(W.shape), loss, rel, dt)
                if bars is not None:
                    bars[1].set_postfix_str(f"{full} rel.loss {rel:.3g}", refresh=False)
                    bars[1].update(1)
            del reps, hessians

        result = None
        if labels is not None:
            progress = None
            if bars is not None:
                total = tune.epochs * n

                def progress(step, loss):
                    if step == 1 or step == total or step % max(1, total // 20) == 0:
                        bars[0].set_postfix_str(f"tuning {step}/{total} mse {loss:.3g}")

            # The fp-path labels are the next block's fp_inputs: not to be overwritten.
            result = tune_block(
                block, inputs, calls, labels, tune, progress=progress,
                outputs_to_labels=need_output and fp_outputs is None, dist=dist,
            )
            if result.outputs_in_labels:
                # The tuned block's outputs are already computed: that cache holds the next inputs.
                inputs.close()
                inputs, labels = labels, None
                need_output = False
    except BaseException:
        if fp_outputs is not None:
            fp_outputs.close()
        raise
    finally:
        if labels is not None and labels is not fp_outputs:
            labels.close()

    if need_output:
        with torch.no_grad():
            for j in range(n):
                inputs[j] = run_block(block, calls[j], inputs[j])
    seconds = time.perf_counter() - t_block
    report.blocks.append(BlockReport(i, spec.block_name(i), seconds, groups, result))
    return result, block, inputs, fp_outputs


def _check_uniquanf_layers(spec: BlockSpec, plans: list) -> None:
    """UniQuanF trains nn.Linear weights only: refuse other planned layers before any work."""
    for i, plan in enumerate(plans):
        for name, (module, _) in plan.layers.items():
            if name == "":
                raise ValueError(f"method 'uniquanf' trains transformer blocks; block {spec.block_name(i)!r} is a "
                                 "single layer")
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"method 'uniquanf' quantizes nn.Linear layers only; {spec.full_name(i, name)} is a "
                    f"{type(module).__name__} (leave it out with skip=...)"
                )


def _quantize_block_uniquanf(
    model, i, block, spec, plan, calls, inputs, budget, mcfg, report, bars, need_output, fp_inputs=None
):
    """UniQuanF on block i (decoupleq.uniquanf_train): returns what ``_quantize_block`` returns.

    Layers are reported with NaN losses: no Hessian is built (the block is
    trained on its output instead)."""
    from .uniquanf_train import quantize_block

    t_block = time.perf_counter()
    layers = {name: (m, lcfg.group_size) for name, (m, lcfg) in plan.layers.items()}
    progress = None
    if bars is not None:
        bars[0].set_postfix_str(f"uniquanf {spec.block_name(i)}")

        def progress(step, total, loss):
            if step == 1 or step == total or step % max(1, total // 20) == 0:
                bars[0].set_postfix_str(f"training {step}/{total} mse {loss:.3g}")

    res, fp_outputs, bcq = quantize_block(
        block, layers, inputs, fp_inputs, calls, budget, mcfg.tmpdir, mcfg.quant.bits, mcfg.quant.uniquanf,
        progress=progress, damping=mcfg.quant.damping,
    )
    if fp_inputs is not None:
        fp_inputs.close()
        next_fp = fp_outputs
    else:
        fp_outputs.close()
        next_fp = None
    seconds = time.perf_counter() - t_block
    for name, (m, gs) in layers.items():
        shape = tuple(bcq[name].shape)
        report.layers.append(LayerReport(spec.full_name(i, name), shape, gs, float("nan"), float("nan"), 0,
                                         seconds / len(layers)))
        if bars is not None:
            bars[1].update(1)
    if need_output:
        with torch.no_grad():
            for j in range(len(inputs)):
                inputs[j] = run_block(block, calls[j], inputs[j])
    report.blocks.append(BlockReport(i, spec.block_name(i), time.perf_counter() - t_block, [list(layers)], res))
    return res, block, inputs, next_fp


def _read_block(source, spec: BlockSpec, plans: list, i: int) -> None:
    """A streamed model (``decoupleq.stream``): read block i from disk and check its weights."""
    if source is None:
        return
    source.load(spec.blocks[i])
    _check_finite_weights(spec, plans, only=i)


def _needs_no_data(plans: list, mcfg: ModelQuantConfig) -> bool:
    """RTN everywhere and no block tuning: nothing depends on activations."""
    return not mcfg.blockwise.enabled and all(
        lcfg.method == "rtn" for plan in plans for _, lcfg in plan.layers.values()
    )


def _quantize_without_data(journal: Journal, spec: BlockSpec, plans: list, report: QuantReport, bars,
                           run=None, dist=_SINGLE, source=None) -> None:
    """Round every planned layer to its min-max grid in place (RTN needs no Hessian).

    Every rank rounds every layer (it is cheap and needs no data)."""
    done = _restore_finished(run, journal, spec, plans, report, False, len(plans) - 1, None, None, bars, source)
    for i, plan in enumerate(plans):
        if i <= done:
            continue
        if plan.layers:
            _read_block(source, spec, plans, i)
        n_layers, n_skipped = len(report.layers), len(report.skipped)
        t_block = time.perf_counter()
        for name, (module, lcfg) in plan.layers.items():
            full = spec.full_name(i, name)
            t0 = time.perf_counter()
            W = layer_weight_matrix(module)
            with _naming(full):
                qw = quantize_weight(W, None, lcfg)
                _swap_in_quantized(journal, spec, i, name, module, qw)
            dt = time.perf_counter() - t0
            report.layers.append(LayerReport(full, tuple(W.shape), lcfg.group_size, float("nan"), float("nan"), 0, dt,
                                             "none"))
            if bars is not None:
                bars[1].update(1)
        report.blocks.append(BlockReport(i, spec.block_name(i), time.perf_counter() - t_block, [list(plan.layers)]))
        if run is not None:
            _commit_block(run, dist, i, spec.blocks[i], plan, report, n_layers, n_skipped, None, None)
        if source is not None:
            source.release(journal.originals())
        if bars is not None:
            bars[0].update(1)


def _restore_finished(run, journal, spec, plans, report, chained, last, inputs, fp_inputs, bars, source=None) -> int:
    """Put the run folder's finished blocks back into the model; returns the last one (-1: none).

    Their quantized layers and tuned state come from the folder, and so do the
    next block's inputs (chained blocks), exactly as the interrupted run held them."""
    if run is None or run.done < 0:
        return -1
    done = min(run.done, last)
    for i in range(done + 1):
        if plans[i].layers or i == run.done:
            if source is not None:  # the block's float parts, to be overwritten by the saved ones
                source.load(spec.blocks[i])
            with _naming(f"block {spec.block_name(i) or i}", layer=False):
                resume_mod.restore_block(
                    run, i, spec, plans[i], journal, report,
                    lambda i, name, module, qw: _swap_in_quantized(journal, spec, i, name, module, qw),
                )
            if source is not None:
                source.release(journal.originals())
        if bars is not None:
            bars[0].update(1)
            bars[1].update(len(plans[i].layers))
    if chained and done < last and inputs is not None:
        run.read_inputs(done, inputs, fp_inputs)
    return done


def _commit_block(run, dist, i, block, plan, report, n_layers, n_skipped, inputs, fp_inputs) -> None:
    """Write finished block i (and the next block's inputs) to the run folder, then mark it done."""
    swapped = resume_mod.quantized_layers(block, plan)
    run.write_block(i, block, swapped, resume_mod.block_meta(i, swapped, report, n_layers, n_skipped))
    if inputs is not None:
        run.write_inputs(i, inputs, fp_inputs)
    run.commit(i, dist)


# ---------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------


def quantize(
    model: nn.Module,
    calibration,
    config: QuantConfig | ModelQuantConfig | None = None,
    *,
    blocks=None,
    blockwise: BlockTuneConfig | bool | None = None,
    true_sequential: bool | None = None,
    skip=None,
    cache_budget_mb: float | None = None,
    batch_size: int | None = None,
    indivisible: str | None = None,
    tmpdir=None,
    verbose: bool | None = None,
    checkpoint_dir=None,
    resume: bool = False,
    _source=None,
) -> nn.Module:
    """Quantize ``model``'s layers in place, block by block, and return it.

    Args:
        model: an ``nn.Module`` (a Hugging Face model or any module). It is
            run in eval mode; its training flag is restored at the end.
        calibration: token id batches (a list of LongTensor ``[batch, seq]``
            or a tensor ``[num_samples, seq_len]``), float inputs for other
            models, or dicts of model inputs; see ``calibration_batches``.
            Data-free runs (RTN without block tuning, see
            ``ModelQuantConfig.needs_calibration``) take ``None`` and do not
            read anything given; other runs refuse ``None``.
        config: a ``QuantConfig`` (layer settings, other options default) or a
            ``ModelQuantConfig``; None means ``ModelQuantConfig()``.
        blocks: where the blocks are: None (family adapter, else the largest
            ``nn.ModuleList`` of similar modules, else the whole model as one
            block), a dotted path, or a list of submodules.
        blockwise, true_sequential, skip, cache_budget_mb, batch_size,
            indivisible, tmpdir, verbose: override the ``ModelQuantConfig``
            fields of the same names (see its docstring).
        checkpoint_dir: a run folder (``decoupleq.resume``): each finished
            block is written there, so an interrupted run can be resumed.
            A new or empty folder starts a run.
        resume: continue the run in ``checkpoint_dir`` from its first
            unfinished block (the model, calibration data and settings must be
            those of the run: the result is then byte for byte that of an
            uninterrupted run).
        _source: internal: a ``decoupleq.stream.BlockSource`` whose model this is
            (``decoupleq.quantize_from_disk``): each block is read from disk when
            reached, and its replaced float layers are freed once it is done.

    In a ``torch.distributed`` run (``torchrun``; see ``decoupleq.distributed``)
    every rank calls ``quantize`` with the same model, calibration set and
    settings; each runs its share of the batches and rows, and every rank
    returns the same quantized model. With ``checkpoint_dir``, rank 0 writes
    the blocks and each rank its inputs (a folder all ranks can reach).

    Returns:
        ``model``, with ``QuantLinear`` / ``QuantConv2d`` in place of the
        quantized layers, ``model.decoupleq_config`` (a JSON-friendly dict of
        the settings), ``model.decoupleq_report`` (a ``QuantReport``) and
        ``model.decoupleq_layer_losses`` (each layer's relative loss, merged over
        ``quantize`` calls and stored by ``save``: ``decoupleq.layer_losses``).

    Raises:
        TypeError / ValueError: bad arguments, named, before any work starts;
            among them a NaN or Inf in any planned layer's weight (the layer
            is named).
        Any error part-way (a layer whose Hessian or solve fails, an
        interrupt): the model is first restored as it was given (original
        layers, float parts, dtypes), and the message starts with the layer
        (``"layer NAME: ..."``) or block that failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mcfg = _model_config(
        config,
        dict(
            blockwise=blockwise, true_sequential=true_sequential, skip=skip, cache_budget_mb=cache_budget_mb,
            batch_size=batch_size, indivisible=indivisible, tmpdir=tmpdir, verbose=verbose,
        ),
    )
    if mcfg.tmpdir is not None and not os.path.isdir(mcfg.tmpdir):
        raise ValueError(f"tmpdir {os.fspath(mcfg.tmpdir)!r} is not an existing directory")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not mcfg.needs_calibration:
        # Data-free (RTN, no block tuning): None is the natural argument, and anything given
        # is not even read (a generator of windows would be consumed for nothing).
        if calibration is not None and mcfg.verbose:
            log.info("RTN without block tuning is data-free: the calibration argument is not read")
        batches = []
    elif calibration is None:
        raise ValueError(
            f"calibration is None, but method {mcfg.quant.method!r}"
            + (" with block tuning" if mcfg.blockwise.enabled else "")
            + " needs calibration data; only RTN without block tuning is data-free"
        )
    else:
        batches = calibration_batches(calibration, mcfg.batch_size, vocab if isinstance(vocab, int) else None)
    spec = find_blocks(model, blocks)
    report = QuantReport()
    journal = Journal(model)
    # Fused MoE experts become per-expert layers (same forward, same weights) to be planned.
    converted = moe.convert_fused(journal, spec)
    try:
        plans = _plan(spec, mcfg, report)
        if mcfg.quant.method == "uniquanf":
            _check_uniquanf_layers(spec, plans)
        total_layers = sum(len(p.layers) for p in plans)
        if total_layers == 0:
            log.warning("no layer to quantize (all skipped or none found); the model is unchanged")
            moe.revert_unplanned(converted, ())
            return model
        if _source is None:  # streamed blocks are checked as they are read
            _check_finite_weights(spec, plans)
    except BaseException:
        journal.restore()
        raise
    moe.revert_unplanned(converted, (spec.full_name(i, n) for i, p in enumerate(plans) for n in p.layers))
    dist = current_dist()
    if dist.active:
        if mcfg.quant.method == "uniquanf":
            raise ValueError("method 'uniquanf' does not run distributed yet; run it in one process")
        if len(batches) < dist.world_size:
            raise ValueError(f"calibration has {len(batches)} batches for {dist.world_size} ranks: "
                             "every rank needs at least one")
    if mcfg.shards is not None and mcfg.quant.method == "uniquanf":
        raise ValueError("shards is not supported with method 'uniquanf' (it builds no Hessian)")
    # Virtual shards (ModelQuantConfig.shards): which rank runs which batch, how Hessians are
    # summed and rows split; raises before any work when there are fewer shards than ranks.
    dist = dist.planned(mcfg.shards, len(batches))
    run = None
    if checkpoint_dir is not None:
        if mcfg.quant.method == "uniquanf":
            raise ValueError("checkpoint_dir is not supported with method 'uniquanf' yet")
        run = resume_mod.open_run(
            checkpoint_dir, resume_mod.fingerprint(model, batches, mcfg.to_dict(),
                                                   [spec.block_name(i) for i in range(len(spec.blocks))],
                                                   dist.world_size,
                                                   _source.state_items() if _source is not None else None),
            resume, dist.rank, dist.world_size, dist,
        )
    elif resume:
        raise ValueError("resume=True needs checkpoint_dir")
    batches = dist.shard(batches)

    info = log.info if mcfg.verbose else log.debug
    info(
        "quantizing %d layers in %d blocks (%s) with %s, %d-bit, group %d; %d calibration batches",
        total_layers, len(spec.blocks), spec.block_name(0) or type(model).__name__,
        mcfg.quant.method, mcfg.quant.bits, mcfg.quant.group_size, len(batches),
    )
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    budget = MemoryBudget(int(mcfg.cache_budget_mb * 2**20))
    inputs = ActivationCache(budget, mcfg.tmpdir, name="inputs")
    fp_inputs = None
    bars = None
    try:
        if mcfg.verbose:
            from tqdm.auto import tqdm

            bars = (
                tqdm(total=len(spec.blocks), desc="blocks", unit="block", position=0),
                tqdm(total=total_layers, desc="layers", unit="layer", position=1, leave=False),
            )
        if _needs_no_data(plans, mcfg):
            info("RTN without block tuning needs no data: the calibration batches are not run")
            _quantize_without_data(journal, spec, plans, report, bars, run, dist, _source)
            return _finish(model, mcfg, report, t_start, info)
        with _source.probing(spec.blocks) if _source is not None else contextlib.nullcontext():
            caught = catch_block_inputs(model, spec.blocks, batches, inputs)
        last = max(i for i, p in enumerate(plans) if p.layers)
        fp_inputs = _start_fp_path(mcfg, caught.chained, inputs, budget)
        done = _restore_finished(run, journal, spec, plans, report, caught.chained, last, inputs, fp_inputs, bars,
                                 _source)
        for i, (block, plan) in enumerate(zip(spec.blocks, plans)):
            if i > last:
                break
            if i <= done:
                continue
            _read_block(_source, spec, plans, i)
            n_layers, n_skipped = len(report.layers), len(report.skipped)
            calls = caught.calls[i]
            if not caught.chained and i > 0 and plan.layers:
                # Blocks that do not feed each other: catch this block's inputs from
                # the model as it is now (earlier blocks already quantized).
                inputs.close()
                inputs = ActivationCache(budget, mcfg.tmpdir, name="inputs")
                calls = catch_block_inputs(model, [block], batches, inputs).calls[0]
            if plan.layers:
                # Tuning changes the block's float parts in place: keep a copy to restore.
                journal.snapshot(block, exclude=[m for m, _ in plan.layers.values()])
                with _naming(f"block {spec.block_name(i) or i}", layer=False):
                    if mcfg.quant.method == "uniquanf":
                        # Its trainer swaps the block's layers itself: the originals are
                        # remembered first, so a failure puts them back.
                        for name, (m, _) in plan.layers.items():
                            journal.swap(spec.full_name(i, name), m)
                        res, block, inputs, fp_inputs = _quantize_block_uniquanf(
                            model, i, block, spec, plan, calls, inputs, budget, mcfg, report, bars,
                            caught.chained and i < last, fp_inputs,
                        )
                    else:
                        res, block, inputs, fp_inputs = _quantize_block(
                            journal, i, block, spec, plan, calls, inputs, budget, mcfg, report, bars,
                            caught.chained and i < last, fp_inputs, dist,
                        )
                if res is not None:
                    info(
                        "block %s: tuning loss %.6g -> %.6g%s", spec.block_name(i) or "model",
                        res.loss_before, res.loss_after, " (restored)" if res.restored else "",
                    )
            elif caught.chained and i < last:
                with torch.no_grad():
                    for j in range(len(inputs)):
                        inputs[j] = run_block(block, calls[j], inputs[j])
                        if fp_inputs is not None:
                            fp_inputs[j] = run_block(block, calls[j], fp_inputs[j])
            if run is not None:
                _commit_block(run, dist, i, block, plan, report, n_layers, n_skipped,
                              inputs if caught.chained and i < last else None, fp_inputs)
            if _source is not None:
                _source.release(journal.originals())
            if bars is not None:
                bars[0].update(1)
    except BaseException as exc:
        if dist.active and isinstance(exc, Exception) and not isinstance(exc, _COLLECTIVE_ERRORS):
            # This rank's own failure: the others learn it at their next collective
            # instead of waiting there for gloo's timeout.
            dist.signal_failure()
        # Give the caller back the model it passed: original layers and float parts.
        journal.restore()
        raise
    finally:
        if bars is not None:
            for b in reversed(bars):
                b.close()
        inputs.close()
        if fp_inputs is not None:
            fp_inputs.close()
        model.train(was_training)
    return _finish(model, mcfg, report, t_start, info)


def _check_finite_weights(spec: BlockSpec, plans: list, only=None) -> None:
    """Every planned layer's weight is finite, checked before any work (the error names the layer).

    ``only``: check block ``only`` alone (a streamed block, just read from disk)."""
    for i, plan in enumerate(plans):
        if only is not None and i != only:
            continue
        for name, (module, _) in plan.layers.items():
            w = module.weight
            if not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(
                    f"layer {spec.full_name(i, name)}: weight {tuple(w.shape)} has {bad} NaN or Inf "
                    "value(s); nothing was quantized"
                )


@contextlib.contextmanager
def _naming(where: str, layer: bool = True):
    """Prefix an exception's message with the layer (or block) it came from, keeping its type.

    An exception already naming a layer is left alone (a block's error from one of its layers)."""
    try:
        yield
    except Exception as exc:
        label = f"layer {where}" if layer else where
        if getattr(exc, "_decoupleq_where", None) is None:
            try:
                exc._decoupleq_where = label
            except AttributeError:  # an exception type without a __dict__
                pass
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (f"{label}: {exc.args[0]}",) + exc.args[1:]
            elif hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"while quantizing {label}")
        raise


def _start_fp_path(mcfg: ModelQuantConfig, chained: bool, inputs: ActivationCache, budget):
    """A copy of block 0's inputs, the start of the full-precision path, when tuning targets it."""
    uniquanf = mcfg.quant.method == "uniquanf"
    if not uniquanf and not (mcfg.blockwise.enabled and mcfg.blockwise.target == "fp_inputs"):
        return None
    if not chained:
        if uniquanf:
            log.warning("UniQuanF mixes full-precision and quantized block inputs, which needs blocks that "
                        "feed each other; these do not, so each block trains on its quantized-path inputs only")
            return None
        log.warning(
            "block tuning target 'fp_inputs' needs blocks that feed each other; these do not, "
            "so each block is tuned to its full-precision outputs on its quantized-path inputs"
        )
        return None
    fp_inputs = ActivationCache(budget, mcfg.tmpdir, name="fp_inputs")
    for j in range(len(inputs)):
        fp_inputs.append(inputs[j])
    return fp_inputs


def _finish(model, mcfg: ModelQuantConfig, report: QuantReport, t_start: float, info) -> nn.Module:
    report.seconds = time.perf_counter() - t_start
    report.params = moe.parameter_counts(model)
    p = report.params
    info("quantized %d layers in %.1fs: %d weights quantized, %d parameters kept in floating point",
         len(report.layers), report.seconds, p["quantized"], p["kept"])
    if p["experts_quantized"] or p["experts_kept"]:
        info("MoE experts: %d weights quantized, %d kept", p["experts_quantized"], p["experts_kept"])
    if report.moe_fallbacks:
        shown = ", ".join(f"{n} ({t} tokens, {s})" for n, t, s in report.moe_fallbacks[:4])
        more = len(report.moe_fallbacks) - 4
        log.warning("%d MoE expert layer%s saw fewer than %d routed tokens and took a fallback Hessian: %s%s",
                    len(report.moe_fallbacks), "" if len(report.moe_fallbacks) == 1 else "s",
                    mcfg.expert_min_tokens, shown, f", ... ({more} more)" if more > 0 else "")
    model.decoupleq_config = mcfg.to_dict()
    model.decoupleq_report = report
    layer_losses.record(model, report.layers)  # what save stores for `decoupleq info --plot`
    _hf_hook.attach(model)  # a transformers model: save_pretrained / from_pretrained carry it
    return model
