"""``DecoupleQConfig``: the ``quantization_config`` of a decoupleq model in a Hugging Face folder.

``config.json`` of a folder written by ``save_pretrained`` (or ``decoupleq.save``)
holds, under ``quantization_config``::

    {"quant_method": "decoupleq", "format_version": 3,
     "bits": 2, "group_size": 64, "symmetric": false, "method": "decoupleq", "init": "neuqi",
     "layer_type": "linear", "bias_dtype": "float32",
     "layers": {"model.layers.0.self_attn.q_proj": {}, "model.layers.0.mlp.down_proj": {"bits": 4}, ...},
     "layer_losses": {"model.layers.0.self_attn.q_proj": 0.0213, ...},
     "settings": {...}}

``layers`` names every quantized module, each with its overrides of the
defaults above (only the keys in ``OVERRIDE_KEYS``: layer type
"linear" / "bcq_linear" / "conv2d", bits, group size, symmetric, method, bias
dtype). Everything else about a layer (in and out features, whether it has a
bias, a Hugging Face ``Conv1D`` origin, a convolution's geometry) comes from
the module the model class builds at that name, so the config cannot
contradict the architecture. ``settings`` is the full ``decoupleq.quantize``
configuration, for information only. ``layer_losses`` is each quantized
layer's relative loss in the run that made it (``decoupleq.layer_losses``; null
for none, absent in folders of earlier versions), what ``decoupleq info --plot``
draws; like ``layers`` it is covered by the shards' checksum of the config.
Tensors keep decoupleq's layout (format
version 3, ``decoupleq.io``): ``<layer>.packed`` / ``.codes``, ``.scale``,
``.zero``, ``.bias``, or a BCQ layer's ``.planes``, ``.alpha``, ``.offset``.

Every value is checked when the config is built (from ``config.json`` too), and
raises ``ValueError`` naming the key: a config is data from anywhere.
"""
from __future__ import annotations

import json
from collections import Counter

from transformers.utils.quantization_config import QuantizationConfigMixin

from ._io_schema import BIAS_DTYPES, MAX_JSON_DEPTH, check_layer, check_name, json_depth
from .layer_losses import check_stored, to_store

QUANT_METHOD = "decoupleq"
#: The tensor layout's version (that of ``decoupleq.io``'s single-file format 3).
FORMAT_VERSION = 3
LAYER_TYPES = ("linear", "bcq_linear", "conv2d")
#: Per-layer keys a config may override.
OVERRIDE_KEYS = ("type", "bits", "group_size", "symmetric", "method", "bias_dtype")
#: A model with more quantized layers than this is past any real one.
MAX_LAYERS = 1 << 20


def _check_default(name, value, where="quantization_config"):
    """Type and range of one default (the per-layer rules apply again once a layer is built)."""
    if name == "type":
        if value not in LAYER_TYPES:
            raise ValueError(f"{where}: 'layer_type' must be one of {LAYER_TYPES}, got {value!r}")
    elif name == "bits":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise ValueError(f"{where}: 'bits' must be an integer in [1, 8], got {value!r}")
    elif name == "group_size":
        if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or 1 <= value <= 1 << 24):
            raise ValueError(f"{where}: 'group_size' must be -1 or a positive integer, got {value!r}")
    elif name == "symmetric":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: 'symmetric' must be true or false, got {value!r}")
    elif name == "method":
        if value is not None and (not isinstance(value, str) or len(value) > 64):
            raise ValueError(f"{where}: 'method' must be a short string or null, got {value!r}")
    elif name == "bias_dtype":
        if value not in BIAS_DTYPES:
            raise ValueError(f"{where}: 'bias_dtype' must be one of {sorted(BIAS_DTYPES)}, got {value!r}")


