"""UniQuanF's flexible-mapping quantizer (ALGORITHM 8) as a trainable torch module, and its unification.

For one weight ``W`` (m, n) with G groups of g inputs per row:

- ``sigma = exp(delta1 + delta2 + delta3)``: ``delta1 = log s`` per row and
  group, ``delta2`` elementwise, ``delta3`` per row (both start at 0);
- ``u = W / sigma + z - c - delta`` with ``c = (2**bits - 1)/2``, z the
  uniform zero and delta the BCQ shift (neither is trained);
- each element takes the nearest of the 2**bits levels
  ``level(k) = sum_i alpha_i beta_i(k)`` (alpha trained), by index;
- ``w_hat = s (level + delta + c - z)`` with ``s = exp(delta1)``.

Mapping: the first assignment is a full search; afterwards indices are
reassigned every ``period`` training forwards, and with ``local_mapping``
only among idx-1, idx, idx+1 (in index order, as the reference does).
Gradients: the straight-through estimator passes d w_hat / d u = s to
delta1..3 through ``W / sigma`` and sends alpha's gradient through the chosen
level; where ``|u - level| > min_i |alpha_i|`` both paths are blocked for
that element (gradient filtering). delta1 also gets its gradient through s.

After training, ``to_bcq()`` exports the unified BCQ weight
``alpha' = s alpha``, ``offset' = s (delta + c - z)`` with the final indices:
the same weights at no extra inference cost.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bcq import BCQWeight, level_signs
from .uniquanf_init import unified_init


class UniQuanFQuantizer(nn.Module):
    """The trainable UniQuanF quantizer of one weight matrix.

    Args:
        weight: float (m, n) tensor; a float32 copy is kept as a buffer.
        bits: 2..4.
        group_size: -1 (per-channel) or a divisor of n.
        clip_steps, init_iters, hdiag: the unified initialisation's settings
            (hdiag: None, or (n,) column weights, the Hessian's diagonal).
        period: reassign the indices every ``period`` updating forwards.
        local_mapping: reassign only among idx-1, idx, idx+1.
        grad_filter: gradient filtering on.

    ``forward()`` returns the float32 (m, n) quantized weight. Indices change
    only while ``updating`` is True (set it for training; evaluation passes
    then leave the assignment alone).
    """

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int = -1, *, clip_steps: int = 1,
                 init_iters: int = 15, hdiag=None, period: int = 2, local_mapping: bool = True,
                 grad_filter: bool = True):
        super().__init__()
        W = weight.detach().to("cpu", torch.float32).contiguous()
        m, n = W.shape
        init = unified_init(W, bits, group_size, clip_steps=clip_steps, iters=init_iters, hdiag=hdiag)
        G = init.scale.shape[1]
        self.bits, self.group_size, self.groups = int(bits), int(group_size), G
        self.period, self.local_mapping, self.grad_filter = int(period), bool(local_mapping), bool(grad_filter)
        self.c = ((1 << self.bits) - 1) / 2.0
        self.register_buffer("weight", W.clone())
        self.register_buffer("zero", torch.from_numpy(init.zero.copy()))
        self.register_buffer("shift", torch.from_numpy(init.delta.copy()))
        self.register_buffer("signs", torch.from_numpy(level_signs(self.bits)))  # (L, bits)
        self.delta1 = nn.Parameter(torch.from_numpy(np.log(init.scale)))
        self.delta2 = nn.Parameter(torch.zeros(m, n))
        self.delta3 = nn.Parameter(torch.zeros(m, 1))
        self.alpha = nn.Parameter(torch.from_numpy(init.alpha.copy()))
        self.updating = False
        self.calls = 0
        with torch.no_grad():  # the first assignment: a full search
            self.register_buffer("idx", self._assign(self._transformed()[1], None))

    # -- pieces ---------------------------------------------------------------

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        m, n = self.weight.shape
        return t.reshape(m, self.groups, n // self.groups)

    def levels(self) -> torch.Tensor:
        """float32 (m, G, 2**bits): ``sum_i alpha_i beta_i(k)``."""
        return self.alpha @ self.signs.T

    def _transformed(self):
        """(x, u), both (m, G, g): x = W / sigma + z, u = x - delta - c."""
        sigma = torch.exp(self.delta1[:, :, None] + self._grouped(self.delta2) + self.delta3[:, :, None])
        x = self._grouped(self.weight) / sigma + self.zero[:, :, None]
        u = x - self.shift[:, :, None] - self.c
        return x, u

    def _assign(self, u: torch.Tensor, prev) -> torch.Tensor:
        """Level indices int64 (m, G, g): full search if ``prev`` is None, else local."""
        u = u.detach()
        lev = self.levels().detach()
        if prev is None:
            return torch.argmin((u[..., None] - lev[:, :, None, :]).abs(), dim=-1)
        L = lev.shape[-1]
        cand = (prev[..., None] + torch.tensor([-1, 0, 1])).clamp_(0, L - 1)  # (m, G, g, 3)
        vals = torch.gather(lev[:, :, None, :].expand(*cand.shape[:3], L), 3, cand)
        pick = torch.argmin((u[..., None] - vals).abs(), dim=-1, keepdim=True)
        return torch.gather(cand, 3, pick).squeeze(-1)

    # -- forward --------------------------------------------------------------

    def _step_mapping(self, u: torch.Tensor) -> None:
        """Count an updating forward; every ``period``-th one reassigns the indices."""
        if self.updating:
            self.calls += 1
            if self.calls % self.period == 0:
                with torch.no_grad():
                    self.idx = self._assign(u, self.idx if self.local_mapping else None)

    def forward(self) -> torch.Tensor:
        """The quantized weight float32 (m, n), differentiable in delta1..3 and alpha.

        The value and the gradients are those of ``forward_autograd`` (tested
        equal); this path computes the transform once without a graph and
        writes the straight-through gradients out by hand, which took a
        training step on a SmolLM2 block from about 2 s to well under half of that.
        """
        with torch.no_grad():
            sigma = torch.exp(self.delta1[:, :, None] + self._grouped(self.delta2) + self.delta3[:, :, None])
            xs = self._grouped(self.weight) / sigma
            u = xs + self.zero[:, :, None] - self.shift[:, :, None] - self.c
        self._step_mapping(u)
        w_hat = _STEQuantize.apply(self.delta1, self.delta2, self.delta3, self.alpha, xs, u, self)
        return w_hat.reshape(self.weight.shape)

    def forward_autograd(self) -> torch.Tensor:
        """``forward`` written with torch autograd: the specification the fused path is tested against."""
        x, u = self._transformed()
        self._step_mapping(u)
        lev = self.levels()
        q = torch.gather(lev, 2, self.idx)  # alpha's gradient goes through the chosen level
        if self.grad_filter:
            thresh = self.alpha.detach().abs().min(dim=-1).values[:, :, None]
            far = (u.detach() - q.detach()).abs() > thresh
            q = torch.where(far, q.detach(), q)
            x = torch.where(far, x.detach(), x)
        w_int = q + self.shift[:, :, None] + self.c + (x - x.detach())
        w_hat = (w_int - self.zero[:, :, None]) * torch.exp(self.delta1)[:, :, None]
        return w_hat.reshape(self.weight.shape)

    def freeze(self) -> None:
        """One last reassignment by the training rule, then indices stay fixed."""
        with torch.no_grad():
            self.idx = self._assign(self._transformed()[1], self.idx if self.local_mapping else None)
        self.updating = False

    # -- unification ----------------------------------------------------------

    @torch.no_grad()
    def to_bcq(self) -> BCQWeight:
        """The unified BCQ weight of the current state (ALGORITHM 8 "Unification theorem").

        ``alpha' = s alpha``, ``offset' = s (delta + c - z)``, indices as assigned:
        its ``dequantize()`` equals ``forward()`` to float32 rounding.
        """
        s = torch.exp(self.delta1)
        alpha = (s[:, :, None] * self.alpha).contiguous()
        offset = s * (self.shift + self.c - self.zero)
        m, n = self.weight.shape
        return BCQWeight(
            indices=self.idx.reshape(m, n).to(torch.uint8).numpy(),
            alpha=alpha.numpy().astype(np.float32),
            offset=offset.numpy().astype(np.float32),
            bits=self.bits,
            group_size=self.group_size,
        )


class _STEQuantize(torch.autograd.Function):
    """w_hat = s (level(idx) + delta + c - z) with UniQuanF's straight-through gradients.

    Inputs: delta1 (m, G), delta2 (m, n), delta3 (m, 1), alpha (m, G, b) (the
    trained parameters), xs = W / sigma and u (m, G, g) computed without a
    graph, and the quantizer (for idx, zero, shift, signs, c, grad_filter).
    Gradients, per element where the filter lets them through:
    d w_hat / d delta_k = -s W / sigma (through x = W / sigma + z) and
    d w_hat / d alpha_i = s beta_i(idx); everywhere, delta1 also gets
    d w_hat / d log s = w_hat.
    """

    @staticmethod
    def forward(ctx, delta1, delta2, delta3, alpha, xs, u, quantizer):
        qz = quantizer
        lev = alpha @ qz.signs.T
        q = torch.gather(lev, 2, qz.idx)
        s = torch.exp(delta1)[:, :, None]
        w_hat = (q + qz.shift[:, :, None] + qz.c - qz.zero[:, :, None]) * s
        near = None
        if qz.grad_filter:
            thresh = alpha.abs().min(dim=-1).values[:, :, None]
            near = (u - q).abs() <= thresh
        ctx.save_for_backward(xs, s, w_hat, qz.idx, qz.signs, near)
        ctx.shape2 = delta2.shape
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        xs, s, w_hat, idx, signs, near = ctx.saved_tensors
        t = grad * s  # d loss / d x on the straight-through path
        if near is not None:
            t = t * near
        g2 = -(t * xs)
        g1 = (grad * w_hat).sum(-1) + g2.sum(-1)
        g3 = g2.sum(dim=(1, 2))[:, None]
        # Sum t per level index, then spread over the planes by the level's signs.
        bins = torch.zeros(idx.shape[0], idx.shape[1], signs.shape[0], dtype=t.dtype)
        bins.scatter_add_(2, idx, t)
        ga = bins @ signs
        return g1, g2.reshape(ctx.shape2), g3, ga, None, None, None


class UniQuanFLinear(nn.Module):
    """A linear layer whose weight is a ``UniQuanFQuantizer``'s output (training only).

    ``in_features``/``out_features`` and the bias (kept frozen) come from the
    replaced layer; the forward is ``F.linear(x, quantizer(), bias)`` in the
    input's dtype.
    """

    def __init__(self, layer: nn.Linear, quantizer: UniQuanFQuantizer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quantizer = quantizer
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantizer()
        b = self.bias
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
