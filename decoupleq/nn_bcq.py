"""``BCQLinear``: a linear layer whose weight is binary-coding quantized.

The weight is ``w[r, c] = sum_i alpha[r, g, i] * beta_i(k[r, c]) + offset[r, g]``
(``g = c // group_size``; see ``decoupleq/bcq.py`` for the sign convention,
the rounding and the packed layout). Same contract as ``QuantLinear``:

    planes: uint32 (out_features, row_words) buffer, the level indices in the
        packed layout "decoupleq-bcq-lanes8-v1" (never trained).
    alpha:  float32 (out_features, G, bits) ``nn.Parameter`` (the alpha' of
        UniQuanF's unification, trained by SFT).
    offset: float32 (out_features, G) ``nn.Parameter`` (delta').
    bias:   (out_features,) in the original layer's dtype, or None.

Inference: with no gradient needed (grad mode off, or neither the input nor
a float part requires grad), a CPU forward runs the C kernels straight from
``planes`` and the CURRENT float32 ``alpha`` and ``offset`` (nothing cached,
so SFT updates are used as they are): up to ``SMALL_BATCH_MAX`` rows through
the packed kernel, more rows dequantized by the C core and multiplied by
torch's GEMM (as ``QuantLinear`` does, for the same reason). Otherwise the
torch path runs (``BCQLinearFunction``): the 2**bits levels of every group
are computed from ``alpha`` and ``offset`` and gathered by index, tile of
output rows by tile, so the weight is differentiable in both. As in
``QuantLinear``'s training path, no float weight is kept for backward (it is
rebuilt there from the uint8 indices), so a layer adds only its input to the
autograd graph. With ``W = levels[idx]`` and ``y = x W^T + b``:

    grad_x             = grad_y W
    grad_level[r,g,k]  = sum over columns c of group g with idx[r,c] == k of (grad_y^T x)[r,c]
    grad_alpha[r,g,i]  = sum_k grad_level[r,g,k] * beta_i(k)
    grad_offset[r,g]   = sum_k grad_level[r,g,k]

Every path rounds the levels the same way, so ``dequantize()`` equals
``BCQWeight.dequantize()`` and the C dequantizer bit for bit; the kernels'
outputs agree with ``F.linear`` on that weight up to float32 summation order.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import torch_ops
from .bcq import FORMAT, MAX_BITS, BCQWeight, bits_per_weight, row_words
from .nn import SMALL_BATCH_MAX, _hf_conv1d_class, is_hf_conv1d

__all__ = ["BCQLinear", "BCQLinearFunction"]

#: Most weights of W (and of grad_W) materialised at once, as in ``decoupleq.sft``.
TILE_ELEMENTS = 1 << 20

_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _signs(bits: int, dtype, device) -> torch.Tensor:
    """(2**bits, bits): beta_i(k), +1 where bit (bits - 1 - i) of k is 0, else -1."""
    k = torch.arange(1 << bits, device=device)
    cols = [1.0 - 2.0 * ((k >> (bits - 1 - i)) & 1).to(dtype) for i in range(bits)]
    return torch.stack(cols, dim=1)


def _levels(alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(m, G, 2**bits) levels from alpha (m, G, bits) and offset (m, G): the terms
    +-alpha_i added in plane order from 0, then the offset (``decoupleq.bcq``'s rounding)."""
    bits = alpha.shape[-1]
    sign = _signs(bits, alpha.dtype, alpha.device)
    acc = torch.zeros(*offset.shape, sign.shape[0], dtype=alpha.dtype, device=alpha.device)
    for i in range(bits):
        acc = acc + alpha[:, :, i : i + 1] * sign[:, i]
    return acc + offset.unsqueeze(-1)


