"""UniQuanF block by block (ALGORITHM 8 "Training"): initialise, train, unify, swap.

For one transformer block:

1. the full-precision block's outputs on the full-precision path's inputs
   are the targets (computed before anything in the block changes);
2. each planned linear becomes a ``UniQuanFLinear`` whose quantizer is
   initialised by the C unified initialisation;
3. training: for every step one cached batch (order shuffled per epoch), the
   block input mixes the quantized-path and full-precision inputs elementwise
   (each element from the quantized path with probability ``input_prob``,
   QDrop), loss the mean squared error to the target; Adam (torch defaults:
   betas (0.9, 0.999), eps 1e-8) with two parameter groups, delta1..3 at
   ``lr_delta`` and alpha at ``lr_alpha``, both on a cosine decay to 0 over
   all steps; the block runs in float32;
4. each quantizer's indices are frozen and the layer is replaced by its
   unified BCQ form;
5. the quantized block's outputs on the quantized-path inputs become the next
   block's inputs, the full-precision outputs the next full-precision inputs.

The activation caches, the block-call replay, the loss and the Adam update
are the pipeline's and block tuning's own (``capture``, ``blockwise``).
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from .blockwise import BlockTuneResult, _Adam, _local_dtypes, _masked_sq_error, _restore_dtypes, block_loss
from .capture import ActivationCache, layer_tokens, run_block
from .config import UniQuanFConfig
from .nn_bcq import BCQLinear
from .uniquanf import UniQuanFLinear, UniQuanFQuantizer

log = logging.getLogger(__name__)



def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def make_trainable(block: nn.Module, layers: dict, bits: int, group_size: int, cfg: UniQuanFConfig,
                   hdiags: dict | None = None) -> dict:
    """Replace ``layers`` (relative name -> nn.Linear) of ``block`` by ``UniQuanFLinear``.

    ``group_size`` is the layer's (-1 per-channel); ``hdiags`` maps names to
    the initialisation's column weights (missing: unweighted). Returns name ->
    the new module.
    """
    out = {}
    for name, layer in layers.items():
        q = UniQuanFQuantizer(
            layer.weight, bits, group_size, clip_steps=cfg.clip_steps, init_iters=cfg.init_iters,
            hdiag=(hdiags or {}).get(name),
            period=cfg.period, local_mapping=cfg.local_mapping, grad_filter=cfg.grad_filter,
        )
        new = UniQuanFLinear(layer, q)
        _set_module(block, name, new)
        out[name] = new
    return out


def _cosine(step: int, total: int) -> float:
    """Learning-rate factor before step ``step`` of ``total``: 1 at the start, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_block(block: nn.Module, q_inputs: ActivationCache, fp_inputs, calls, labels: ActivationCache,
                cfg: UniQuanFConfig, progress=None) -> BlockTuneResult:
    """Train every ``UniQuanFQuantizer`` in ``block`` to reproduce ``labels`` (in place).

    Args:
        block: a block whose quantized layers are ``UniQuanFLinear``.
        q_inputs: the block's inputs on the quantized path, one tensor per batch.
        fp_inputs: the same on the full-precision path (same shapes), or None
            to use ``q_inputs`` only (then there is nothing to mix).
        calls: the ``BlockCall`` of each batch.
        labels: the full-precision block's outputs on ``fp_inputs``.
        cfg: the UniQuanF settings (epochs, learning rates, mixing, seed).
        progress: optional ``progress(step, total, loss)`` after each step.

    Returns:
        A ``BlockTuneResult``: the MSE on the quantized-path inputs before
        training (initialisation) and after (indices frozen); nothing is ever
        restored.
    """
    n = len(q_inputs)
    if len(labels) != n or len(calls) != n or (fp_inputs is not None and len(fp_inputs) != n):
        raise ValueError(f"q_inputs ({n}), labels ({len(labels)}), calls ({len(calls)}) and fp_inputs differ in length")
    t0 = time.perf_counter()
    quantizers = [m for m in block.modules() if isinstance(m, UniQuanFQuantizer)]
    deltas = [p for q in quantizers for p in (q.delta1, q.delta2, q.delta3)]
    alphas = [q.alpha for q in quantizers]
    all_params = list(block.parameters())
    grad_flags = {id(p): p.requires_grad for p in all_params}
    dtypes = _local_dtypes(block)
    was_training = block.training
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.epochs * n
    block.float()
    block.eval()  # dropout off; the quantizers update through their own flag
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in deltas + alphas:
            p.requires_grad_(True)
        before = block_loss(block, q_inputs, calls, labels)
        opts = [
            (_Adam(deltas, lr=cfg.lr_delta, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), cfg.lr_delta),
            (_Adam(alphas, lr=cfg.lr_alpha, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), cfg.lr_alpha),
        ]
        for q in quantizers:
            q.updating = True
        step = 0
        for _ in range(cfg.epochs):
            for i in torch.randperm(n, generator=gen).tolist():
                x = q_inputs[i].to(torch.float32)
                if fp_inputs is not None and cfg.input_prob < 1.0:
                    xf = fp_inputs[i].to(torch.float32)
                    keep_q = torch.rand(x.shape, generator=gen) < cfg.input_prob
                    x = torch.where(keep_q, x, xf)
                y = run_block(block, calls[i], x, dtype=torch.float32)
                s, cnt = _masked_sq_error(y, labels[i].to(y.device, torch.float32), calls[i].mask)
                loss = s / max(cnt, 1)
                for opt, base in opts:
                    opt.lr = base * _cosine(step, total)
                    opt.zero_grad()
                loss.backward()
                for opt, _ in opts:
                    opt.step()
                step += 1
                if progress is not None:
                    progress(step, total, loss.item())
        for q in quantizers:
            q.freeze()
        after = block_loss(block, q_inputs, calls, labels) if step else before
    finally:
        for q in quantizers:
            q.updating = False
        for p in all_params:
            p.requires_grad_(grad_flags[id(p)])
            p.grad = None
        _restore_dtypes(block, dtypes)
        block.train(was_training)
    n_params = sum(p.numel() for p in deltas + alphas)
    res = BlockTuneResult(before, after, step, False, n_params, time.perf_counter() - t0)
    log.debug("uniquanf block training: loss %.6g -> %.6g in %d steps (%d parameters)", before, after, step, n_params)
    return res


