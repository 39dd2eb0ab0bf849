"""decoupleq: 2-bit post-training weight quantization with a C core for CPUs."""
import os as _os

# The C core's OpenBLAS keeps its idle workers spinning for about 2^28 cycles
# after every call, on the cores the core's own threads need next: whole-layer
# solves ran 20-25% slower for it (2 cores).  Unless the user set it, workers
# sleep as soon as a call ends.  OpenBLAS reads this once, when _C loads it;
# the variable is restored afterwards so nothing else loaded later sees it.
_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT"
_user_timeout = _os.environ.get(_TIMEOUT)
_os.environ.setdefault(_TIMEOUT, "4")
try:
    from ._C import backend_info
finally:
    if _user_timeout is None:
        _os.environ.pop(_TIMEOUT, None)
    del _TIMEOUT, _user_timeout

from . import reference  # noqa: E402  (after _C: the environment above must come first)
from .config import BlockTuneConfig, ModelQuantConfig, QuantConfig, UniQuanFConfig
from .hessian import HessianAccumulator, damp
from .solver import QuantizedWeight, quantize_weight

__version__ = "0.1.0"

# transformers' from_pretrained / save_pretrained learn quantization method "decoupleq"
# (decoupleq.hf_quantizer), once transformers is imported.
from . import _hf_hook  # noqa: E402

_hf_hook.install()

# torch-dependent parts load on first use, so the core works without torch.
_LAZY = {
    "quantize": "pipeline",
    "quantize_from_disk": "stream",
    "QuantLinear": "nn",
    "QuantConv2d": "nn",
    "save": "io",
    "load": "io",
    "prepare_for_sft": "sft",
    "distill": "distill",
    "PackedWeight": "packing",
    "packed_linear": "kernels",
    "BCQWeight": "bcq",
    "bcq_from_uniform": "bcq",
    "BCQLinear": "nn_bcq",
    "decoupleq_bcq": "bcq_solve",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        obj = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        # Importing decoupleq.distill binds the submodule to this package's "distill";
        # the function of the same name must win for ``decoupleq.distill(...)``.
        globals()[name] = obj
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockTuneConfig",
    "HessianAccumulator",
    "ModelQuantConfig",
    "QuantConfig",
    "QuantizedWeight",
    "UniQuanFConfig",
    "backend_info",
    "damp",
    "quantize_weight",
    "reference",
    "__version__",
    *_LAZY,
]
