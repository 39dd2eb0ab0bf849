"""Pure NumPy twins of every C entry point, written to read like ALGORITHM.md."""
from .packing import dequantize_packed, pack_codes, packed_matmul, unpack_codes