def unify(block: nn.Module, originals: dict) -> dict:
    """Swap each ``UniQuanFLinear`` of ``block`` (relative name -> its original layer in
    ``originals``) for the BCQ layer module built from its unified weight; returns name -> BCQWeight."""
    out = {}
    for name, layer in originals.items():
        trained = block.get_submodule(name)
        bcq = trained.quantizer.to_bcq()
        _set_module(block, name, BCQLinear.from_bcq(layer, bcq))
        out[name] = bcq
    return out


class _DiagHessian:
    """Running ``sum x_j^2`` and token count of one layer's inputs (the Hessian's diagonal)."""

    def __init__(self, module: nn.Module):
        self.module, self.sq, self.n = module, None, 0

    def add(self, x: torch.Tensor, mask):
        t = layer_tokens(self.module, x, mask).detach().to(torch.float64)
        sq = t.square().sum(0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.n += t.shape[0]

    def damped(self, damping: float):
        """float32 (n,): ``mean x_j^2 + damping * mean_j(mean x_j^2)`` (the diagonal of H00)."""
        if self.sq is None or self.n == 0:
            return None
        d = self.sq / self.n
        lam = damping * float(d.mean())
        return (d + (lam if lam > 0 else damping)).to(torch.float32).numpy()


def quantize_block(block: nn.Module, layers: dict, q_inputs: ActivationCache, fp_inputs, calls, budget,
                   tmpdir, bits: int, cfg: UniQuanFConfig, progress=None, damping: float = 0.01):
    """Initialise, train and unify the planned layers of one block, in place.

    Args:
        block: the block (its planned layers still full precision).
        layers: relative name -> (nn.Linear, group_size) to quantize.
        q_inputs, fp_inputs, calls: as in ``train_block`` (fp_inputs None: the
            targets are the full-precision block on the quantized-path inputs).
        budget, tmpdir: for the targets' activation cache.
        bits: 2..4.
        damping: added to the Hessian diagonal (times its mean) when
            ``cfg.init_weighting == "hessian_diag"``.

    Returns:
        (BlockTuneResult, fp_outputs, bcq): ``fp_outputs`` is the cache of
        full-precision outputs (the next block's full-precision inputs; the
        caller closes it), ``bcq`` maps relative names to ``BCQWeight``.
    """
    n = len(q_inputs)
    src = fp_inputs if fp_inputs is not None else q_inputs
    fp_outputs = ActivationCache(budget, tmpdir, name="uniquanf_fp_outputs")
    diags, handles, state = {}, [], {"mask": None}
    if cfg.init_weighting == "hessian_diag":
        # The diagonals come from the pass that computes the targets: no extra forward.
        for name, (layer, _) in layers.items():
            diags[name] = acc = _DiagHessian(layer)
            handles.append(layer.register_forward_hook(
                lambda mod, inp, out, acc=acc: acc.add(inp[0], state["mask"])))
    try:
        try:
            with torch.no_grad():
                for j in range(n):
                    state["mask"] = calls[j].mask
                    fp_outputs.append(run_block(block, calls[j], src[j]))
        finally:
            for h in handles:
                h.remove()
        hdiags = {name: acc.damped(damping) for name, acc in diags.items()}
        originals = {name: layer for name, (layer, _) in layers.items()}
        by_group = {}
        for name, (layer, gs) in layers.items():
            by_group.setdefault(gs, {})[name] = layer
        for gs, group in by_group.items():
            make_trainable(block, group, bits, gs, cfg, hdiags)
        res = train_block(block, q_inputs, fp_inputs, calls, fp_outputs, cfg, progress=progress)
        bcq = unify(block, originals)
    except BaseException:
        fp_outputs.close()
        raise
    return res, fp_outputs, bcq
