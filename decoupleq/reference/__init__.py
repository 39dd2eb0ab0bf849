"""Pure NumPy twins of every C entry point, written to read like ALGORITHM.md."""
from .bcq import bcq_dequantize_packed, bcq_pack, bcq_packed_matmul, bcq_unpack
from .unified_init import bcq_init
from .float_step import float_step
from .gptq import gptq, round_gptq
from .grid import minmax_params, row_errors, rtn_codes
from .hessian import HessianAccumulator, damp
from .neuqi import neuqi_params
from .packing import dequantize_packed, pack_codes, packed_matmul, unpack_codes
from .pgd import round_pgd
from .shrink import shrink_search
from .solver import decoupleq, rtn
from .start import start_params
from .synthetic import synthetic_problem
