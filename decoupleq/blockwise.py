"""Block-wise tuning of the float parts of a quantized block (ALGORITHM 4.3).

The integer codes are frozen. Trained, as in the reference: every quantized
layer's ``scale``, its ``zero`` unless symmetric, optionally the weights and
biases of normalization modules and the quantized layers' biases. The target
is the full-precision block applied to the same (quantized-path) inputs,
computed before the block was quantized. Adam with betas (0.9, 0.99) and
eps 2e-5, L2-style weight decay, no schedule; one cached batch per step, in
fixed order; the loss is the mean squared error (masked mean over tokens when
the calibration batch had an attention mask). The block runs in float32
during tuning and its parameters go back to their dtypes afterwards.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from .capture import ActivationCache, run_block
from .config import BlockTuneConfig
from .distributed import _SINGLE
from .nn import QUANT_MODULES

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass
class BlockTuneResult:
    """Outcome of tuning one block.

    Attributes:
        loss_before: mean squared error to the labels before tuning.
        loss_after: the same after tuning (after any restore).
        steps: optimizer steps taken.
        restored: True if the tuned parameters were discarded because the loss rose.
        n_params: number of trained scalars.
        seconds: wall time.
        outputs_in_labels: the labels cache now holds the tuned block's outputs.
    """

    loss_before: float
    loss_after: float
    steps: int
    restored: bool
    n_params: int
    seconds: float
    outputs_in_labels: bool = False


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm, or any class whose name contains "Norm" (RMSNorm)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def trainable_parameters(block: nn.Module, cfg: BlockTuneConfig) -> list:
    """The parameters block-wise tuning trains, in a fixed order, without duplicates."""
    params, seen = [], set()

    def add(p):
        if p is not None and id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            params.append(p)

    for m in block.modules():
        if isinstance(m, QUANT_MODULES):
            add(m.scale)
            if not m.symmetric:
                add(m.zero)
            if cfg.train_bias:
                add(m.bias)
        elif cfg.train_norms and is_norm(m):
            for p in m.parameters(recurse=False):
                add(p)
    return params


class _Adam:
    """Adam with L2-style weight decay, the update of ``torch.optim.Adam``;
    with ``decoupled=True`` the decay is AdamW's (``p -= lr * wd * p`` before
    the step), the update of ``torch.optim.AdamW``.

    Written out because constructing ``torch.optim.Adam`` imports
    ``torch._dynamo`` (several seconds on first use), a cost every CLI run and
    test process would pay for a dozen lines of arithmetic. ``lr`` may be
    changed between steps (a schedule).
    """

    def __init__(self, params, lr, betas, eps, weight_decay, decoupled=False):
        self.params = list(params)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.decoupled = decoupled
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        bc1 = 1.0 - self.b1**self.t
        bc2_sqrt = (1.0 - self.b2**self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if self.wd and self.decoupled:
                p.mul_(1.0 - self.lr * self.wd)
            elif self.wd:
                g = g.add(p, alpha=self.wd)
            m.mul_(self.b1).add_(g, alpha=1.0 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bc1)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _masked_sq_error(y: torch.Tensor, target: torch.Tensor, mask):
    d = (y - target).square()
    if mask is not None and tuple(d.shape[: mask.ndim]) == tuple(mask.shape):
        d = d[mask.to(d.device)]
    return d.sum(), d.numel()


def block_loss(block, inputs: ActivationCache, calls, labels: ActivationCache, replace_labels=False,
               dist=_SINGLE) -> float:
    """Mean squared error of ``block`` on the cached inputs against ``labels`` (float32, no grad).

    With ``replace_labels``, each label is overwritten by the block's output
    once its error is counted (saving a forward pass when those outputs are
    needed next). In a distributed run (``dist``) the error is over every
    rank's batches.
    """
    # One float64 slot (error, count) per global batch, added in batch order: the same
    # total on every world size (Dist.fold_slots).
    n_global = dist.n_batches if dist.n_batches is not None else len(inputs) * dist.world_size
    if not dist.active:
        n_global = len(inputs)
    slots = torch.zeros((max(n_global, 1), 2), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(inputs)):
            y = run_block(block, calls[i], inputs[i], dtype=torch.float32)
            s, n = _masked_sq_error(y, labels[i].to(y.device, torch.float32), calls[i].mask)
            g = dist.global_index(i) if dist.active else i
            slots[g, 0] = float(s)
            slots[g, 1] = n
            if replace_labels:
                labels[i] = y
    total, count = (float(v) for v in dist.fold_slots(slots))
    return total / max(count, 1)


def _local_dtypes(block: nn.Module) -> dict:
    out = {}
    for mname, m in block.named_modules():
        for kind, tensors in (("p", m._parameters), ("b", m._buffers)):
            for n, t in tensors.items():
                if t is not None and t.is_floating_point():
                    out[(mname, kind, n)] = t.dtype
    return out


def _restore_dtypes(block: nn.Module, dtypes: dict):
    """Undo ``block.float()``: parameters keep their identity (only ``.data`` changes)."""
    modules = dict(block.named_modules())
    for (mname, kind, n), dtype in dtypes.items():
        m = modules[mname]
        if kind == "p":
            p = m._parameters[n]
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        else:
            b = m._buffers[n]
            if b.dtype != dtype:
                m._buffers[n] = b.to(dtype)


def tune_block(
    block: nn.Module,
    inputs: ActivationCache,
    calls,
    labels: ActivationCache,
    cfg: BlockTuneConfig,
    progress=None,
    outputs_to_labels: bool = False,
    dist=_SINGLE,
) -> BlockTuneResult:
    """Tune the float parts of ``block`` in place to match ``labels``.

    Args:
        block: a block whose layers are ``QuantLinear``/``QuantConv2d``.
        inputs: cached block inputs, one tensor per calibration batch.
        calls: the ``BlockCall`` of each batch (other arguments, token mask).
        labels: the full-precision block's outputs for the same inputs.
        cfg: the tuning settings (``cfg.enabled`` is not consulted here).
        progress: optional callable ``progress(step, loss)`` after each step.
        outputs_to_labels: if the tuned parameters are kept and the block is
            entirely float32, overwrite ``labels`` with the block's outputs
            (the next block's inputs) instead of discarding them; the result's
            ``outputs_in_labels`` says whether that happened.
        dist: this process's share of a distributed run (``decoupleq.distributed``):
            ``inputs``, ``calls`` and ``labels`` hold its batches (global batch
            ``rank + j * world_size`` is local ``j``); gradients and losses are
            summed over ranks, so every rank takes the same steps.

    Returns:
        A ``BlockTuneResult``; the block ends with the better of the tuned
        and untuned float parts when ``cfg.keep_best``.
    """
    if len(inputs) != len(labels) or len(inputs) != len(calls):
        raise ValueError(f"inputs ({len(inputs)}), labels ({len(labels)}) and calls ({len(calls)}) differ in length")
    t0 = time.perf_counter()
    params = trainable_parameters(block, cfg)
    all_params = list(block.parameters())
    dtypes = _local_dtypes(block)
    grad_flags = {id(p): p.requires_grad for p in all_params}
    # Outputs computed in float32 are the block's own outputs only if it runs in float32 anyway.
    reuse = outputs_to_labels and all(d == torch.float32 for d in dtypes.values()) and all(
        inputs[i].dtype == torch.float32 for i in range(len(inputs))
    )
    in_labels = False
    was_training = block.training
    block.float()
    block.eval()  # dropout off; BatchNorm uses its running statistics
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        saved = [p.detach().clone() for p in params]
        before = block_loss(block, inputs, calls, labels, dist=dist)
        steps = 0
        if params:
            opt = _Adam(params, lr=cfg.lr, betas=(0.9, 0.99), eps=2e-5, weight_decay=cfg.weight_decay)
            n_global = len(inputs)
            if dist.active:
                n_global = dist.n_batches if dist.n_batches is not None else \
                    int(dist.all_reduce_scalars(len(inputs))[0])
            k = cfg.batches_per_step
            for _ in range(cfg.epochs):
                for start in range(0, n_global, k):
                    members = range(start, min(start + k, n_global))
                    opt.zero_grad()
                    slots = []  # (position in the step, loss, gradients) of this rank's batches
                    for pos, g in enumerate(members):
                        owner, i = dist.owner(g) if dist.active else (dist.rank, g)
                        if owner != dist.rank:
                            continue
                        for p in params:
                            p.grad = None  # each batch's gradient alone: summed in batch order below
                        y = run_block(block, calls[i], inputs[i], dtype=torch.float32)
                        s, n = _masked_sq_error(y, labels[i].to(y.device, torch.float32), calls[i].mask)
                        loss = s / max(n, 1)
                        loss.backward()
                        slots.append((pos, loss.item(), [p.grad for p in params]))
                    total = dist.sum_batch_grads(params, slots, len(members))
                    opt.step()
                    steps += 1
                    if progress is not None:
                        progress(steps, total / len(members))
            del opt
        # The labels are not needed after this pass, whatever happens next: if the
        # tuned parameters are restored, the caller recomputes the outputs instead.
        replace = reuse and steps > 0
        after = block_loss(block, inputs, calls, labels, replace_labels=replace, dist=dist) if steps else before
        in_labels = replace
        restored = False
        if cfg.keep_best and not after < before:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            restored = steps > 0
            after = before
            in_labels = False
    finally:
        for p in all_params:
            p.requires_grad_(grad_flags[id(p)])
            p.grad = None
        _restore_dtypes(block, dtypes)
        block.train(was_training)
    n_params = sum(p.numel() for p in params)
    res = BlockTuneResult(before, after, steps, restored, n_params, time.perf_counter() - t0, in_labels)
    log.debug(
        "block tuning: loss %.6g -> %.6g in %d steps (%d parameters)%s",
        before, after, steps, n_params, ", restored" if restored else "",
    )
    return res
