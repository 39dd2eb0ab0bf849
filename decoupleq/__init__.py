"""decoupleq: 2-bit post-training weight quantization with a C core for CPUs."""
from . import reference
from ._C import backend_info
from .config import BlockTuneConfig, ModelQuantConfig, QuantConfig
from .hessian import HessianAccumulator, damp
from .solver import QuantizedWeight, quantize_weight

__version__ = "0.1.0"

# torch-dependent parts load on first use, so the core works without torch.
_LAZY = {
    "quantize": "pipeline",
    "QuantLinear": "nn",
    "QuantConv2d": "nn",
    "save": "io",
    "load": "io",
    "prepare_for_sft": "sft",
    "PackedWeight": "packing",
    "packed_linear": "kernels",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockTuneConfig",
    "HessianAccumulator",
    "ModelQuantConfig",
    "QuantConfig",
    "QuantizedWeight",
    "backend_info",
    "damp",
    "quantize_weight",
    "reference",
    "__version__",
    *_LAZY,
]