class DecoupleQConfig(QuantizationConfigMixin):
    """The settings and the quantized layers of a decoupleq model (see the module docstring).

    Args:
        bits, group_size, symmetric, method: defaults of every layer in ``layers``.
        init: the start the solver used (informational).
        layer_type: default layer kind, "linear" (uniform codes), "bcq_linear" or "conv2d".
        bias_dtype: default dtype of a quantized layer's bias.
        layers: ``{module name: {override: value}}``, one entry per quantized module.
        settings: the ``decoupleq.quantize`` settings (JSON object, informational) or None.
        layer_losses: ``{module name: relative loss or None}`` of the quantization run, or None
            (``decoupleq.layer_losses``).
        format_version: the tensor layout's version; this decoupleq reads 3.

    Raises:
        ValueError: a value of the wrong type or out of range, named.
    """

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 64,
        symmetric: bool = False,
        method: str | None = "decoupleq",
        init: str | None = None,
        layer_type: str = "linear",
        bias_dtype: str = "float32",
        layers: dict | None = None,
        settings: dict | None = None,
        layer_losses: dict | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quantization_config: 'quant_method' must be {QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            raise ValueError(f"quantization_config: unknown keys {sorted(kwargs)[:5]}")
        if isinstance(format_version, bool) or format_version != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config: 'format_version' is {format_version!r}; this decoupleq reads {FORMAT_VERSION}"
            )
        for key, value in (("type", layer_type), ("bits", bits), ("group_size", group_size),
                           ("symmetric", symmetric), ("method", method), ("bias_dtype", bias_dtype)):
            _check_default(key, value)
        if init is not None and (not isinstance(init, str) or len(init) > 64):
            raise ValueError(f"quantization_config: 'init' must be a short string or null, got {init!r}")
        layers = {} if layers is None else layers
        if not isinstance(layers, dict) or len(layers) > MAX_LAYERS:
            raise ValueError("quantization_config: 'layers' must be an object of at most "
                             f"{MAX_LAYERS} module names")
        for name, over in layers.items():
            check_name(name, "quantization_config: layer")
            if not isinstance(over, dict):
                raise ValueError(f"quantization_config: layer {name!r}: overrides must be an object, got {over!r}")
            unknown = sorted(set(over) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(f"quantization_config: layer {name!r}: unknown keys {unknown} "
                                 f"(a layer may override {OVERRIDE_KEYS})")
            for key, value in over.items():
                _check_default(key, value, f"quantization_config: layer {name!r}")
        if settings is not None and (not isinstance(settings, dict) or json_depth(settings) > MAX_JSON_DEPTH):
            raise ValueError("quantization_config: 'settings' must be an object (nested at most "
                             f"{MAX_JSON_DEPTH} deep) or null")
        if layer_losses is not None:
            check_stored(layer_losses, "quantization_config", layers)
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.method = method
        self.init = init
        self.layer_type = layer_type
        self.bias_dtype = bias_dtype
        self.layers = {k: dict(v) for k, v in layers.items()}
        self.settings = settings
        self.layer_losses = None if layer_losses is None else dict(layer_losses)

    def to_dict(self) -> dict:
        """What config.json holds; no ``layer_losses`` key when there are none, so a model
        without figures writes the config an earlier decoupleq wrote."""
        d = super().to_dict()
        if d.get("layer_losses") is None:
            d.pop("layer_losses", None)
        return d

    def defaults(self) -> dict:
        return {"type": self.layer_type, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "method": self.method, "bias_dtype": self.bias_dtype}

    def canonical(self) -> dict:
        """The fields that decide what a file holds (digested into every shard's metadata).

        ``layer_losses`` is digested only when present, so the folders of earlier versions
        (which have none) keep the checksum they were written with."""
        out = {"format_version": self.format_version, "defaults": self.defaults(), "layers": self.layers}
        if self.layer_losses is not None:
            out["layer_losses"] = self.layer_losses
        return out

    @classmethod
    def from_model(cls, model) -> "DecoupleQConfig":
        """The config describing ``model``'s quantized layers as they are now."""
        from .io import LAYER_MODULES

        infos = {name: m.quant_info() for name, m in model.named_modules() if isinstance(m, LAYER_MODULES)}
        settings = getattr(model, "decoupleq_config", None)
        quant = settings.get("quant", {}) if isinstance(settings, dict) else {}
        # Defaults: the most common value of each key, so most layers need no override.
        defaults = {}
        for key in OVERRIDE_KEYS:
            values = [info[key] for info in infos.values()
                      if key in info and not (key == "bias_dtype" and not info["bias"])]
            defaults[key] = json.loads(Counter(map(json.dumps, values)).most_common(1)[0][0]) if values else None
        fallback = {"type": "linear", "bits": quant.get("bits", 2), "group_size": quant.get("group_size", 64),
                    "symmetric": quant.get("symmetric", False), "method": quant.get("method"),
                    "bias_dtype": "float32"}
        defaults = {k: (fallback[k] if v is None and k != "method" else v) for k, v in defaults.items()}
        layers = {}
        for name, info in infos.items():
            # BCQ layers have no "symmetric": a key a layer kind lacks is not an override.
            over = {k: info[k] for k in OVERRIDE_KEYS if k != "bias_dtype" and k in info and info[k] != defaults[k]}
            if info["bias"] and info.get("bias_dtype") != defaults["bias_dtype"]:
                over["bias_dtype"] = info["bias_dtype"]
            layers[name] = over
        init = quant.get("init")
        return cls(
            bits=defaults["bits"], group_size=defaults["group_size"], symmetric=defaults["symmetric"],
            method=defaults["method"], init=init if isinstance(init, str) else None,
            layer_type=defaults["type"], bias_dtype=defaults["bias_dtype"], layers=layers,
            settings=settings if isinstance(settings, dict) else None,
            layer_losses=to_store(model, layers),
        )

    def layer_info(self, name: str, module, what: str) -> dict:
        """The full description (``quant_info()`` form) of layer ``name`` whose float module is
        ``module`` (an ``nn.Linear``, Hugging Face ``Conv1D`` or ``nn.Conv2d``, on any device).

        Raises:
            ValueError: the module is not a layer of that kind, or the result fails
                ``decoupleq._io_schema.check_layer``; the message names the layer.
        """
        from torch import nn

        from .bcq import FORMAT as BCQ_FORMAT
        from .nn import PACKED_BITS, is_hf_conv1d
        from .packing import FORMAT as PACKED_FORMAT

        d = {**self.defaults(), **self.layers[name]}
        kind = d["type"]
        bias = getattr(module, "bias", None) is not None
        info = {"type": kind, "bits": d["bits"], "group_size": d["group_size"], "method": d["method"],
                "bias": bias, "bias_dtype": d["bias_dtype"] if bias else None}
        if kind in ("linear", "bcq_linear"):
            if isinstance(module, nn.Linear):
                origin, out_f, in_f = "linear", module.out_features, module.in_features
            elif is_hf_conv1d(module):
                origin, (in_f, out_f) = "conv1d", tuple(module.weight.shape)
            else:
                raise ValueError(f"{what}: quantized layer {name!r} is a {kind} but the model has a "
                                 f"{type(module).__name__} there")
            info.update(origin=origin, in_features=int(in_f), out_features=int(out_f))
            if kind == "linear":
                info.update(symmetric=d["symmetric"], codes=PACKED_FORMAT if d["bits"] in PACKED_BITS else "int8")
            else:
                info.update(codes=BCQ_FORMAT)
        else:
            if not isinstance(module, nn.Conv2d) or module.groups != 1:
                raise ValueError(f"{what}: quantized layer {name!r} is a conv2d but the model has a "
                                 f"{type(module).__name__} there")
            kh, kw = module.kernel_size
            info.update(
                symmetric=d["symmetric"], codes=PACKED_FORMAT if d["bits"] in PACKED_BITS else "int8",
                in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=[kh, kw],
                stride=list(module.stride), dilation=list(module.dilation), padding_mode=module.padding_mode,
                padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                in_features=module.in_channels * kh * kw, out_features=module.out_channels,
            )
        try:
            return check_layer(name, info, FORMAT_VERSION)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
