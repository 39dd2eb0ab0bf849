"""Quantized layers: packed integer codes plus trainable float scale and zero.

The weight a layer computes with is ``codes * scale + zero`` group by group,
in float32, with the multiply and the add as two separately rounded float32
operations: exactly the arithmetic of ``QuantizedWeight.dequantize()`` in
NumPy, so ``QuantLinear(x) == F.linear(x, fake_quant_weight)`` bit for bit.

Layout (one convention for every origin):
    packed: uint32 (out_features, row_words), the buffer holding the codes
        at 2, 3 and 4 bits in the layout of ``decoupleq.packing`` (never
        trained). At 5 to 8 bits there is no packed layout and the buffer is
        ``codes`` itself, int8.
    codes: int8 (out_features, in_features), read-only: unpacked on every
        access at 2-4 bits (a new tensor; writing to it changes nothing, use
        ``set_codes``).
    scale: float32 (out_features, G) ``nn.Parameter``.
    zero:  float32 (out_features, G) ``nn.Parameter`` (zeros, and not trained
        by the block-wise tuning, when symmetric).
    bias:  (out_features,) in the original layer's dtype, or None.

A Hugging Face ``Conv1D`` stores its weight (in, out); its quantized form is
kept in the transposed (out, in) layout above and computed with ``F.linear``,
so scale and zero are (out, G) for every origin (the reference stores them
(G, out) for Conv1D; we do not). ``origin`` records where a layer came from so
``to_float()`` can rebuild the same module type.

Inference: when no gradient is needed (grad mode off, or neither the input
nor a float part requires grad), ``QuantLinear`` on the CPU at 2-4 bits runs
the packed kernels (``decoupleq.kernels``) straight from ``packed`` and the
CURRENT float32 ``scale`` and ``zero``, so values tuned by SFT are used as
they are, with nothing cached (up to ``SMALL_BATCH_MAX`` rows of input; more
rows are dequantized by the C core and multiplied by torch's GEMM, see
``_packed_forward``); inputs cross to NumPy without copies when
float32 and contiguous, other float dtypes are converted to float32 and the
output is cast back. The result agrees with ``F.linear`` on the dequantized
float32 weight up to float32 rounding (sums are ordered differently). While
``torch.compile`` traces, the same kernel call goes through the registered op
``torch.ops.decoupleq.packed_linear`` (``decoupleq.torch_ops``), so compiled
models have no graph breaks at these layers.
Otherwise (autograd, other devices, 5-8 bits) the torch path runs:
``decoupleq.sft`` for gradients, else the dequantized weight and F.linear.
``QuantConv2d`` always uses the torch path (codes unpacked per call).

Convolutions (``QuantConv2d``) flatten the kernel to (out, in * kh * kw) in
PyTorch's weight order (input channel, then kernel row, then column); groups
run along that flattened axis. Grouped convolutions (``groups > 1``) are not
supported.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _C, torch_ops

ORIGINS = ("linear", "conv1d")
#: Bit widths stored packed (and run by the packed kernels).
PACKED_BITS = (2, 3, 4)
#: Largest batch served straight from the packed codes (the C core's own threshold);
#: larger ones are dequantized and multiplied by torch.
SMALL_BATCH_MAX = _C.SMALL_BATCH_MAX


def _hf_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def is_hf_conv1d(module) -> bool:
    cls = _hf_conv1d_class()
    return cls is not None and isinstance(module, cls)


def _num_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return in_features // group_size


def _check_qweight(qw, out_features: int, in_features: int, what: str):
    codes = torch.as_tensor(qw.codes)
    scale = torch.as_tensor(qw.scale)
    zero = torch.as_tensor(qw.zero)
    if tuple(codes.shape) != (out_features, in_features):
        raise ValueError(
            f"qw.codes has shape {tuple(codes.shape)} but {what} needs ({out_features}, {in_features})"
        )
    if codes.dtype != torch.int8:
        raise TypeError(f"qw.codes must be int8, got {codes.dtype}")
    if scale.ndim != 2 or scale.shape[0] != out_features or in_features % max(scale.shape[1], 1):
        raise ValueError(
            f"qw.scale has shape {tuple(scale.shape)}, not (out_features={out_features}, G) "
            f"with G dividing in_features={in_features}"
        )
    if tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"qw.zero has shape {tuple(zero.shape)}, qw.scale {tuple(scale.shape)}")
    return codes, scale.to(torch.float32), zero.to(torch.float32)


class _QuantWeightMixin:
    """Shared storage and dequantization of (codes, scale, zero)."""

    def _init_quant(self, out_features, in_features, bits, group_size, symmetric, method):
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
        n_groups = _num_groups(in_features, group_size)
        self.bits = bits
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.method = method
        self._in_flat = int(in_features)
        zeros = torch.zeros(out_features, in_features, dtype=torch.int8)
        if bits in PACKED_BITS:
            self.register_buffer("packed", self._pack(zeros))
        else:
            self.register_buffer("codes", zeros)
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, dtype=torch.float32))
        self.zero = nn.Parameter(torch.zeros(out_features, n_groups, dtype=torch.float32))

    def _apply(self, fn, *args, **kwargs):
        # scale and zero are float32 masters: model.to(bfloat16) must not round them.
        # Device moves still apply; only the dtype is put back, from the exact old values.
        saved = (self.scale.data, self.zero.data)
        out = super()._apply(fn, *args, **kwargs)
        for p, old in zip((self.scale, self.zero), saved):
            if p.dtype != torch.float32:
                p.data = old.to(device=p.device)
        return out

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def is_packed(self) -> bool:
        """True when the codes live in the uint32 ``packed`` buffer (2-4 bits)."""
        return "packed" in self._buffers

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        from .packing import pack

        c = codes.detach().to("cpu", torch.int8).contiguous().numpy()
        return torch.from_numpy(pack(c, self.bits))

    @property
    def codes(self) -> torch.Tensor:
        """int8 (out, in_flat) codes; at 2-4 bits a fresh tensor unpacked from ``packed`` (read-only in effect)."""
        own = self._buffers.get("codes")
        if own is not None:
            return own
        packed = self._buffers.get("packed")
        if packed is None:  # before _init_quant
            raise AttributeError("codes")
        from .packing import unpack

        codes = torch.from_numpy(unpack(packed.detach().cpu().numpy(), self.bits, self._in_flat))
        return codes.to(packed.device)

    def set_codes(self, codes) -> None:
        """Replace the integer codes: int8 (out, in_flat) tensor or array in the signed ``bits`` range."""
        codes = torch.as_tensor(codes)
        want = (self.scale.shape[0], self._in_flat)
        if tuple(codes.shape) != want:
            raise ValueError(f"codes has shape {tuple(codes.shape)}, expected {want}")
        if codes.dtype != torch.int8:
            raise TypeError(f"codes must be int8, got {codes.dtype}")
        with torch.no_grad():
            if self.is_packed:
                self.packed.copy_(self._pack(codes))
            else:
                self.codes.copy_(codes)

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in_flat) weight ``codes * scale + zero``, differentiable in scale and zero."""
        codes = self.codes
        m, n = codes.shape
        g_count = self.scale.shape[1]
        grouped = codes.reshape(m, g_count, n // g_count).to(torch.float32)
        # Two separately rounded ops (not addcmul) so the result equals NumPy's float32 dequantize.
        w = grouped * self.scale.unsqueeze(-1)
        w = w + self.zero.unsqueeze(-1)
        return w.reshape(m, n)

    def _set_from(self, codes, scale, zero):
        self.set_codes(codes)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero.copy_(zero)

    def quant_info(self) -> dict:
        """JSON-friendly description used by ``decoupleq.io``."""
        from .packing import FORMAT

        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method,
            # how the codes are stored: buffer "packed" in this layout, or "codes" as int8
            "codes": FORMAT if self.is_packed else "int8",
        }