def _tile_weight(levels: torch.Tensor, idx: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of W = levels[idx] as (rows, n)."""
    rows, n = r1 - r0, idx.shape[1]
    G = levels.shape[1]
    ix = idx[r0:r1].to(torch.int64).view(rows, G, n // G)
    return torch.gather(levels[r0:r1], 2, ix).view(rows, n)


class BCQLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = levels(alpha, offset)[idx]``, W rebuilt per tile, never kept.

    ``apply(x, idx, alpha, offset, bias, tile_rows)``: x (N, n) float; idx uint8 (m, n),
    never differentiated; alpha (m, G, bits); offset (m, G); bias (m,) or None; tile_rows
    output rows per tile (None: ``TILE_ELEMENTS // n``). Returns (N, m) in the CPU autocast
    dtype under autocast (float32 and lower inputs), else ``x.dtype``; float64 inputs or
    parameters compute in float64 (for ``gradcheck``).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, idx, alpha, offset, bias, tile_rows):
        cdtype = torch.float64 if torch.float64 in (x.dtype, alpha.dtype, offset.dtype) else torch.float32
        if torch.is_autocast_enabled("cpu") and x.dtype in _LOW_PRECISION:
            out_dtype = torch.get_autocast_dtype("cpu")
        else:
            out_dtype = x.dtype
        m, n = idx.shape
        rows = tile_rows if tile_rows is not None else max(1, TILE_ELEMENTS // max(n, 1))
        tiles = [(r0, min(r0 + rows, m)) for r0 in range(0, m, rows)]
        with torch.autocast("cpu", enabled=False):
            xc = x.to(cdtype)
            lv = _levels(alpha.to(cdtype), offset.to(cdtype))
            y = torch.empty(x.shape[0], m, dtype=cdtype, device=x.device)
            for r0, r1 in tiles:
                y[:, r0:r1] = xc @ _tile_weight(lv, idx, r0, r1).t()
            if bias is not None:
                y += bias.to(cdtype)
        need_x = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if need_x else None, idx, alpha, offset)
        ctx.cdtype, ctx.tiles, ctx.x_dtype = cdtype, tiles, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y):
        x, idx, alpha, offset = ctx.saved_tensors
        cdtype = ctx.cdtype
        need_gx, _, need_ga, need_go, need_gb = ctx.needs_input_grad[:5]
        gx = ga = go = gb = None
        m, n = idx.shape
        G, bits = alpha.shape[1], alpha.shape[2]
        with torch.autocast("cpu", enabled=False):
            gy = grad_y.to(cdtype)
            lv = _levels(alpha.to(cdtype), offset.to(cdtype))
            xc = None if x is None else x.to(cdtype)
            glv = torch.zeros_like(lv) if (need_ga or need_go) else None
            for r0, r1 in ctx.tiles:
                gy_t = gy[:, r0:r1]
                if need_gx:
                    w = _tile_weight(lv, idx, r0, r1)
                    gx = gy_t @ w if gx is None else gx.addmm_(gy_t, w)
                    del w
                if glv is not None:
                    rows = r1 - r0
                    gw = (gy_t.t() @ xc).view(rows, G, n // G)
                    ix = idx[r0:r1].to(torch.int64).view(rows, G, n // G)
                    glv[r0:r1].scatter_add_(2, ix, gw)
                    del gw, ix
            if glv is not None:
                if need_ga:
                    ga = (glv @ _signs(bits, cdtype, glv.device)).to(alpha.dtype)
                if need_go:
                    go = glv.sum(-1).to(offset.dtype)
            if need_gb:
                gb = gy.sum(0).to(ctx.bias_dtype)
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        return gx, None, ga, go, gb, None


class BCQLinear(nn.Module):
    """A linear layer with a BCQ weight (see the module docstring).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: sign planes, 1..4.
        group_size: columns sharing alpha and offset (dividing in_features), or -1 per channel.
        bias: whether there is a bias.
        origin: "linear" or "conv1d" (a Hugging Face ``Conv1D``), for ``to_float``.
        method: the method that produced the weight (recorded, e.g. "uniquanf").
        bias_dtype: dtype of the bias.

    Forward: ``x (..., in_features)`` -> ``(..., out_features)`` in ``x.dtype``.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool = True,
                 origin: str = "linear", method: str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
        if origin not in ("linear", "conv1d"):
            raise ValueError(f"origin must be 'linear' or 'conv1d', got {origin!r}")
        if group_size == -1:
            n_groups = 1
        elif isinstance(group_size, int) and group_size > 0 and in_features % group_size == 0:
            n_groups = in_features // group_size
        else:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = bits
        self.group_size = group_size
        self.origin = origin
        self.method = method
        self.register_buffer("planes", torch.zeros(out_features, row_words(bits, in_features), dtype=torch.uint32))
        self.alpha = nn.Parameter(torch.zeros(out_features, n_groups, bits, dtype=torch.float32))
        self.offset = nn.Parameter(torch.zeros(out_features, n_groups, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.register_parameter("bias", None)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_bcq(cls, layer: nn.Module, weight: BCQWeight, method: str | None = None) -> "BCQLinear":
        """The BCQ twin of ``layer``.

        Args:
            layer: the ``nn.Linear`` (weight (out, in)) or Hugging Face ``Conv1D``
                (weight (in, out)) it replaces; its bias, bias dtype and device are kept.
            weight: a ``BCQWeight`` of shape (out, in) (for a Conv1D, of ``layer.weight.T``).
            method: recorded in ``quant_info()``.

        Raises:
            TypeError / ValueError: unsupported layer, shapes that do not match.
        """
        if isinstance(layer, nn.Linear):
            origin, out_f, in_f = "linear", layer.out_features, layer.in_features
        elif is_hf_conv1d(layer):
            origin, (in_f, out_f) = "conv1d", tuple(layer.weight.shape)
        else:
            raise TypeError(f"layer must be nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        if not isinstance(weight, BCQWeight):
            raise TypeError(f"weight must be a BCQWeight, got {type(weight).__name__}")
        if weight.shape != (out_f, in_f):
            raise ValueError(f"weight has shape {weight.shape} but {type(layer).__name__}({in_f} -> {out_f}) "
                             f"needs ({out_f}, {in_f})")
        q = cls(in_f, out_f, bits=weight.bits, group_size=weight.group_size, bias=layer.bias is not None,
                origin=origin, method=method,
                bias_dtype=layer.bias.dtype if layer.bias is not None else torch.float32)
        q.set_bcq(weight)
        if layer.bias is not None:
            with torch.no_grad():
                q.bias.copy_(layer.bias.detach())
        q.to(layer.weight.device)
        return q

    @classmethod
    def from_info(cls, info: dict) -> "BCQLinear":
        """An empty shell from ``quant_info()`` (used by ``decoupleq.load``)."""
        from ._io_schema import BIAS_DTYPES

        # A fixed table, never getattr(torch, <name from a file>).
        bias_dtype = BIAS_DTYPES[info["bias_dtype"]] if info.get("bias_dtype") else torch.float32
        return cls(int(info["in_features"]), int(info["out_features"]), bits=int(info["bits"]),
                   group_size=int(info["group_size"]), bias=bool(info["bias"]),
                   origin=info.get("origin", "linear"), method=info.get("method"), bias_dtype=bias_dtype)

    def set_bcq(self, weight: BCQWeight) -> None:
        """Replace indices, alpha and offset with those of ``weight`` (same shape, bits and groups)."""
        if weight.shape != (self.out_features, self.in_features) or weight.bits != self.bits \
                or tuple(weight.alpha.shape) != tuple(self.alpha.shape):
            raise ValueError(f"weight (shape {weight.shape}, bits {weight.bits}, alpha {weight.alpha.shape}) "
                             f"does not fit this layer ({self.out_features}, {self.in_features}), bits "
                             f"{self.bits}, alpha {tuple(self.alpha.shape)}")
        with torch.no_grad():
            self.planes.copy_(torch.from_numpy(weight.pack()))
            self.alpha.copy_(torch.from_numpy(weight.alpha))
            self.offset.copy_(torch.from_numpy(weight.offset))

    def _apply(self, fn, *args, **kwargs):
        # alpha and offset are float32 masters: model.to(bfloat16) must not round them.
        saved = (self.alpha.data, self.offset.data)
        out = super()._apply(fn, *args, **kwargs)
        for p, old in zip((self.alpha, self.offset), saved):
            if p.dtype != torch.float32:
                p.data = old.to(device=p.device)
        return out

    # ---- the weight -----------------------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        return self.offset.shape[1]

    @property
    def indices(self) -> torch.Tensor:
        """uint8 (out, in) level indices, unpacked from ``planes`` (a new tensor)."""
        from .bcq import unpack

        idx = unpack(self.planes.detach().cpu().numpy(), self.bits, self.in_features)
        return torch.from_numpy(idx).to(self.planes.device)

    def levels(self) -> torch.Tensor:
        """(out, G, 2**bits) levels, differentiable in alpha and offset, rounded as ``BCQWeight.levels``."""
        return _levels(self.alpha, self.offset)

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight, differentiable in alpha and offset."""
        return _tile_weight(self.levels(), self.indices, 0, self.out_features)

    def to_bcq(self) -> BCQWeight:
        """The current weight as a ``BCQWeight`` (NumPy copies)."""
        return BCQWeight(self.indices.cpu().numpy(), self.alpha.detach().cpu().numpy().copy(),
                         self.offset.detach().cpu().numpy().copy(), self.bits, self.group_size)

    # ---- forward --------------------------------------------------------------------------------

    def _needs_graph(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or self.alpha.requires_grad or self.offset.requires_grad or (
            self.bias is not None and self.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_graph(x):
            if x.ndim == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"x has shape {tuple(x.shape)}, expected (..., {self.in_features})")
            lead = x.shape[:-1]
            y = BCQLinearFunction.apply(x.reshape(-1, self.in_features), self.indices, self.alpha, self.offset,
                                        self.bias, None)
            return y.reshape(*lead, self.out_features)
        if x.is_cpu and x.is_floating_point() and x.numel() > 0 and x.shape[-1] == self.in_features \
                and self.planes.is_cpu and self.alpha.is_cpu and self.alpha.dtype == torch.float32 \
                and self.offset.dtype == torch.float32:
            if torch_ops.is_compiling():
                y = self._compiled_forward(x)
                if y is not None:
                    return y
            return self._kernel_forward(x)
        w = self.dequantize().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_hat.T (+ bias) by the C core; no autograd (the caller checked)."""
        planes = self.planes.contiguous().numpy()
        alpha = self.alpha.detach().contiguous().numpy()
        offset = self.offset.detach().contiguous().numpy()
        xd = x.detach()
        if xd.dtype != torch.float32:
            xd = xd.to(torch.float32)
        xn = xd.numpy()
        x2 = np.ascontiguousarray(xn.reshape(-1, self.in_features))
        y = torch_ops.bcq_matmul(x2, planes, alpha, offset, self.bits, self.in_features, self.group_size,
                                 torch.get_num_threads(), SMALL_BATCH_MAX)
        if self.bias is not None:
            y += self.bias.detach().cpu().to(torch.float32).numpy()
        y = torch.from_numpy(y.reshape(*xn.shape[:-1], self.out_features))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _compiled_forward(self, x: torch.Tensor):
        """While ``torch.compile`` traces: the kernel as the registered op ``decoupleq::bcq_linear``
        (same arithmetic as ``_kernel_forward``), or None where it cannot serve."""
        if not torch_ops.AVAILABLE or not (self.planes.is_contiguous() and self.alpha.is_contiguous()
                                           and self.offset.is_contiguous()):
            return None
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        b = None if self.bias is None else self.bias.to(device="cpu", dtype=torch.float32)
        y = torch.ops.decoupleq.bcq_linear(x2, self.planes, self.alpha, self.offset, b, self.bits,
                                           self.in_features, self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    # ---- export ---------------------------------------------------------------------------------

    def to_float(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding the dequantized weight."""
        with torch.no_grad():
            w = self.dequantize()
            if self.origin == "conv1d":
                layer = _hf_conv1d_class()(self.out_features, self.in_features)
                layer.weight.copy_(w.t())
                layer.bias.copy_(self.bias if self.bias is not None else torch.zeros(self.out_features))
                return layer
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def stored_bits_per_weight(self) -> float:
        """Bits per weight as stored: packed indices (padding included) plus float32 alpha and offset."""
        return bits_per_weight(self.bits, self.in_features, self.group_size)

    def quant_info(self) -> dict:
        """JSON-friendly description used by ``decoupleq.io``."""
        return {
            "type": "bcq_linear",
            "bits": self.bits,
            "group_size": self.group_size,
            "method": self.method,
            "codes": FORMAT,
            "origin": self.origin,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).replace("torch.", "") if self.bias is not None else None,
        }

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, origin={self.origin}")
