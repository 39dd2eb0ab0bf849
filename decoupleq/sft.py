"""Supervised fine-tuning of the float parts of a quantized model.

After quantization every ``QuantLinear`` holds frozen int8 ``codes`` (a
buffer) and float ``scale`` / ``zero`` parameters (out, G). Fine-tuning those,
plus the normalization weights, recovers part of the quality lost to 2-bit
rounding at a small fraction of the cost of full fine-tuning:

    params = decoupleq.prepare_for_sft(model)          # everything else frozen
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss = model(input_ids=ids, labels=ids).loss     # ordinary PyTorch / HF Trainer
    loss.backward(); opt.step()

Training goes through ``QuantLinearFunction`` (``quant_linear`` is its
functional face). With ``W = codes * scale + zero`` (group by group) and
``y = x W^T + b`` for x (N, in):

    grad_x          = grad_y W
    grad_W          = grad_y^T x
    grad_scale[r,j] = sum_{c in group j} grad_W[r,c] * codes[r,c]
    grad_zero[r,j]  = sum_{c in group j} grad_W[r,c]

W is never kept between forward and backward: both recompute it from the
codes in tiles of output rows (at most ``TILE_ELEMENTS`` weights per tile),
and grad_W exists one tile at a time. So a layer adds only its input
activations to the autograd graph, as ``nn.Linear`` does, but no float
weight.

A ``QuantLinear`` at 2-4 bits on the CPU hands over its packed codes as they
are (its own buffer: nothing new is saved for backward). In float32 each tile
of W is then made by the C core's ``dequantize_packed`` in one threaded pass:
the same ``code * s + z``, rounded after the product and after the sum, so
the tile is bit for bit what the torch ops would give, in one pass instead of
an unpack, an int8-to-float copy, a multiply and an add (on a loaded 2-core
machine each torch op over the whole weight is also a thread barrier). The
int8 codes are unpacked only in backward, when grad_scale is needed.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the input is
saved as given (bf16), the arithmetic runs in float32 and the output has the
autocast dtype, like an autocast ``nn.Linear``. With float64 inputs or float
parts the arithmetic runs in float64 (for ``gradcheck``).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .blockwise import is_norm
from .nn import QUANT_MODULES, QuantLinear
from .nn_bcq import BCQLinear

log = logging.getLogger(__name__)

__all__ = ["QuantLinearFunction", "quant_linear", "prepare_for_sft", "sft_parameter_count", "TILE_ELEMENTS"]

#: Most weights of W (and of grad_W) materialised at once: 4 MiB of float32.
TILE_ELEMENTS = 1 << 20

_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _row_tiles(out_features: int, in_features: int, tile_rows: int | None):
    rows = tile_rows if tile_rows is not None else max(1, TILE_ELEMENTS // max(in_features, 1))
    rows = max(1, min(rows, out_features))
    return [(r0, min(r0 + rows, out_features)) for r0 in range(0, out_features, rows)]


def _group_split(n: int, n_groups: int, g: int) -> int:
    """Columns covered by the full groups: n, or (G - 1) g when the last group is short."""
    return n if n_groups * g == n else (n_groups - 1) * g


def _dequant_rows(codes, scale, zero, r0: int, r1: int, dtype, g: int):
    """Rows r0:r1 of ``codes * scale + zero`` as a (rows, in) tensor of ``dtype``.

    ``g`` is the group size (in when per-channel); the last of the ``G``
    groups is shorter when g does not divide in. The multiply and the add are
    two separately rounded operations, as in ``QuantLinear.dequantize``, so
    float32 tiles equal its rows bit for bit.
    """
    rows, n = r1 - r0, codes.shape[1]
    G = scale.shape[1]
    full = _group_split(n, G, g)
    # In place: one buffer per tile (it is recomputed for every step anyway).
    w = codes[r0:r1].to(dtype)
    head = w[:, :full].unflatten(1, (-1, g))  # a view of the full groups
    head.mul_(scale[r0:r1, :full // g].unsqueeze(-1))
    if zero is not None:
        head.add_(zero[r0:r1, :full // g].unsqueeze(-1))
    if full < n:  # the short last group
        w[:, full:].mul_(scale[r0:r1, G - 1:])
        if zero is not None:
            w[:, full:].add_(zero[r0:r1, G - 1:])
    return w


class _Codes:
    """The integer codes of one call: int8 ``codes`` (out, in), or ``packed`` uint32
    (out, row_words) in the ``decoupleq.packing`` layout with its ``bits``.

    ``fast`` when W can come from the C core: packed codes, float32 arithmetic
    and float32 C-contiguous CPU scale / zero (what ``QuantLinear`` holds)."""

    def __init__(self, codes, bits, in_f: int, scale, zero, cdtype):
        self.codes = codes if bits is None else None
        self.packed = None if bits is None else codes
        self.bits, self.in_f = bits, in_f
        self.fast = bits is not None and cdtype == torch.float32 and codes.is_cpu and all(
            t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in (scale, zero) if t is not None)
        if bits is not None and not self.fast:  # float64 arithmetic, another device: the torch path
            self.codes, self.packed = self.int8_rows(0, codes.shape[0]), None

    def int8_rows(self, r0: int, r1: int):
        """int8 (r1 - r0, in) codes of rows r0:r1."""
        if self.packed is None:
            return self.codes[r0:r1]
        from .packing import unpack

        p = self.packed
        return torch.from_numpy(unpack(p[r0:r1].detach().cpu().numpy(), self.bits, self.in_f)).to(p.device)

    def weight_rows(self, s, z, r0: int, r1: int, cdtype, g: int):
        """Rows r0:r1 of ``codes * scale + zero``, (rows, in) of ``cdtype`` (see ``_dequant_rows``)."""
        if not self.fast:
            return _dequant_rows(self.codes, s, z, r0, r1, cdtype, g)
        from . import _C

        w = _C.dequantize_packed(
            self.packed[r0:r1].numpy(), s[r0:r1].detach().numpy(),
            None if z is None else z[r0:r1].detach().numpy(), self.bits, self.in_f, g,
            threads=torch.get_num_threads())  # so torch.set_num_threads limits it too
        return torch.from_numpy(w)


def _group_sums(t, n_groups: int, g: int):
    """(rows, in) -> (rows, G): the sum over each group's columns (the last may be short)."""
    rows, n = t.shape
    full = _group_split(n, n_groups, g)
    head = t[:, :full].unflatten(1, (-1, g)).sum(-1)
    if full == n:
        return head
    return torch.cat([head, t[:, full:].sum(-1, keepdim=True)], dim=1)


class QuantLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = codes * scale + zero``, gradients straight from the codes.

    ``apply(x, codes, scale, zero, bias, tile_rows, group_size, bits)``:
        x: (N, in) float tensor (any float dtype).
        codes: int8 (out, in) when ``bits`` is None, else the uint32 (out,
            row_words) packed codes of a ``bits``-bit layer; never differentiated.
        scale: float (out, G), G = ceil(in / group_size) (1 per-channel).
        zero: float (out, G), or None (symmetric: zero fixed at 0, no gradient).
        bias: (out,) or None.
        tile_rows: output rows per tile of W, or None for the default
            (``TILE_ELEMENTS // in``).
        group_size: columns per group (``in`` or -1 per-channel); the last
            group is shorter when it does not divide in.
        bits: None, or 2-4 when ``codes`` is packed.
    Returns (N, out): the autocast dtype under CPU autocast (for float32 and
    lower inputs), else ``x.dtype``. Prefer :func:`quant_linear`, which checks
    its arguments and accepts any leading shape.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, codes, scale, zero, bias, tile_rows, group_size, bits=None):
        wide = [t for t in (x, scale, zero) if t is not None]
        cdtype = torch.float64 if any(t.dtype == torch.float64 for t in wide) else torch.float32
        if torch.is_autocast_enabled("cpu") and x.dtype in _LOW_PRECISION:
            out_dtype = torch.get_autocast_dtype("cpu")
        else:
            out_dtype = x.dtype
        out_f, in_f = codes.shape[0], x.shape[1]
        g = in_f if scale.shape[1] == 1 else group_size
        tiles = _row_tiles(out_f, in_f, tile_rows)
        src = _Codes(codes, bits, in_f, scale, zero, cdtype)
        # Autocast would run the matmuls below in bf16; the point is float32 accuracy.
        with torch.autocast("cpu", enabled=False):
            xc = x.to(cdtype)
            s = scale.to(cdtype)
            z = None if zero is None else zero.to(cdtype)
            if len(tiles) == 1:
                y = xc @ src.weight_rows(s, z, 0, out_f, cdtype, g).t()
            else:
                y = torch.empty(x.shape[0], out_f, dtype=cdtype, device=x.device)
                for r0, r1 in tiles:
                    y[:, r0:r1] = xc @ src.weight_rows(s, z, r0, r1, cdtype, g).t()
            if bias is not None:
                y += bias.to(cdtype)
        need_x = ctx.needs_input_grad[2] or (zero is not None and ctx.needs_input_grad[3])
        # x is kept as given (bf16 stays bf16); W is not kept at all, and the codes
        # as they came (packed codes are the layer's own buffer: no new memory).
        ctx.save_for_backward(x if need_x else None, codes, scale, zero)
        ctx.bits = bits
        ctx.in_f = in_f
        ctx.cdtype = cdtype
        ctx.tiles = tiles
        ctx.group = g
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y):
        x, codes, scale, zero = ctx.saved_tensors
        cdtype, tiles, g = ctx.cdtype, ctx.tiles, ctx.group
        need_gx, _, need_gs, need_gz, need_gb = ctx.needs_input_grad[:5]
        need_gz = need_gz and zero is not None
        gx = gs = gz = gb = None
        n_groups = scale.shape[1]
        src = _Codes(codes, ctx.bits, ctx.in_f, scale, zero, cdtype)
        with torch.autocast("cpu", enabled=False):
            gy = grad_y.to(cdtype)
            s = scale.to(cdtype)
            z = None if zero is None else zero.to(cdtype)
            xc = None if x is None else x.to(cdtype)
            if need_gs:
                gs = torch.empty(scale.shape, dtype=cdtype, device=scale.device)
            if need_gz:
                gz = torch.empty(zero.shape, dtype=cdtype, device=zero.device)
            for r0, r1 in tiles:
                gy_t = gy[:, r0:r1]
                if need_gx:
                    w = src.weight_rows(s, z, r0, r1, cdtype, g)
                    if gx is None:
                        gx = gy_t @ w
                    else:
                        gx.addmm_(gy_t, w)
                    del w
                if need_gs or need_gz:
                    gw = gy_t.t() @ xc  # (rows, in)
                    if need_gz:
                        gz[r0:r1] = _group_sums(gw, n_groups, g)
                    if need_gs:
                        # In place, by the int8 codes themselves (exact in float, and no
                        # float copy of them): this tile's grad_W is not needed after this.
                        gw.mul_(src.int8_rows(r0, r1))
                        gs[r0:r1] = _group_sums(gw, n_groups, g)
                    del gw
            if need_gb:
                gb = gy.sum(0).to(ctx.bias_dtype)
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        if gs is not None:
            gs = gs.to(scale.dtype)
        if gz is not None:
            gz = gz.to(zero.dtype)
        return gx, None, gs, gz, gb, None, None, None


