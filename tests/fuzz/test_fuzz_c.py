"""Every decoupleq._C entry point, called with random shapes, dtypes, layouts and
values (NaN, Inf, huge, subnormal, zero), valid and broken: each call returns
or raises a Python exception, never crashes; under the sanitized build
(tests/sanitize.sh) ASan and UBSan must stay silent too.

Each hypothesis example builds a coherent call (shapes that fit together, a
positive semi-definite Hessian) and then breaks 0-2 things about it, so the
calls reach the core as well as every check before it.  Arrays are made by
NumPy from a drawn seed (cheap), the choices by hypothesis (derandomized: a
fixed sequence per test).  DECOUPLEQ_FUZZ=1 is the long run; the count of
calls and their rate are printed at the end.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoupleq import _C

LONG = os.environ.get("DECOUPLEQ_FUZZ") == "1"
# Examples per test in the long run, sized for ~100,000 calls in all (about
# 10, 6, 6 and 5 calls per example); DECOUPLEQ_FUZZ_SCALE multiplies them.
LONG_EXAMPLES = {"layer": 5000, "hessian": 3000, "packed": 5000, "small": 1000, "init": 2000, "bcq": 2000}
SCALE = float(os.environ.get("DECOUPLEQ_FUZZ_SCALE", "1"))


def fuzz(kind):
    n = max(1, int(LONG_EXAMPLES[kind] * SCALE)) if LONG else 25
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)

CALLS = {"n": 0, "raised": 0, "start": time.perf_counter()}
# What a well-behaved boundary may raise for bad input.
EXPECTED = (TypeError, ValueError, OverflowError, MemoryError, KeyError)

DIMS = [1, 1, 2, 3, 7, 8, 16, 31, 33, 64, 0]
DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int32, np.uint32, np.int64, np.bool_]
EXTREME_INTS = [-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 4, 5, 7, 8, 9, 64, 2**31 - 1, 2**31, 2**62, 2**63 - 1]


def call(fn, *args, **kwargs):
    """One fuzzed call: a result or an expected Python exception."""
    CALLS["n"] += 1
    try:
        return fn(*args, **kwargs)
    except EXPECTED:
        CALLS["raised"] += 1
        return None


@pytest.fixture(scope="session", autouse=True)
def report_calls():
    yield
    secs = time.perf_counter() - CALLS["start"]
    print(f"\nfuzz: {CALLS['n']} calls into decoupleq._C ({CALLS['raised']} raised), "
          f"{secs:.1f} s, {CALLS['n'] / max(secs, 1e-9):.0f} calls/s")


# ---- values and layouts -------------------------------------------------------


def values(rng, shape, dtype, mode):
    """An array of `dtype` with a value pattern: normal, with NaN/Inf, huge, tiny."""
    x = rng.standard_normal(shape) * 0.1
    if np.dtype(dtype).kind in "iub":
        info = np.iinfo(dtype) if np.dtype(dtype).kind != "b" else None
        if info is None:
            return rng.random(shape) < 0.5
        lo, hi = (info.min, info.max) if mode == "huge" else (max(info.min, -8), min(info.max, 8))
        return rng.integers(lo, hi, size=shape, endpoint=True, dtype=dtype)
    big = float(np.finfo(dtype).max)
    flat = x.reshape(-1)
    if flat.size and mode != "normal":
        k = rng.integers(0, flat.size, size=max(1, flat.size // 7))
        flat[k] = {"nan": np.nan, "inf": np.inf, "ninf": -np.inf, "huge": big * 0.9, "halfhuge": big / 1.9,
                   "tiny": 1e-42, "zero": 0.0}.get(mode, 0.0)
        if mode == "allzero":
            flat[:] = 0.0
        if mode == "const":
            flat[:] = 0.25
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


MODES = ["normal"] * 6 + ["nan", "inf", "ninf", "huge", "halfhuge", "tiny", "zero", "allzero", "const"]


def relayout(a, how):
    """The same values in another memory layout (or another kind of object)."""
    if how == "same" or not isinstance(a, np.ndarray):
        return a
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided" and a.ndim >= 1:
        big = np.repeat(a, 2, axis=-1) if a.shape[-1] else a
        return big[..., ::2]
    if how == "unaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        out = raw[1:].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
    if how == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if how == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if how == "3d":
        return a.reshape(1, *a.shape)
    if how == "flat":
        return a.reshape(-1)
    if how == "list":
        return a.tolist()
    if how == "none":
        return None
    return a


LAYOUTS = ["same"] * 12 + ["fortran", "strided", "unaligned", "readonly", "swapped", "3d", "flat", "list", "none"]


class Draw:
    """Choices from hypothesis, bulk values from a seeded NumPy generator."""

    def __init__(self, data):
        self.data = data
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))

    def pick(self, options, label=None):
        return self.data.draw(st.sampled_from(options), label=label)

    def flag(self, p_true=0.5):
        return self.data.draw(st.floats(0, 1)) < p_true

    def array(self, shape, dtype, label, psd=False):
        """A coherent array most of the time; otherwise a broken one."""
        broken = self.flag(0.25)
        mode = self.pick(MODES, label + " values") if broken or self.flag(0.2) else "normal"
        if broken and self.flag(0.3):
            dtype = self.pick(DTYPES, label + " dtype")
        if broken and self.flag(0.3):
            shape = tuple(self.pick(DIMS) for _ in shape)
        if psd and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 0 and np.dtype(dtype).kind == "f":
            n = shape[0]
            X = self.rng.standard_normal((max(1, n // 2 + self.rng.integers(0, n + 1)), n))
            H = X.T @ X / X.shape[0] + 0.01 * np.eye(n)
            if mode != "normal":
                H = np.where(values(self.rng, shape, np.float64, mode) == 0, 0.0, H) if mode == "allzero" else H
                if mode in ("nan", "inf", "huge", "halfhuge"):
                    H[self.rng.integers(0, n), self.rng.integers(0, n)] = values(self.rng, (3,), np.float64, mode).max()
            if self.flag(0.1):
                H[0, -1] += 1.0  # asymmetric
            if self.flag(0.1):
                H = -H  # negative definite
            if self.flag(0.05):
                H = H * self.pick([1e-300, 1e30, 1e300, 2.0**100])
            with np.errstate(over="ignore", invalid="ignore"):
                a = H.astype(dtype)
        else:
            a = values(self.rng, shape, dtype, mode)
        layout = self.pick(LAYOUTS, label + " layout") if broken else "same"
        return relayout(a, layout)

    def integer(self, usual, label):
        return self.pick(EXTREME_INTS, label) if self.flag(0.15) else self.pick(usual, label)


# ---- one coherent layer problem, then broken bits ------------------------------


def layer(d):
    m, n = d.pick([1, 2, 3, 7, 16, 33], "m"), d.pick([1, 2, 8, 16, 24, 64], "n")
    divisors = [g for g in (1, 2, 4, 8, 16, 32, 64) if n % g == 0]
    group = d.integer(divisors + [-1, -1], "group_size")
    bits = d.integer([2, 2, 3, 4, 8], "bits")
    W = d.array((m, n), np.float32, "W")
    H = d.array((n, n), np.float64, "H00", psd=True)
    rule = d.pick(["half_up", "half_even", "half_up", "nearest", ""], "rule") if d.flag(0.1) else "half_up"
    return m, n, group, bits, W, H, rule


def params(d, m, n, group):
    G = n // group if isinstance(group, int) and group > 0 and n % group == 0 else 1
    S = d.array((m, G), np.float32, "S")
    # Mostly positive scales, as the solver makes them (broken ones stay broken).
    if isinstance(S, np.ndarray) and S.dtype.kind == "f" and S.flags.writeable and d.flag(0.8):
        with np.errstate(invalid="ignore", over="ignore"):
            np.abs(S, out=S)
            S += np.asarray(0.05, S.dtype)
    Z = d.array((m, G), np.float32, "Z")
    return S, Z


def codes(d, m, n, bits):
    b = bits if isinstance(bits, int) and 2 <= bits <= 8 else 2
    lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
    A = d.rng.integers(lo, hi, size=(m, n), endpoint=True).astype(np.int8)
    if d.flag(0.2):
        A = d.array((m, n), np.int8, "A")
    return A


@given(st.data())
@fuzz("layer")
def test_layer_solver_entry_points(data):
    d = Draw(data)
    m, n, group, bits, W, H, rule = layer(d)
    sym, act = d.flag(), d.flag()
    S, Z = params(d, m, n, group)
    A = codes(d, m, n, bits)
    p_row = d.array((m,), np.float32, "p_row") if d.flag(0.3) else None
    blocksize = d.integer([1, 2, 8, 128], "blocksize")
    call(_C.minmax_params, W, bits, group, sym, p_row=p_row)
    call(_C.rtn_codes, W, S, Z, bits, sym, rule)
    call(_C.row_errors, W, A, S, Z, H)
    call(_C.rtn, W, H, bits, group, sym, rule)
    call(_C.float_step, W, A, H, group, sym)
    call(_C.shrink_search, W, H, bits, group, sym, rule)
    call(_C.round_gptq, W, S, Z, H, bits, group, sym, act, rule, blocksize)
    call(_C.gptq, W, H, bits, group, sym, act, rule, blocksize)
    # Step counts and iterations stay small: they are work the caller asks
    # for (a huge one is a long run, not a bug); the extremes are refused
    # or clamped before any work and are tried with tiny layers only.
    k1, k2 = d.pick([-1, 0, 1, 2]), d.pick([-1, 0, 1, 3])
    lr = d.pick([1e-3, 0.0, -1.0, float("nan"), float("inf"), 1e30])
    call(_C.round_pgd, W, S, Z, H, bits, group, sym, act, rule, k1, k2, lr)
    iters = d.pick([-1, 0, 1, 2, 3])
    rounding = d.pick(["gptq", "gptq", "pgd", "adam"])
    call(_C.decoupleq, W, H, bits, group, sym, act, rule, iters, rounding, blocksize, k1, k2, lr)


@given(st.data())
@fuzz("hessian")
def test_hessian_entry_points(data):
    d = Draw(data)
    n = d.integer([1, 2, 7, 16, 33], "n_features")
    flush = d.integer([1, 3, 4096], "flush_tokens") if d.flag(0.3) else 4096
    skip = d.flag(0.3)
    state = call(_C.hessian_new, n, skip, flush)
    nf = n if isinstance(n, int) and 1 <= n <= 64 else 4
    for _ in range(d.pick([1, 2, 3])):
        T = d.pick([0, 1, 2, 5, 17, 64])
        X = d.array((T, nf), d.pick([np.float32, np.float64]), "X")
        w = d.array((T,), np.float64, "weights") if d.flag(0.3) else None
        if isinstance(w, np.ndarray) and w.dtype.kind == "f" and d.flag(0.7):
            w = np.abs(w)
        seq = d.pick([0, 0, 1, 3, -1, 2**40])
        call(_C.hessian_add, state if state is not None else d.pick([None, 0, "x"]), X, w, seq)
    if state is not None:
        call(_C.hessian_mean, state)
        call(_C.hessian_stats, state)
    H = d.array((nf, nf), np.float64, "H", psd=True)
    call(_C.damp, H, d.pick([0.0, 0.01, 1.0, -0.01, float("nan"), float("inf"), 1e308]))
    X = d.array((d.pick([0, 1, 9]), nf), np.float32, "X")
    C = d.array((nf, nf), np.float32, "C")
    call(_C.bare_ssyrk, X, C)


@given(st.data())
@fuzz("packed")
def test_packed_format_entry_points(data):
    d = Draw(data)
    bits = d.integer([2, 3, 4], "bits")
    out, n = d.pick([1, 2, 5, 16], "out"), d.pick([1, 7, 8, 31, 64, 200, 256], "in")
    b = bits if isinstance(bits, int) and 2 <= bits <= 4 else 2
    lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
    A = d.rng.integers(lo, hi, size=(out, n), endpoint=True).astype(np.int8)
    if d.flag(0.2):
        A = d.array((out, n), np.int8, "codes")
    packed = call(_C.pack_codes, A, bits)
    if packed is None or d.flag(0.3):
        words = max(1, -(-n // 16) * 8)
        packed = d.array((out, words), np.uint32, "packed")
    in_features = d.integer([n, n, n, n + 1, max(1, n - 1)], "in_features")
    call(_C.unpack_codes, packed, bits, in_features)
    divisors = [g for g in (1, 2, 4, 8, 32, 64) if n % g == 0]
    group = d.integer(divisors + [-1], "group_size")
    G = n // group if isinstance(group, int) and group > 0 and n % group == 0 else 1
    sdt = d.pick([np.float32, np.float16])
    scale = d.array((out, G), sdt, "scale")
    zero = d.array((out, G), sdt, "zero") if d.flag(0.7) else None
    threads = d.pick([0, 1, 2, 3, -1, 300])
    kernel = d.pick([None, None, "auto", "ref", "avx2", "nope", 3])
    call(_C.dequantize_packed, packed, scale, zero, bits, in_features, group, threads, kernel)
    batch = d.pick([1, 2, 3, 16, 17, 40])
    x = d.array((batch, n), np.float32, "x")
    y = d.array((batch, out), np.float32, "out") if d.flag(0.3) else None
    tile = d.pick([0, 0, 1, 7, -1, 2**40])
    call(_C.packed_matmul, x, packed, scale, zero, bits, in_features, group, y, threads, kernel, tile)
    w = d.array((out, n), np.float32, "w")
    call(_C.blas_linear, x, w)


@given(st.data())
@fuzz("small")
def test_small_entry_points(data):
    d = Draw(data)
    call(_C.backend_info)
    call(_C.kernel_names)
    # Timing helpers: small sizes (their cost is what they measure), and
    # the extremes that must be refused before any work.
    call(_C.read_bandwidth, d.pick([-1, 0, 1, 4096, 65536, 2**62, 2**63 - 1]),
         d.pick([-1, 0, 1, 2, 300]), d.pick([-1, 0, 1]))
    call(_C.fma_throughput, d.pick([-1, 0, 1, 2]), d.pick([-1, 0, 1]))
    call(_C.set_blas_threads, d.pick([-1, 0, 1, 2, 2**31 - 1, 2**31, "2", None]))
    _C.set_blas_threads(1)


@given(st.data())
@fuzz("init")
def test_initialisation_entry_points(data):
    d = Draw(data)
    m, n, group, bits, W, H, rule = layer(d)
    sym = d.flag()
    hdiag = d.array((n,), np.float64, "hdiag") if d.flag(0.5) else None
    if isinstance(hdiag, np.ndarray) and hdiag.dtype.kind == "f" and hdiag.flags.writeable and d.flag(0.7):
        np.abs(hdiag, out=hdiag)
    call(_C.neuqi_params, W, bits, group, sym, hdiag=hdiag, integer_zero=d.flag())
    init = d.pick(["minmax", "shrink", "neuqi", "neuqi_int", "other"])
    call(_C.start_params, W, H, bits, group, sym, rule, init)
    clip = d.pick([1, 2, 4, 0, -1])
    iters = d.pick([0, 1, 3, -1])
    call(_C.bcq_init, W, d.integer([2, 3, 4], "bits"), group, clip, iters, hdiag=hdiag)
    # decoupleQ over BCQ levels from a drawn start (indices, alpha, offset).
    bb = d.integer([2, 3, 4, 5], "bcq_bits")
    b = bb if isinstance(bb, int) and 2 <= bb <= 4 else 2
    G = n // group if isinstance(group, int) and group > 0 and n % group == 0 else 1
    idx = d.rng.integers(0, 1 << b, size=(m, n)).astype(np.uint8)
    if d.flag(0.2):
        idx = d.array((m, n), np.uint8, "indices")
    alpha = d.array((m, G, b), np.float32, "alpha")
    offset = d.array((m, G), np.float32, "offset")
    call(_C.bcq_solve, W, H, idx, alpha, offset, bb, group, iters=d.pick([0, 1, 2, -1]))


@given(st.data())
@fuzz("bcq")
def test_bcq_format_entry_points(data):
    d = Draw(data)
    call(_C.bcq_default_kernel)
    call(_C.bcq_kernel_names)
    bits = d.integer([2, 3, 4], "bits")
    out, n = d.pick([1, 2, 5, 16], "out"), d.pick([1, 7, 8, 31, 64, 200], "in")
    b = bits if isinstance(bits, int) and 1 <= bits <= 8 else 2
    idx = d.rng.integers(0, 1 << b, size=(out, n)).astype(np.uint8)
    if d.flag(0.2):
        idx = d.array((out, n), np.uint8, "indices")
    packed = call(_C.bcq_pack, idx, bits)
    if packed is None or d.flag(0.3):
        packed = d.array((out, max(1, -(-n // 8) * 8)), np.uint32, "packed")
    in_features = d.integer([n, n, n, n + 1, max(1, n - 1)], "in_features")
    call(_C.bcq_unpack, packed, bits, in_features)
    divisors = [g for g in (1, 2, 4, 8, 32, 64) if n % g == 0]
    group = d.integer(divisors + [-1], "group_size")
    G = n // group if isinstance(group, int) and group > 0 and n % group == 0 else 1
    alpha = d.array((out, G, b), np.float32, "alpha")
    offset = d.array((out, G), np.float32, "offset")
    threads = d.pick([0, 1, 2, -1, 300])
    kernel = d.pick([None, None, "auto", "ref", "avx2", "nope"])
    call(_C.bcq_dequantize_packed, packed, alpha, offset, bits, in_features, group, threads, kernel)
    x = d.array((d.pick([1, 2, 17]), n), np.float32, "x")
    tile = d.pick([0, 1, 7, -1, 2**40])
    call(_C.bcq_packed_matmul, x, packed, alpha, offset, bits, in_features, group, None, threads, kernel, tile)
