"""The C kernels as registered torch ops, so ``torch.compile`` traces quantized layers whole.

Dynamo cannot trace through NumPy views of tensors or a C extension call: each
``QuantLinear`` / ``BCQLinear`` would break the graph twice.  The layers' inference paths
therefore call, while compiling, ``torch.ops.decoupleq.packed_linear`` /
``torch.ops.decoupleq.bcq_linear``: ops registered with ``torch.library.custom_op`` (the
dispatcher sees an opaque CPU op), each with a fake implementation that gives the output's
shape and dtype without running the kernel.  Eager calls keep their direct path (an op
call through the dispatcher costs tens of microseconds, and a decoder makes hundreds of
layer calls per token); both paths run the same function below, so a compiled layer
returns exactly what the eager layer does.

Both ops: ``x`` float32 (N, in_features) on the CPU; the layer's CPU tensors (the packed
codes uint32 (out, row_words), float32 (out, G) float parts); ``bias`` float32 (out,) or
None; returns a new float32 (N, out_features).  No autograd: the layers use them only
when no gradient is needed (training goes through ``decoupleq.sft``).
"""
import importlib

import numpy as np
import torch

from . import _C

__all__ = ["uniform_matmul", "bcq_matmul", "AVAILABLE"]


def uniform_matmul(x2: np.ndarray, packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
                   in_features: int, group_size: int, threads: int, small_batch_max: int) -> np.ndarray:
    """``x2 @ W_hat.T`` for a uniform packed weight: float32 (N, in) C-contiguous -> new float32 (N, out).

    Up to ``small_batch_max`` rows straight from the packed codes, more through a dequantized weight.
    """
    if x2.shape[0] > small_batch_max:
        # Prefill: dequantize with the core's threads, multiply with torch's GEMM.
        # Inside a torch model, OpenBLAS's sgemm (packed_matmul's large-batch path)
        # leaves its workers spinning while torch's own threads run the rest of
        # the model: on 2 cores a SmolLM2 forward of 256 tokens took 2.5x longer
        # that way than with torch's GEMM (benchmarks/bench_prefill.py).
        w = _C.dequantize_packed(packed, scale, zero, bits, in_features, group_size, threads=threads)
        return (torch.from_numpy(x2) @ torch.from_numpy(w).t()).numpy()
    return _C.packed_matmul(x2, packed, scale, zero, bits, in_features, group_size, threads=threads)


def bcq_matmul(x2: np.ndarray, planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray, bits: int,
               in_features: int, group_size: int, threads: int, small_batch_max: int) -> np.ndarray:
    """``x2 @ W_hat.T`` for a BCQ weight: float32 (N, in) C-contiguous -> new float32 (N, out)
    (``small_batch_max`` as in :func:`uniform_matmul`)."""
    if x2.shape[0] > small_batch_max:
        # Prefill: as uniform_matmul, the core dequantizes and torch's GEMM multiplies.
        w = _C.bcq_dequantize_packed(planes, alpha, offset, bits, in_features, group_size, threads=threads)
        return (torch.from_numpy(x2) @ torch.from_numpy(w).t()).numpy()
    return _C.bcq_packed_matmul(x2, planes, alpha, offset, bits, in_features, group_size, threads=threads)


def _run(matmul, small_batch_max, x, codes, a, b, bias, bits, in_features, group_size):
    # The layer checked dtypes, devices and contiguity before the call; x may be a view.
    x2 = np.require(x.detach().numpy(), requirements=["C", "A"])
    y = matmul(x2, codes.numpy(), a.detach().numpy(), b.detach().numpy(), bits, in_features, group_size,
               torch.get_num_threads(), small_batch_max)
    if bias is not None:
        y += bias.detach().numpy()
    return torch.from_numpy(y)


def _fake(x, codes):
    return x.new_empty((x.shape[0], codes.shape[0]))


# torch.library.custom_op arrived in torch 2.4; with an older torch the layers are
# simply not compilable without graph breaks (AVAILABLE is False and they run eagerly).
AVAILABLE = hasattr(torch, "library") and hasattr(torch.library, "custom_op")

#: Both ops' schema; the three tensors of the weight are named per op.
_SCHEMA = ("(Tensor x, Tensor {}, Tensor {}, Tensor {}, Tensor? bias, int bits, int in_features, "
           "int group_size) -> Tensor")


def _register(qualname: str, weight_names: tuple, matmul, layer_module: str):
    """Register ``matmul`` (``uniform_matmul`` / ``bcq_matmul``) as the CPU op ``qualname``,
    with a fake that gives the output's shape without running it.

    ``weight_names``: the schema's names of the codes and the two float parts (what a caller
    passes by keyword); ``layer_module``: the layer's module, whose ``SMALL_BATCH_MAX`` is read
    at call time, as the eager layer reads it.
    """
    def kernel(x, codes, a, b, bias, bits, in_features, group_size):
        small_batch_max = importlib.import_module(layer_module).SMALL_BATCH_MAX
        return _run(matmul, small_batch_max, x, codes, a, b, bias, bits, in_features, group_size)

    op = torch.library.custom_op(qualname, kernel, mutates_args=(), device_types="cpu",
                                 schema=_SCHEMA.format(*weight_names))
    op.register_fake(lambda x, codes, *rest: _fake(x, codes))
    return op


if AVAILABLE:
    #: True while torch.compile traces (Dynamo treats the call as a constant).
    is_compiling = torch.compiler.is_compiling
    #: Uniform packed layer: see the module docstring.
    packed_linear = _register("decoupleq::packed_linear", ("packed", "scale", "zero"), uniform_matmul,
                              f"{__package__}.nn")
    #: BCQ layer: see the module docstring.
    bcq_linear = _register("decoupleq::bcq_linear", ("planes", "alpha", "offset"), bcq_matmul,
                           f"{__package__}.nn_bcq")
else:
    def is_compiling() -> bool:
        return False
