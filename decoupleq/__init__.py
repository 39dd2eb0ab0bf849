"""decoupleq: 2-bit post-training weight quantization with a C core for CPUs."""
from ._C import backend_info
from .config import QuantConfig

__version__ = "0.1.0"

__all__ = ["QuantConfig", "backend_info", "__version__"]
