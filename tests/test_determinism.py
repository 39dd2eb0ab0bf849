"""Same inputs, same codes, scales and zeros with 1 and 2 threads, for every method.

The core's parallel loops split rows into chunks that depend only on the
thread count, and every row's arithmetic is its own, so the core's thread
count (DECOUPLEQ_NUM_THREADS) must not change a single bit of the result.
OpenBLAS's thread count (set_blas_threads) must not change a code; it does
change decoupleQ's float-step scales in the last bits (an xfail below).  Layers: bench_solver.py's smallest shapes,
W2 g64 (the main job's setting) and W3 per-channel.
"""
import os

import numpy as np
import pytest

import decoupleq
from decoupleq import QuantConfig, _C
from decoupleq.reference.synthetic import synthetic_problem

METHODS = [("rtn", "gptq"), ("gptq", "gptq"), ("decoupleq", "gptq"), ("decoupleq", "pgd")]


def quantize_with_threads(W, H, config, core, blas):
    old_env = os.environ.get("DECOUPLEQ_NUM_THREADS")
    old_blas = _C.backend_info()["blas_threads"]
    os.environ["DECOUPLEQ_NUM_THREADS"] = str(core)
    _C.set_blas_threads(blas)
    try:
        info = _C.backend_info()
        assert (info["core_threads"], info["blas_threads"]) == (core, blas)
        return decoupleq.quantize_weight(W, H, config)
    finally:
        _C.set_blas_threads(old_blas)
        if old_env is None:
            del os.environ["DECOUPLEQ_NUM_THREADS"]
        else:
            os.environ["DECOUPLEQ_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def layers():
    return {shape: synthetic_problem(*shape, seed=0) for shape in [(576, 576), (1536, 576)]}


def case(layers, method, rounding, shape, bits, group):
    W, H = layers[shape]
    if rounding == "pgd":
        # PGD costs O(K2 m n^3): a 128-row slice of the layer, one step per column.
        W = np.ascontiguousarray(W[:128])
    config = QuantConfig(method=method, rounding=rounding, bits=bits, group_size=group,
                         iterations=4, pgd_steps_per_column=1)
    return W, H, config


CASES = [((576, 576), 2, 64), ((1536, 576), 3, -1)]


@pytest.mark.parametrize("method,rounding", METHODS)
@pytest.mark.parametrize("shape,bits,group", CASES)
def test_one_and_two_core_threads_give_identical_results(layers, method, rounding, shape, bits, group):
    W, H, config = case(layers, method, rounding, shape, bits, group)
    one = quantize_with_threads(W, H, config, 1, 1)
    two = quantize_with_threads(W, H, config, 2, 1)
    np.testing.assert_array_equal(two.codes, one.codes)
    np.testing.assert_array_equal(two.scale, one.scale)
    np.testing.assert_array_equal(two.zero, one.zero)
    np.testing.assert_array_equal(two.loss, one.loss)


@pytest.mark.parametrize("method,rounding", [("rtn", "gptq"), ("gptq", "gptq")])
@pytest.mark.parametrize("shape,bits,group", CASES)
def test_one_and_two_threads_everywhere_give_identical_results(layers, method, rounding, shape, bits, group):
    W, H, config = case(layers, method, rounding, shape, bits, group)
    one = quantize_with_threads(W, H, config, 1, 1)
    two = quantize_with_threads(W, H, config, 2, 2)
    np.testing.assert_array_equal(two.codes, one.codes)
    np.testing.assert_array_equal(two.scale, one.scale)
    np.testing.assert_array_equal(two.zero, one.zero)


# Not fixed: OpenBLAS's sgemm rounds differently with 2 threads than with 1
# (x @ w.T of 100x128 by 128x128 already differs in the last bits), and
# decoupleQ's float step takes its products from sgemm: its scales move by
# ~1e-5 relative with the BLAS thread count, and the next integer step can
# then round a few codes the other way (45 of 884,736 on this layer).
@pytest.mark.xfail(reason="OpenBLAS sgemm is not bit-identical across thread counts; the float step inherits it")
@pytest.mark.parametrize("shape,bits,group", CASES)
def test_decoupleq_codes_do_not_depend_on_blas_threads(layers, shape, bits, group):
    W, H, config = case(layers, "decoupleq", "gptq", shape, bits, group)
    one = quantize_with_threads(W, H, config, 1, 1)
    two = quantize_with_threads(W, H, config, 1, 2)
    np.testing.assert_array_equal(two.codes, one.codes)
    np.testing.assert_array_equal(two.scale, one.scale)