def quant_linear(x, codes, scale, zero, bias, group_size, *, tile_rows=None):
    """``y = x W^T + b`` with ``W = codes * scale + zero``, differentiable in x, scale, zero and bias.

    Args:
        x: float tensor (..., in).
        codes: int8 (out, in) integer codes (not differentiated).
        scale: float (out, G) with ``G = ceil(in / group_size)`` (1 when ``group_size == -1``;
            the last group is shorter when group_size does not divide in).
        zero: float (out, G), or None for symmetric quantization (zero fixed at 0).
        bias: (out,) or None.
        group_size: columns per group, or -1 for per-channel.
        tile_rows: output rows of W recomputed at a time (None: at most
            ``TILE_ELEMENTS`` weights per tile).

    Returns:
        (..., out) in ``x.dtype``, or in the autocast dtype under CPU autocast.

    Raises:
        TypeError / ValueError: naming the argument, before any work.
    """
    for name, t in (("x", x), ("codes", codes), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        n_groups = 1
    elif group_size > 0:
        n_groups = -(-in_f // group_size)
    else:
        raise ValueError(f"group_size must be -1 (per-channel) or positive, got {group_size}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (..., {in_f})")
    if not scale.is_floating_point() or tuple(scale.shape) != (out_f, n_groups):
        raise ValueError(f"scale has shape {tuple(scale.shape)} ({scale.dtype}), expected float ({out_f}, {n_groups})")
    if zero is not None:
        if not isinstance(zero, torch.Tensor):
            raise TypeError(f"zero must be a torch.Tensor or None, got {type(zero).__name__}")
        if not zero.is_floating_point() or tuple(zero.shape) != (out_f, n_groups):
            raise ValueError(f"zero has shape {tuple(zero.shape)} ({zero.dtype}), expected float ({out_f}, {n_groups})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
    if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1):
        raise ValueError(f"tile_rows must be None or a positive int, got {tile_rows!r}")
    lead = x.shape[:-1]
    g = in_f if n_groups == 1 else group_size
    y = QuantLinearFunction.apply(x.reshape(-1, in_f), codes, scale, zero, bias, tile_rows, g)
    return y.reshape(*lead, out_f)


def _float_parts_need_grad(layer: QuantLinear) -> bool:
    return (
        layer.scale.requires_grad
        or (not layer.symmetric and layer.zero.requires_grad)
        or (layer.bias is not None and layer.bias.requires_grad)
    )


def uses_training_path(layer: QuantLinear, x: torch.Tensor) -> bool:
    """True when ``layer(x)`` must build an autograd graph (grad mode on, and x or a float part needs grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or _float_parts_need_grad(layer))


def quant_linear_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through :class:`QuantLinearFunction` (``QuantLinear.forward``'s training path).

    A packed layer (2-4 bits) passes its packed buffer, not unpacked codes: see
    the module docstring. Its shapes hold by construction; only x is checked.
    """
    zero = None if layer.symmetric else layer.zero
    packed = layer._buffers.get("packed")
    if packed is None:
        return quant_linear(x, layer.codes, layer.scale, zero, layer.bias, layer.group_size)
    in_f = layer.in_features
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (..., {in_f})")
    g = in_f if layer.scale.shape[1] == 1 else layer.group_size
    y = QuantLinearFunction.apply(x.reshape(-1, in_f), packed, layer.scale, zero, layer.bias, None, g, layer.bits)
    return y.reshape(*x.shape[:-1], layer.out_features)


def prepare_for_sft(model: nn.Module, scales: bool = True, zeros: bool = True, norms: bool = True,
                    biases: bool = False) -> list:
    """Freeze ``model`` except the chosen float parts, and return those parameters.

    Args:
        model: a module holding ``QuantLinear`` / ``QuantConv2d`` / ``BCQLinear``
            layers (after ``decoupleq.quantize`` or ``decoupleq.load``).
        scales: train every quantized layer's ``scale`` (a ``BCQLinear``'s ``alpha``).
        zeros: train every asymmetric quantized layer's ``zero`` (a
            symmetric layer's zero stays fixed at 0; a ``BCQLinear``'s ``offset``).
        norms: train the parameters of normalization modules (LayerNorm,
            GroupNorm, BatchNorm, RMSNorm and any module whose class name
            contains "Norm").
        biases: train the quantized layers' biases.

    Returns:
        The parameters to optimise (``requires_grad=True``), in module order,
        each once (tied parameters are not repeated). Every other parameter
        has ``requires_grad=False``; integer codes are buffers and never
        appear. The training flag of the model is not changed.

    Raises:
        TypeError: ``model`` is not a module, a flag is not a bool.
        ValueError: the model has no quantized layer, or nothing would be trained.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("scales", scales), ("zeros", zeros), ("norms", norms), ("biases", biases)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    quant = [m for m in model.modules() if isinstance(m, QUANT_MODULES + (BCQLinear,))]
    if not quant:
        raise ValueError("model has no QuantLinear / QuantConv2d / BCQLinear layer: quantize it "
                         "(or decoupleq.load it) first")

    chosen, seen = [], set()

    def pick(p):
        if p is not None and id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            chosen.append(p)

    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            if scales:
                pick(m.scale)
            if zeros and not m.symmetric:
                pick(m.zero)
            if biases:
                pick(m.bias)
        elif isinstance(m, BCQLinear):
            if scales:
                pick(m.alpha)
            if zeros:
                pick(m.offset)
            if biases:
                pick(m.bias)
        elif norms and is_norm(m):
            for p in m.parameters(recurse=False):
                pick(p)
    if not chosen:
        raise ValueError(
            f"nothing to train with scales={scales}, zeros={zeros}, norms={norms}, biases={biases}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    n_train = sum(p.numel() for p in chosen)
    n_all = sft_parameter_count(model)["model"]
    log.info("SFT of float parts: %d tensors, %d trainable values of %d in the model (%.3f%%)",
             len(chosen), n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return chosen


def sft_parameter_count(model: nn.Module) -> dict:
    """Counts for a report: trainable values, and the model's size.

    Returns:
        dict with ``trainable`` (values with ``requires_grad``), ``model``
        (every parameter value plus every quantized layer's integer code,
        i.e. the number of weights the model represents, tied tensors once)
        and ``codes`` (integer codes alone).
    """
    params = {id(p): p for p in model.parameters()}
    codes = sum(m.out_features * m.in_features for m in model.modules()
                if isinstance(m, QUANT_MODULES + (BCQLinear,)))
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values()) + codes
    return {"trainable": trainable, "model": total, "codes": codes}