class QuantLinear(_QuantWeightMixin, nn.Module):
    """A linear layer whose weight is ``codes * scale + zero`` (see the module docstring).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: code width (2..8), signed codes in ``[-2**(bits-1), 2**(bits-1)-1]``.
        group_size: inputs sharing one scale and zero, or -1 for per-channel.
        symmetric: zero is fixed at 0.
        bias: whether the layer has a bias.
        origin: ``"linear"`` or ``"conv1d"`` (Hugging Face GPT-2 style layer).
        method: the solver that produced the codes (informational).
        bias_dtype: dtype of the bias (that of the original layer).

    Forward: ``x (..., in_features)`` of any float dtype ->
    ``(..., out_features)`` in ``x.dtype``. Without autograd on the CPU at 2-4
    bits: the packed kernel in float32 (see the module docstring). Otherwise
    the weight is dequantized in float32 and cast to ``x.dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool = False,
        bias: bool = True,
        origin: str = "linear",
        method: str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.origin = origin
        self._init_quant(self.out_features, self.in_features, bits, group_size, symmetric, method)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=bias_dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, layer: nn.Module, qw) -> "QuantLinear":
        """Build the quantized twin of ``layer`` from a ``QuantizedWeight``.

        Args:
            layer: an ``nn.Linear`` (weight (out, in)) or a Hugging Face
                ``Conv1D`` (weight (in, out)); its bias is copied.
            qw: a ``QuantizedWeight`` of shape (out, in): codes int8 (out, in),
                scale and zero float32 (out, G). For a Conv1D this is the
                quantization of ``layer.weight.T``.

        Raises:
            TypeError / ValueError: unsupported layer, shapes that do not match.
        """
        if isinstance(layer, nn.Linear):
            origin, out_f, in_f = "linear", layer.out_features, layer.in_features
        elif is_hf_conv1d(layer):
            origin, (in_f, out_f) = "conv1d", tuple(layer.weight.shape)
        else:
            raise TypeError(f"layer must be nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        codes, scale, zero = _check_qweight(qw, out_f, in_f, f"{type(layer).__name__}({in_f} -> {out_f})")
        cfg = qw.config
        group_size = -1 if scale.shape[1] == 1 else in_f // scale.shape[1]
        q = cls(
            in_f,
            out_f,
            bits=cfg.bits,
            group_size=group_size,
            symmetric=cfg.symmetric,
            bias=layer.bias is not None,
            origin=origin,
            method=cfg.method,
            bias_dtype=layer.bias.dtype if layer.bias is not None else torch.float32,
        )
        q._set_from(codes, scale, zero)
        if layer.bias is not None:
            with torch.no_grad():
                q.bias.copy_(layer.bias.detach())
        q.to(layer.weight.device)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The checks before the kernel are kept cheap: a decoder makes hundreds
        # of these calls per token, each only microseconds of kernel work.
        if torch.is_grad_enabled():
            from . import sft  # training: gradients from the codes, no dequantized weight kept for backward

            if sft.uses_training_path(self, x):
                return sft.quant_linear_forward(self, x)
        if x.is_cpu and x.is_floating_point() and x.numel() > 0 and x.shape[-1] == self.in_features:
            if torch_ops.is_compiling():
                y = self._compiled_forward(x)
                if y is not None:
                    return y
            views = self._kernel_views()
            if views is not None:
                return self._packed_forward(x, views)
        w = self.dequantize().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def __getstate__(self):
        # The NumPy views are a cache of this object's own tensors: a copy or a
        # pickle must not carry (and duplicate) them.
        state = self.__dict__.copy()
        state.pop("_views", None)
        return state

    def _kernel_views(self):
        """NumPy views (packed, scale, zero, bias or None) of the layer's LIVE tensors, or None
        when the kernel cannot serve (5-8 bits, not on the CPU, not float32 contiguous).

        Cached per decoding step's worth of calls, keyed by the tensors' data pointers: an
        in-place update (an optimizer step) is seen through the views as it happens, and a
        replaced tensor (``p.data = ...``, ``.to()``) has another address, because the cached
        view keeps the old memory alive until it is rebuilt here."""
        packed = self._buffers.get("packed")
        if packed is None:
            return None
        scale, zero, bias = self._parameters["scale"], self._parameters["zero"], self._parameters["bias"]
        key = (packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), None if bias is None else bias.data_ptr())
        cached = self.__dict__.get("_views")
        if cached is not None and cached[0] == key:
            return cached[1]
        ok = all(
            t.is_cpu and t.is_contiguous() and t.dtype == want
            for t, want in ((packed, torch.uint32), (scale, torch.float32), (zero, torch.float32))
        )
        views = None
        if ok:
            b = None
            if bias is not None and bias.is_cpu and bias.dtype == torch.float32 and bias.is_contiguous():
                b = bias.detach().numpy()
            elif bias is not None:
                b = "convert"  # another dtype or device: converted at each call
            views = (packed.numpy(), scale.detach().numpy(), zero.detach().numpy(), b)
        self.__dict__["_views"] = (key, views)
        return views

    def _packed_forward(self, x: torch.Tensor, views) -> torch.Tensor:
        """x @ W_hat.T (+ bias) with the packed kernel; no autograd (the caller checked)."""
        packed, scale, zero, bias = views
        xd = x.detach()
        if xd.dtype != torch.float32:
            xd = xd.to(torch.float32)
        # NumPy's reshape: a view (no copy) for contiguous input, and cheaper than torch's.
        xn = xd.numpy()
        x2 = np.require(xn.reshape(-1, self.in_features), requirements=["C", "A"])
        threads = torch.get_num_threads()  # so torch.set_num_threads limits us too
        y = torch_ops.uniform_matmul(x2, packed, scale, zero, self.bits, self.in_features, self.group_size,
                                     threads, SMALL_BATCH_MAX)
        if bias is not None:
            y += bias if not isinstance(bias, str) else self.bias.detach().cpu().to(torch.float32).numpy()
        y = torch.from_numpy(y.reshape(*xn.shape[:-1], self.out_features))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _compiled_forward(self, x: torch.Tensor):
        """While ``torch.compile`` traces: the packed kernel as the registered op
        ``decoupleq::packed_linear`` (same arithmetic as ``_packed_forward``), or None
        where the kernel cannot serve (the caller then takes the torch path)."""
        packed = self._buffers.get("packed")
        scale, zero, bias = self.scale, self.zero, self.bias
        if not torch_ops.AVAILABLE or packed is None or not all(
                t.is_cpu and t.is_contiguous() and t.dtype == want
                for t, want in ((packed, torch.uint32), (scale, torch.float32), (zero, torch.float32))):
            return None
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        b = None if bias is None else bias.to(device="cpu", dtype=torch.float32)
        y = torch.ops.decoupleq.packed_linear(x2, packed, scale, zero, b, self.bits, self.in_features,
                                              self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

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

    def quant_info(self) -> dict:
        info = super().quant_info()
        info.update(
            type="linear",
            origin=self.origin,
            in_features=self.in_features,
            out_features=self.out_features,
            bias=self.bias is not None,
            bias_dtype=str(self.bias.dtype).replace("torch.", "") if self.bias is not None else None,
        )
        return info

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}, "
            f"origin={self.origin}"
        )


class QuantConv2d(_QuantWeightMixin, nn.Module):
    """A 2-D convolution whose flattened weight (out, in * kh * kw) is ``codes * scale + zero``.

    Only ``groups == 1`` is supported. Padding modes other than ``"zeros"`` and
    string paddings (``"same"``/``"valid"``) behave as in ``nn.Conv2d``.

    Forward: ``x (N, C_in, H, W)`` -> ``(N, C_out, H', W')`` in ``x.dtype``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bits: int,
        group_size: int,
        symmetric: bool = False,
        bias: bool = True,
        method: str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        # Borrow nn.Conv2d's argument normalisation (tuples, "same" padding amounts).
        ref = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, padding_mode=padding_mode, bias=False, device="meta",
        )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = tuple(ref.kernel_size)
        self.stride = tuple(ref.stride)
        self.padding = ref.padding if isinstance(ref.padding, str) else tuple(ref.padding)
        self.dilation = tuple(ref.dilation)
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)
        in_flat = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_quant(self.out_channels, in_flat, bits, group_size, symmetric, method)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, dtype=bias_dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def in_features(self) -> int:
        return self._in_flat

    @property
    def out_features(self) -> int:
        return self.out_channels

    @classmethod
    def from_quantized(cls, layer: nn.Conv2d, qw) -> "QuantConv2d":
        """Build the quantized twin of ``layer`` from a ``QuantizedWeight`` of the
        flattened weight ``layer.weight.reshape(out, in * kh * kw)``.

        Raises:
            TypeError / ValueError: not a Conv2d, grouped, or shapes that do not match.
        """
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"grouped convolutions are not supported (groups={layer.groups})")
        out_c, in_c, kh, kw = layer.weight.shape
        codes, scale, zero = _check_qweight(qw, out_c, in_c * kh * kw, f"Conv2d({in_c} -> {out_c}, {kh}x{kw})")
        in_flat = in_c * kh * kw
        group_size = -1 if scale.shape[1] == 1 else in_flat // scale.shape[1]
        q = cls(
            in_c, out_c, (kh, kw), stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            padding_mode=layer.padding_mode, bits=qw.config.bits, group_size=group_size,
            symmetric=qw.config.symmetric, bias=layer.bias is not None, method=qw.config.method,
            bias_dtype=layer.bias.dtype if layer.bias is not None else torch.float32,
        )
        q._set_from(codes, scale, zero)
        if layer.bias is not None:
            with torch.no_grad():
                q.bias.copy_(layer.bias.detach())
        q.to(layer.weight.device)
        return q

    def weight4d(self) -> torch.Tensor:
        """The dequantized float32 (out, in, kh, kw) kernel."""
        return self.dequantize().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight4d().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, 1)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, 1)

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the dequantized kernel."""
        layer = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(self.weight4d())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def quant_info(self) -> dict:
        info = super().quant_info()
        info.update(
            type="conv2d",
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=list(self.kernel_size),
            stride=list(self.stride),
            padding=self.padding if isinstance(self.padding, str) else list(self.padding),
            dilation=list(self.dilation),
            padding_mode=self.padding_mode,
            in_features=self.in_features,
            out_features=self.out_features,
            bias=self.bias is not None,
            bias_dtype=str(self.bias.dtype).replace("torch.", "") if self.bias is not None else None,
        )
        return info

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bits={self.bits}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, bias={self.bias is not None}"
        )


QUANT_MODULES = (QuantLinear, QuantConv2d)


def quant_module_from_info(info: dict) -> nn.Module:
    """An empty ``QuantLinear``/``QuantConv2d`` shell from ``quant_info()`` (used by ``load``).

    Raises:
        ValueError: an unknown or incomplete description.
    """
    try:
        kind = info["type"]
        # By name from a fixed table: a file's string is never looked up as a torch attribute.
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
        if info.get("bias_dtype") and info["bias_dtype"] not in dtypes:
            raise ValueError(f"bias_dtype must be one of {sorted(dtypes)}, got {info['bias_dtype']!r}")
        bias_dtype = dtypes[info["bias_dtype"]] if info.get("bias_dtype") else torch.float32
        common = dict(
            bits=int(info["bits"]),
            group_size=int(info["group_size"]),
            symmetric=bool(info["symmetric"]),
            bias=bool(info["bias"]),
            method=info.get("method"),
            bias_dtype=bias_dtype,
        )
        if kind == "linear":
            return QuantLinear(
                int(info["in_features"]), int(info["out_features"]), origin=info.get("origin", "linear"), **common
            )
        if kind == "conv2d":
            padding = info["padding"]
            return QuantConv2d(
                int(info["in_channels"]), int(info["out_channels"]), tuple(info["kernel_size"]),
                stride=tuple(info["stride"]), padding=padding if isinstance(padding, str) else tuple(padding),
                dilation=tuple(info["dilation"]), padding_mode=info["padding_mode"], **common,
            )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"incomplete quantized-layer description {info!r}: {exc!r}") from None
    raise ValueError(f"unknown quantized layer type {kind!r}")
