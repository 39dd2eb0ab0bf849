"""decoupleq: 2-bit post-training weight quantization with a C core for CPUs."""
from . import reference
from ._C import backend_info
from .config import QuantConfig
from .hessian import HessianAccumulator, damp
from .solver import QuantizedWeight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "HessianAccumulator",
    "QuantConfig",
    "QuantizedWeight",
    "backend_info",
    "damp",
    "quantize_weight",
    "reference",
    "__version__",
]
