"""decoupleQ over BCQ levels: a Hessian-aware binary-coding quantizer for one layer (issue 13 item 4).

UniQuanF's unified initialisation (``uniquanf_init.unified_init``) fits each
group's BCQ levels to that group's weights alone. decoupleQ's view is that the
layer's output error ``(w_hat - w) H (w_hat - w)^T`` is what counts, and it
couples the groups of a row through H. ``decoupleq_bcq`` starts from the
unified initialisation and alternates decoupleQ's two steps on BCQ levels:

- float step: with the bit-planes fixed, the per-group scales ``alpha'`` (b per
  group) and offsets ``delta'`` (one per group) of a row are the least-squares
  solution under H, a ``(b + 1) G`` system per row (closed form);
- assignment: a GPTQ column sweep with error feedback through ``H^-1`` puts each
  weight on the nearest of its group's ``2^b`` levels.

Each row keeps the best state it has seen, so the result's objective is never
above the start's. The result is a plain ``BCQWeight``: it packs, saves, loads
and runs through the BCQ kernels like UniQuanF's output.

The C core is ``_C.bcq_solve`` (``csrc/dq_bcq_solve.c``); its twin is
``decoupleq.reference.bcq_solve``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _C
from ._arrays import as_float_matrix
from .bcq import BCQWeight, MAX_BITS
from .hessian import damp
from .uniquanf_init import unified_init

IMPLEMENTATIONS = ("c", "reference")
WEIGHTINGS = ("hessian_diag", "none")


@dataclass
class BCQSolveResult:
    """What ``decoupleq_bcq`` returns.

    Attributes:
        weight: the refined ``BCQWeight`` (m, n).
        loss: float64 (m,): ``(w_hat_r - w_r) H00 (w_hat_r - w_r)^T`` per row, H00 the damped Hessian.
        start_loss: float64 (m,): the same for the start.
        history: float64 (iters + 2,): the summed best loss at the start, after the
            first float step and after every (assignment, float step) round.
    """

    weight: BCQWeight
    loss: np.ndarray
    start_loss: np.ndarray
    history: np.ndarray


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")
    return int(value)


def decoupleq_bcq(W, H, bits: int, group_size: int = -1, *, iters: int = 4, act_order: bool = True,
                  percdamp: float = 0.01,
                  start: BCQWeight | None = None, clip_steps: int = 1, init_iters: int = 15,
                  init_weighting: str = "hessian_diag", impl: str = "c") -> BCQSolveResult:
    """Quantize one weight to BCQ levels by decoupleQ's alternation under its Hessian.

    Args:
        W: (m, n) weight, rows are output channels: a NumPy array or a CPU torch
            tensor of any float dtype (computed in float32). Not modified.
        H: (n, n) Hessian of the layer's inputs, undamped (as
            ``HessianAccumulator.hessian()`` returns it); float64 NumPy or torch. Not modified.
        bits: 2..4 sign planes.
        group_size: -1 (per-channel) or a divisor of n.
        iters: (assignment, float step) rounds after the first float step (0: the
            float step alone).
        act_order: the assignment visits columns by decreasing diag H (decoupleQ's default),
            else in natural order.
        percdamp: H00 = H + percdamp * mean(diag H) * I is the objective's matrix.
        start: a ``BCQWeight`` of W's shape, bits and group size to start from;
            None: UniQuanF's unified initialisation with ``clip_steps``,
            ``init_iters`` and ``init_weighting`` (``"hessian_diag"``: diag H00 as
            column weights, the UniQuanF default; ``"none"``: the paper's fit).
        impl: ``"c"`` (the C core) or ``"reference"`` (the NumPy twin; slow).

    Returns:
        A ``BCQSolveResult``.

    Raises:
        TypeError / ValueError naming the argument, before any work starts.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if init_weighting not in WEIGHTINGS:
        raise ValueError(f"init_weighting must be one of {WEIGHTINGS}, got {init_weighting!r}")
    bits = _check_int("bits", bits, 2, MAX_BITS)
    iters = _check_int("iters", iters, 0)
    if not isinstance(act_order, (bool, np.bool_)):
        raise TypeError(f"act_order must be a bool, got {type(act_order).__name__}")
    group_size = _check_int("group_size", group_size, -1)
    W32 = as_float_matrix(W, "W", np.float32)
    m, n = W32.shape
    if m == 0 or n == 0:
        raise ValueError(f"W must have at least one row and one column, got shape {W32.shape}")
    if group_size == 0 or (group_size > 0 and n % group_size):
        raise ValueError(f"group_size {group_size} does not divide in_features {n}")
    H64 = np.ascontiguousarray(as_float_matrix(H, "H", np.float64, shape=(n, n)))
    H00 = damp(H64, percdamp)
    if start is not None:
        if not isinstance(start, BCQWeight):
            raise TypeError(f"start must be a BCQWeight or None, got {type(start).__name__}")
        if start.shape != (m, n) or start.bits != bits or start.n_groups != (1 if group_size == -1 else n // group_size):
            raise ValueError(f"start must be a BCQWeight of shape {(m, n)}, bits={bits} and group_size={group_size}, "
                             f"got shape {start.shape}, bits={start.bits}, group_size={start.group_size}")
    else:
        hdiag = np.diag(H00).astype(np.float32) if init_weighting == "hessian_diag" else None
        start = unified_init(W32, bits, group_size, clip_steps=clip_steps, iters=init_iters, hdiag=hdiag).to_bcq()
    if impl == "c":
        fn = _C.bcq_solve
    else:
        from .reference.bcq_solve import bcq_solve as fn
    idx, alpha, offset, loss, history = fn(W32, H00, start.indices, start.alpha, start.offset, bits, group_size,
                                           iters=iters, act_order=bool(act_order))
    weight = BCQWeight(indices=idx, alpha=alpha, offset=offset, bits=bits, group_size=group_size)
    return BCQSolveResult(weight=weight, loss=loss, start_loss=_start_loss(W32, H00, start), history=history)


def _start_loss(W32: np.ndarray, H00: np.ndarray, start: BCQWeight) -> np.ndarray:
    D = start.dequantize().astype(np.float64) - W32.astype(np.float64)
    return np.sum((D @ H00) * D, axis=1)
