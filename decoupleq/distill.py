"""Lightweight distillation of a quantized model's float parts (NeUQI, ALGORITHM 7).

After quantization (any method) every ``QuantLinear`` / ``QuantConv2d`` holds
frozen integer codes and float ``scale`` / ``zero`` (out, G). ``distill``
trains only those scales and zeros (a symmetric layer's zero stays 0) so that
the quantized model's final hidden states match the full-precision teacher's:

    teacher = copy.deepcopy(model)       # or load it again after quantizing
    decoupleq.quantize(model, calib, QuantConfig(method="rtn", bits=2, group_size=64))
    report = decoupleq.distill(model, teacher, calib)     # one epoch, batch 1

What is compared ("final hidden state"):
    - a Hugging Face model: its ``base_model`` (e.g. ``LlamaModel`` inside
      ``LlamaForCausalLM``) is called and its first output,
      ``last_hidden_state`` (after the final norm, the input of ``lm_head``),
      is used; so ``lm_head`` and the logits are never computed, and a
      quantized ``lm_head`` is not trained.
    - any other ``nn.Module``: its own output (a tensor, or the first tensor of
      a tuple / ``ModelOutput``).

Loss: mean squared error over every element of the (batch, seq, hidden)
output, in float32 (tokens where a dict batch's ``attention_mask`` is 0 are
left out). Optimiser: AdamW (lr 3e-4, betas (0.9, 0.95), weight decay 0, eps
1e-8), a linear warm-up over the first 10% of the steps then a cosine decay to
0, one window per step, windows in a seeded random order per epoch.

The teacher runs under ``torch.no_grad`` in eval mode, either at every step
(default) or once per window beforehand into an ``ActivationCache`` that keeps
its outputs in RAM up to ``teacher_cache_mb`` and memory-maps the rest to
temporary files: only the teacher's outputs are ever cached, never the
student's activations.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .blockwise import _Adam, _masked_sq_error
from .capture import ActivationCache, MemoryBudget, _batch_mask, _call_model, _forward_kwargs, _module_device, block_output
from .nn import QUANT_MODULES
from .pipeline import calibration_batches
from .sft import prepare_for_sft

log = logging.getLogger(__name__)

__all__ = ["distill", "DistillReport", "final_hidden_module", "lr_at"]

#: The NeUQI defaults (ALGORITHM 7).
DEFAULT_LR = 3e-4
DEFAULT_BETAS = (0.9, 0.95)
DEFAULT_WARMUP = 0.1


@dataclass
class DistillReport:
    """What ``distill`` did.

    Attributes:
        steps: optimizer steps taken (one window each).
        seconds: wall time, teacher caching included.
        loss_start: mean training loss over the first ``k = max(1, steps // 10)``
            steps (the first measured before any update).
        loss_end: mean training loss over the last ``k`` steps.
        losses: every step's loss (MSE of the final hidden states), in order.
        eval_before / eval_after: MSE over ``eval_data`` before and after, or None.
        n_params: scalars trained.
        teacher_cached: True when the teacher's outputs were cached beforehand.
    """

    steps: int
    seconds: float
    loss_start: float
    loss_end: float
    losses: list = field(default_factory=list)
    eval_before: float | None = None
    eval_after: float | None = None
    n_params: int = 0
    teacher_cached: bool = False

    def to_dict(self, with_losses: bool = False) -> dict:
        d = asdict(self)
        if not with_losses:
            d.pop("losses")
        return d


def final_hidden_module(model: nn.Module) -> nn.Module:
    """The module whose first output is compared: a Hugging Face model's ``base_model``, else ``model``."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def lr_at(step: int, steps: int, lr: float, warmup: float = DEFAULT_WARMUP) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``.

    Linear warm-up over ``w = max(1, round(warmup * steps))`` steps (none when
    ``warmup == 0``), reaching ``lr`` at step ``w - 1``, then a cosine from
    ``lr`` towards 0 over the remaining ``steps - w`` steps.
    """
    w = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < w:
        return lr * (step + 1) / w
    progress = (step - w) / max(1, steps - w)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_args(model, teacher, steps, lr, betas, weight_decay, warmup, seed, teacher_cache_mb, tmpdir, verbose):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is model:
        raise ValueError("teacher is the model itself: pass the full-precision model (a copy kept before "
                         "quantizing, or the model loaded again)")
    quant = [m for m in model.modules() if isinstance(m, QUANT_MODULES)]
    if not quant:
        raise ValueError("model has no QuantLinear / QuantConv2d layer: quantize it (or decoupleq.load it) first")
    trained = {id(p) for m in quant for p in (m.scale, m.zero)}
    if any(id(p) in trained for p in teacher.parameters()):
        raise ValueError("teacher shares quantized layers with model: pass a separate full-precision model")
    for key in ("hidden_size", "vocab_size"):
        a = getattr(getattr(model, "config", None), key, None)
        b = getattr(getattr(teacher, "config", None), key, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"teacher and model differ in {key}: teacher {b}, model {a}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None (one epoch) or an int >= 1, got {steps!r}")
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not _is_number(warmup) or not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1], got {warmup!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if teacher_cache_mb is not None and (not _is_number(teacher_cache_mb) or not teacher_cache_mb >= 0):
        raise ValueError(f"teacher_cache_mb must be None (teacher run at every step) or >= 0, got {teacher_cache_mb!r}")
    if tmpdir is not None and not os.path.isdir(tmpdir):
        raise ValueError(f"tmpdir {os.fspath(tmpdir)!r} is not an existing directory")
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {verbose!r}")


def _batches(data, name, model):
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        return calibration_batches(data, 1, vocab if isinstance(vocab, int) else None)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


class _Runner:
    """Calls a module on a batch and returns its final hidden state."""

    def __init__(self, model: nn.Module):
        self.module = final_hidden_module(model)
        self.extra = _forward_kwargs(self.module)
        self.device = _module_device(self.module)

    def __call__(self, batch) -> torch.Tensor:
        return block_output(_call_model(self.module, _to_device(batch, self.device), self.extra))


def _sq_error(y: torch.Tensor, target: torch.Tensor, batch):
    if tuple(y.shape) != tuple(target.shape):
        raise ValueError(f"teacher and model outputs differ in shape: teacher {tuple(target.shape)}, "
                         f"model {tuple(y.shape)}")
    return _masked_sq_error(y.float(), target.to(y.device, torch.float32), _batch_mask(batch))


def _mean_error(student: _Runner, teacher: _Runner, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            s, n = _sq_error(student(b), teacher(b), b)
            total += float(s)
            count += n
    return total / max(count, 1)


def _order(n: int, steps: int, seed: int) -> list:
    """Window index of every step: a fresh seeded permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps:
        order += torch.randperm(n, generator=g).tolist()
    return order[:steps]


def distill(
    model: nn.Module,
    teacher: nn.Module,
    data,
    *,
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    betas=DEFAULT_BETAS,
    weight_decay: float = 0.0,
    warmup: float = DEFAULT_WARMUP,
    seed: int = 0,
    teacher_cache_mb: float | None = None,
    tmpdir=None,
    eval_data=None,
    verbose: bool = True,
) -> DistillReport:
    """Train the quantized layers' scales and zeros of ``model`` to match ``teacher``'s final hidden states.

    Args:
        model: a quantized model (``decoupleq.quantize`` with any method, or
            ``decoupleq.load``); changed in place: only its quantized layers'
            ``scale`` and (asymmetric) ``zero``. Its codes, other parameters,
            ``requires_grad`` flags and training flag are as before.
        teacher: the full-precision model with the same architecture (not
            changed; its training flag is restored).
        data: the training windows, as ``decoupleq.quantize`` takes them: a
            LongTensor (num_samples, seq_len) of token ids (split into batches
            of one row), a list of tensors or dicts of model inputs.
        steps: optimizer steps, one window each; None: one epoch (every window
            once). More steps than windows start further epochs.
        lr, betas, weight_decay: AdamW's (defaults 3e-4, (0.9, 0.95), 0).
        warmup: fraction of the steps of linear warm-up before the cosine decay
            (default 0.1; see ``lr_at``).
        seed: seeds the order of the windows.
        teacher_cache_mb: None runs the teacher at every step; a number runs it
            once per window before training and caches its outputs, this many
            MiB in RAM and the rest in memory-mapped temporary files (0: all
            on disk). Both give the same result.
        tmpdir: parent folder of those files (default: the system temporary folder).
        eval_data: optional held-out windows (same forms as ``data``): the
            report gets their MSE before and after.
        verbose: a tqdm progress bar with the running loss, and log lines at INFO.

    Returns:
        A ``DistillReport``.

    Raises:
        TypeError / ValueError: naming the argument, before anything changes
            (model without quantized layers, teacher that is the model or
            differs in hidden or vocabulary size, steps < 1, lr <= 0...). A
            teacher whose outputs differ in shape from the model's raises at
            the first step. If training fails part-way, the scales and zeros
            are put back as they were before the call.
    """
    _check_args(model, teacher, steps, lr, betas, weight_decay, warmup, seed, teacher_cache_mb, tmpdir, verbose)
    batches = _batches(data, "data", model)
    held_out = None if eval_data is None else _batches(eval_data, "eval_data", model)
    steps = len(batches) if steps is None else steps
    info = log.info if verbose else log.debug
    t0 = time.perf_counter()

    student_run, teacher_run = _Runner(model), _Runner(teacher)
    grad_flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model_training, teacher_training = model.training, teacher.training
    params = prepare_for_sft(model, scales=True, zeros=True, norms=False, biases=False)
    saved = [p.detach().clone() for p in params]
    n_params = sum(p.numel() for p in params)
    cache = None
    bar = None
    ok = False
    try:
        model.eval()  # dropout off during training too: the target is deterministic
        teacher.eval()
        order = _order(len(batches), steps, seed)
        if teacher_cache_mb is not None:
            cache = ActivationCache(MemoryBudget(int(teacher_cache_mb * 2**20)), tmpdir, name="teacher")
            slot = {}
            with torch.no_grad():
                for i in order:
                    if i not in slot:
                        slot[i] = len(cache)
                        cache.append(teacher_run(batches[i]))
            info("distill: cached the teacher's outputs for %d windows (%d on disk)", len(cache), cache.n_on_disk)
        eval_before = _mean_error(student_run, teacher_run, held_out) if held_out else None

        info("distill: %d steps over %d windows, %d scalars trained, lr %g", steps, len(batches), n_params, lr)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="distill", unit="step", disable=not verbose)
        opt = _Adam(params, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=weight_decay, decoupled=True)
        losses, running = [], None
        for step, i in enumerate(order):
            batch = batches[i]
            if cache is not None:
                target = cache[slot[i]]
            else:
                with torch.no_grad():
                    target = teacher_run(batch)
            s, n = _sq_error(student_run(batch), target, batch)
            loss = s / max(n, 1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill: the loss is {loss.item()} at step {step}")
            opt.zero_grad()
            loss.backward()
            opt.lr = lr_at(step, steps, lr, warmup)
            opt.step()
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}", refresh=False)
        opt.zero_grad()
        eval_after = _mean_error(student_run, teacher_run, held_out) if held_out else None
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if cache is not None:
            cache.close()
        if not ok:  # leave the model as it came
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        for p, flag, grad in grad_flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(model_training)
        teacher.train(teacher_training)

    k = max(1, steps // 10)
    report = DistillReport(
        steps=steps, seconds=time.perf_counter() - t0, loss_start=sum(losses[:k]) / k,
        loss_end=sum(losses[-k:]) / k, losses=losses, eval_before=eval_before, eval_after=eval_after,
        n_params=n_params, teacher_cached=cache is not None,
    )
    info("distill: loss %.6g -> %.6g in %d steps, %.1f s%s", report.loss_start, report.loss_end, steps,
         report.seconds, "" if held_out is None else f"; held-out MSE {eval_before:.6g} -> {eval_after:.6g}")
    return report


class _CallableModule(type(os)):
    """``decoupleq.distill`` is this module when it was imported before the
    function was looked up (``from decoupleq.distill import ...`` binds the
    package attribute to the module): calling it calls ``distill``."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
