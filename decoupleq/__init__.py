"""decoupleq: 2-bit post-training weight quantization with a C core for CPUs."""
from ._C import backend_info
from .config import QuantConfig
from .hessian import HessianAccumulator, damp

__version__ = "0.1.0"

__all__ = ["HessianAccumulator", "QuantConfig", "backend_info", "damp", "__version__"]
