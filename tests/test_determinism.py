"""Same inputs, same codes, scales, zeros and losses with 1, 2 and 3 threads, for every method.

The core's parallel loops split rows into chunks that depend only on the
thread count, and every row's arithmetic is its own, so the core's thread
count (DECOUPLEQ_NUM_THREADS) must not change a single bit of the result.
OpenBLAS's sgemm does round differently with 1, 2 and 3 threads, so the
solvers take their products from dq_sgemm_rows (fixed row blocks, each by
single-threaded BLAS): OpenBLAS's thread count (set_blas_threads) must not
change a bit either.  Layers: bench_solver.py's smallest shapes, W2 g64 (the
main job's setting) and W3 per-channel; and every method with every init on
a 128-row slice.
"""
import os

import numpy as np
import pytest

import decoupleq
from decoupleq import QuantConfig, _C
from decoupleq.config import INITS
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


def case(layers, method, rounding, shape, bits, group, init=None, rows=None):
    W, H = layers[shape]
    if rounding == "pgd" or rows:
        # PGD costs O(K2 m n^3): a 128-row slice of the layer, one step per column.
        W = np.ascontiguousarray(W[: rows or 128])
    config = QuantConfig(method=method, rounding=rounding, bits=bits, group_size=group,
                         iterations=4, pgd_steps_per_column=1, init=init)
    return W, H, config


def assert_identical(got, want):
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)
    np.testing.assert_array_equal(got.zero, want.zero)
    np.testing.assert_array_equal(got.loss, want.loss)


CASES = [((576, 576), 2, 64), ((1536, 576), 3, -1)]


# (core threads, BLAS threads) beside (1, 1): both pools wider, and each alone.
THREADS = [(2, 2), (3, 3), (1, 3), (3, 1)]


@pytest.mark.parametrize("method,rounding", METHODS)
@pytest.mark.parametrize("shape,bits,group", CASES)
def test_one_two_and_three_threads_everywhere_give_identical_results(layers, method, rounding, shape, bits, group):
    W, H, config = case(layers, method, rounding, shape, bits, group)
    one = quantize_with_threads(W, H, config, 1, 1)
    for core, blas in [(2, 1), *THREADS[:2]]:
        assert_identical(quantize_with_threads(W, H, config, core, blas), one)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("method,rounding", METHODS)
def test_every_method_and_init_is_independent_of_both_thread_counts(layers, method, rounding, init):
    # 128 rows: four of dq_sgemm_rows's 32-row blocks, so three threads each get some.
    W, H, config = case(layers, method, rounding, (576, 576), 2, 64, init=init, rows=128)
    one = quantize_with_threads(W, H, config, 1, 1)
    for core, blas in THREADS:
        assert_identical(quantize_with_threads(W, H, config, core, blas), one)


def test_hessian_does_not_depend_on_blas_threads():
    """The Hessian is summed over batches by OpenBLAS's ssyrk / dsyrk, which round differently
    with 2 or 3 threads (13,754 of these 331,776 entries moved): they run single-threaded."""
    from decoupleq.hessian import HessianAccumulator

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((256, 576)).astype(np.float32) for _ in range(3)]
    batches[1][:, 7] *= 40.0  # an outlier channel

    def hessian(blas):
        old = _C.backend_info()["blas_threads"]
        _C.set_blas_threads(blas)
        try:
            acc = HessianAccumulator(576)
            for X in batches:
                acc.add(X)
            return acc.hessian()
        finally:
            _C.set_blas_threads(old)

    one = hessian(1)
    for blas in (2, 3):
        np.testing.assert_array_equal(hessian(blas), one)
