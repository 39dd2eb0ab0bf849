"""Pure NumPy twins of every C entry point, written to read like ALGORITHM.md."""
from .hessian import HessianAccumulator, damp
