"""Packed kernels: every compiled kernel against the NumPy reference and each
other, the batch paths, the dispatcher and its override, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import decoupleq
from decoupleq import _C
from decoupleq.kernels import available_kernels, packed_linear
from decoupleq.packing import PackedWeight
from decoupleq.reference import packing as ref

KERNELS = available_kernels()
EPS = np.finfo(np.float32).eps

# (in_features, group_size): odd sizes with every group size that divides them,
# and aligned sizes that take the fast grouped paths.
SHAPES = [(1, -1), (1, 1), (7, -1), (7, 7), (31, -1), (33, -1), (33, 11), (33, 3),
          (127, -1), (127, 127), (64, 8), (256, 32), (320, 64), (576, 64), (1000, 8), (1000, -1)]


def make(rng, out, n, bits, gs, scale_dtype="float16", symmetric=False, nasty=True):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    a = rng.integers(qmin, qmax + 1, size=(out, n)).astype(np.int8)
    G = 1 if gs == -1 else n // gs
    s = (rng.random((out, G)) * 0.05 + 0.002).astype(np.float32)
    z = None if symmetric else (rng.standard_normal((out, G)) * 0.05).astype(np.float32)
    if nasty and out >= 4:
        a[0] = qmin          # every u = 0
        a[1] = 0             # constant codes
        s[2, 0] = 40.0       # one huge scale
        a[3] = qmax
    return PackedWeight.from_codes(a, s, z, bits, gs, scale_dtype=scale_dtype)


def exact_and_bound(x, pw):
    """float64 x @ What^T and a bound on any float32 evaluation of it.

    The kernels use sum_c w x = s * sum u x + (z + s qmin) * sum x per group;
    the bound covers both that split and the plain product.
    """
    w = pw.dequantize().astype(np.float64)
    n, g = pw.in_features, (pw.in_features if pw.group_size == -1 else pw.group_size)
    u = (pw.unpack().astype(np.int64) + 2 ** (pw.bits - 1)).astype(np.float64)
    s = np.repeat(pw.scale.astype(np.float64), g, axis=1)
    z = 0.0 if pw.zero is None else np.repeat(pw.zero.astype(np.float64), g, axis=1)
    c = np.abs(z - s * 2 ** (pw.bits - 1))
    mag = np.abs(w) + np.abs(s) * u + c + np.abs(s) * np.abs(u - 2 ** (pw.bits - 1))
    x64 = x.astype(np.float64)
    return x64 @ w.T, np.abs(x64) @ mag.T, (n + pw.n_groups + 8) * EPS


def assert_close(y, x, pw):
    exact, bound, gamma = exact_and_bound(x, pw)
    err = np.abs(y.astype(np.float64) - exact)
    assert np.all(err <= gamma * bound + 1e-30), float(np.max(err / (gamma * bound + 1e-30)))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_every_kernel_matches_the_reference(kernel, bits):
    rng = np.random.default_rng(bits)
    for n, gs in SHAPES:
        for out in (1, 5, 13):
            pw = make(rng, out, n, bits, gs)
            for batch in (1, 3, 16, 17):
                x = rng.standard_normal((batch, n)).astype(np.float32)
                y = _C.packed_matmul(x, pw.codes, pw.scale, pw.zero, bits, n, gs, kernel=kernel)
                assert y.shape == (batch, out) and y.dtype == np.float32
                assert_close(y, x, pw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_scales_and_symmetric_weights(kernel):
    rng = np.random.default_rng(5)
    for bits, n, gs in [(2, 256, 64), (3, 100, -1), (4, 96, 32)]:
        for symmetric in (False, True):
            pw = make(rng, 9, n, bits, gs, scale_dtype="float32", symmetric=symmetric)
            x = rng.standard_normal((2, n)).astype(np.float32)
            assert_close(packed_linear(x, pw, kernel=kernel), x, pw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dequantize_is_bit_exact_in_every_kernel(kernel):
    rng = np.random.default_rng(9)
    for bits in (2, 3, 4):
        for n, gs in [(33, 11), (127, -1), (576, 64), (7, 7)]:
            pw = make(rng, 6, n, bits, gs)
            expected = ref.dequantize_packed(pw.codes, pw.scale, pw.zero, bits, n, gs)
            assert np.array_equal(pw.dequantize(kernel=kernel), expected)


def test_large_batches_give_identical_results_in_every_kernel():
    # Above 16 rows the kernels only dequantize tiles (bit-exact) for sgemm.
    rng = np.random.default_rng(21)
    pw = make(rng, 37, 320, 3, 64)
    x = rng.standard_normal((40, 320)).astype(np.float32)
    ys = [packed_linear(x, pw, kernel=k, threads=1) for k in KERNELS]
    for y in ys[1:]:
        assert np.array_equal(y, ys[0])
    assert_close(ys[0], x, pw)


@pytest.mark.parametrize("tile_rows", [1, 7, 16, 0])
def test_large_batch_over_several_tiles(tile_rows):
    rng = np.random.default_rng(22)
    pw = make(rng, 45, 264, 4, 8)
    x = rng.standard_normal((19, 264)).astype(np.float32)
    # 45 rows in tiles of 1, 7 (a partial last tile), 16 or automatic (one tile)
    assert_close(_C.packed_matmul(x, *_args(pw), tile_rows=tile_rows), x, pw)


@pytest.mark.skipif("avx2" not in KERNELS, reason="no AVX2 on this CPU")
def test_both_avx2_variants_round_identically():
    # Power-of-two scalings are exact, so reading codes as subnormals changes
    # nothing but speed while values stay in the normal range.
    rng = np.random.default_rng(4)
    for bits, n, gs in [(2, 576, 64), (3, 1000, -1), (4, 264, 8), (3, 33, 11)]:
        pw = make(rng, 11, n, bits, gs)
        for batch in (1, 6):
            x = rng.standard_normal((batch, n)).astype(np.float32)
            a = packed_linear(x, pw, kernel="avx2")
            b = packed_linear(x, pw, kernel="avx2_subnormal")
            assert np.array_equal(a, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_activation_magnitudes_far_from_one(kernel, scale):
    rng = np.random.default_rng(8)
    pw = make(rng, 6, 256, 2, 64, scale_dtype="float32")
    x = (rng.standard_normal((2, 256)) * scale).astype(np.float32)
    x[1, 17] = 1e4 * scale if scale < 1e30 else scale  # one outlier
    assert_close(packed_linear(x, pw, kernel=kernel), x, pw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_input_gives_zero_output(kernel):
    pw = make(np.random.default_rng(2), 5, 40, 4, 8)
    y = packed_linear(np.zeros((3, 40), np.float32), pw, kernel=kernel)
    assert np.array_equal(y, np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_in_one_input_row_stays_in_that_row(kernel):
    rng = np.random.default_rng(6)
    pw = make(rng, 6, 96, 3, 32)
    for batch in (2, 20):
        x = rng.standard_normal((batch, 96)).astype(np.float32)
        x[1, 50] = np.nan
        y = packed_linear(x, pw, kernel=kernel)
        assert np.isnan(y[1]).all()
        keep = np.arange(batch) != 1
        assert np.isfinite(y[keep]).all()
        assert_close(y[keep], x[keep], pw)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(12)
    pw = make(rng, 203, 512, 2, 64)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 512)).astype(np.float32)
        assert np.array_equal(packed_linear(x, pw, threads=1), packed_linear(x, pw, threads=2))


@pytest.mark.skipif("avx2_subnormal" not in KERNELS, reason="no AVX2 on this CPU")
def test_subnormal_kernel_survives_flush_to_zero_mode():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    pw = make(rng, 9, 128, 2, 32)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    expected = packed_linear(x, pw, kernel="reference")
    assert torch.set_flush_denormal(True)
    try:
        got = packed_linear(x, pw, kernel="avx2_subnormal", threads=1)
    finally:
        torch.set_flush_denormal(False)
    assert_close(got, x, pw)
    assert_close(expected, x, pw)


# ---- Python face -------------------------------------------------------------------

def test_packed_linear_numpy_leading_dims_bias_and_dtypes():
    rng = np.random.default_rng(14)
    pw = make(rng, 7, 33, 3, 11)
    x = rng.standard_normal((2, 3, 33))
    bias = rng.standard_normal(7).astype(np.float32)
    y = packed_linear(x.astype(np.float16), pw, bias=bias)
    assert y.shape == (2, 3, 7) and y.dtype == np.float32
    x32 = x.astype(np.float16).astype(np.float32).reshape(6, 33)
    assert_close(y.reshape(6, 7) - bias, x32, pw)


def test_packed_linear_torch_without_copies():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    pw = make(rng, 9, 64, 2, 32)
    x = torch.randn(4, 64, requires_grad=True)
    out = torch.empty(4, 9)
    y = packed_linear(x, pw, out=out)
    assert y is out
    assert_close(out.numpy(), x.detach().numpy(), pw)
    xb = x.detach().to(torch.bfloat16)
    yb = packed_linear(xb, pw)
    assert isinstance(yb, torch.Tensor) and yb.dtype == torch.float32
    assert_close(yb.numpy(), xb.float().numpy(), pw)


def test_packed_linear_rejects_bad_input():
    pw = make(np.random.default_rng(16), 4, 16, 2, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\), got \(2, 15\)"):
        packed_linear(np.zeros((2, 15), np.float32), pw)
    with pytest.raises(TypeError, match="floating-point"):
        packed_linear(np.zeros((2, 16), np.int32), pw)
    with pytest.raises(TypeError, match="packed must be a PackedWeight"):
        packed_linear(np.zeros((2, 16), np.float32), pw.codes)
    with pytest.raises(ValueError, match="out must be float32 with shape"):
        packed_linear(np.zeros((2, 16), np.float32), pw, out=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="threads must be"):
        packed_linear(np.zeros((2, 16), np.float32), pw, threads=-1)


def _args(pw):
    return pw.codes, pw.scale, pw.zero, pw.bits, pw.in_features, pw.group_size


@pytest.mark.parametrize(
    "mutate, exc, msg",
    [
        (lambda x, a: (x.astype(np.float64), a), TypeError, "x must have dtype float32"),
        (lambda x, a: (x[:, :15].copy(), a), ValueError, r"x must have shape \(batch, 16\), got \(2, 15\)"),
        (lambda x, a: (x[:, ::2], a), ValueError, "x must be C-contiguous"),
        (lambda x, a: (x, (a[0], a[1][:, :1].copy(), *a[2:])), ValueError,
         r"scale must have shape \(4, 2\), got \(4, 1\)"),
        (lambda x, a: (x, (a[0], a[1], a[2].astype(np.float32), *a[3:])), TypeError,
         "zero must have the dtype of scale"),
        (lambda x, a: (x, (*a[:5], 0)), ValueError, r"group_size must be -1 \(per-channel\) or positive, got 0"),
        (lambda x, a: (x, (a[0], a[1].astype(np.float64), *a[2:])), TypeError, "scale must have dtype float16 or float32"),
        (lambda x, a: (x, (a[0][:, :4].copy(), *a[1:])), ValueError, "packed has 4 words per row"),
        (lambda x, a: (x, (*a[:3], 6, *a[4:])), ValueError, "bits must be 2, 3 or 4, got 6"),
    ],
)
def test_boundary_rejects_bad_input_before_work(mutate, exc, msg):
    pw = make(np.random.default_rng(17), 4, 16, 2, 8)
    x, args = mutate(np.ones((2, 16), np.float32), _args(pw))
    with pytest.raises(exc, match=msg):
        _C.packed_matmul(x, *args)


def test_boundary_rejects_bad_out_kernel_threads_and_misaligned_x():
    pw = make(np.random.default_rng(18), 4, 16, 2, 8)
    x = np.ones((2, 16), np.float32)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4\)"):
        _C.packed_matmul(x, *_args(pw), out=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        big = np.zeros((2, 16), np.float32)
        _C.packed_matmul(big, *_args(pw), out=big.reshape(-1)[:8].reshape(2, 4))
    with pytest.raises(ValueError, match="kernel 'avx512' is not available here; choose from reference"):
        _C.packed_matmul(x, *_args(pw), kernel="avx512")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _C.packed_matmul(x, *_args(pw), threads=-3)
    with pytest.raises(ValueError, match="tile_rows must be >= 0"):
        _C.packed_matmul(x, *_args(pw), tile_rows=-1)
    raw = np.zeros(2 * 16 * 4 + 1, np.uint8)
    mis = np.frombuffer(raw.data, dtype=np.float32, count=32, offset=1).reshape(2, 16)
    with pytest.raises(ValueError, match="x must be C-contiguous and aligned"):
        _C.packed_matmul(mis, *_args(pw))


# ---- dispatch ----------------------------------------------------------------------------

def test_backend_info_reports_the_kernel_choice():
    info = decoupleq.backend_info()
    assert info["kernel"] in info["kernels"] == KERNELS
    assert info["kernels"][0] == "reference"
    assert isinstance(info["kernel_reason"], str) and info["kernel_reason"]
    assert ("avx2" in KERNELS) == info["cpu_avx2_fma"]


def _info_with_env(value):
    env = dict(os.environ, DECOUPLEQ_KERNEL=value)
    code = "import json, decoupleq; print(json.dumps(decoupleq.backend_info()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(decoupleq.__file__)))
    return json.loads(res.stdout)


def test_environment_variable_forces_the_reference():
    info = _info_with_env("reference")
    assert info["kernel"] == "reference"
    assert "DECOUPLEQ_KERNEL=reference" in info["kernel_reason"]


def test_unknown_kernel_in_environment_falls_back_and_says_so():
    info = _info_with_env("no-such-kernel")
    assert info["kernel"] in info["kernels"]
    assert "no-such-kernel" in info["kernel_reason"]


def test_read_bandwidth_is_measured():
    gbps = _C.read_bandwidth(nbytes=1 << 22, threads=1, repeats=2)
    assert 0.1 < gbps < 10000


def test_fma_throughput_is_measured_and_checks_its_arguments():
    gmacs = _C.fma_throughput(threads=1, repeats=1)
    # One core issues somewhere between a scalar multiply-add per cycle at
    # 0.1 GHz and a few hundred lanes per cycle at 5 GHz.
    assert 0.1 < gmacs < 2000
    with pytest.raises(ValueError, match="threads"):
        _C.fma_throughput(threads=-1)
    with pytest.raises(ValueError, match="repeats"):
        _C.fma_throughput(repeats=0)


def test_benchmark_writes_the_documented_records(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--quick", "--no-torch",
           "--shapes", "8x64", "--batches", "1,17", "--bandwidth-mib", "4", "--threads", "1",
           "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
    records = json.loads(out.read_text())
    # Every record says which code, settings, threads and versions made it.
    for r in records:
        run = r["run"]
        assert run["config"]["threads"] == 1 and run["config"]["shapes"] == "8x64"
        assert {"blas_threads", "core_threads", "cpus"} <= set(run["threads"])
        assert run["versions"]["numpy"] == np.__version__ and run["versions"]["decoupleq"]
    bw = [r for r in records if r["impl"] == "read_bandwidth"]
    assert len(bw) == 1 and bw[0]["gbps"] > 0
    ceiling = [r for r in records if r["impl"] == "fma_ceiling"]
    assert len(ceiling) == 1 and ceiling[0]["gmacs"] > 0
    runs = [r for r in records if r["impl"] in ("decoupleq", "openblas_fp32")]
    # 2 batches x (fp32 baseline + 3 bit widths x {per-channel, g64}); g128 does not divide 64
    assert len(runs) == 2 * (1 + 3 * 2)
    for r in runs:
        assert {"shape", "bits", "group_size", "batch", "impl", "seconds", "gbps"} <= set(r)
        assert r["shape"] == [8, 64] and r["seconds"] > 0 and r["gbps"] > 0


def test_benchmark_selects_bits_groups_and_extra_bcq_kernels(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--quick", "--no-torch",
           "--shapes", "8x128", "--batches", "1", "--bandwidth-mib", "4", "--threads", "1",
           "--bits", "2", "--groups=-1,64", "--bcq-kernels", "reference", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
    records = json.loads(out.read_text())
    timed = {(r["impl"], r["bits"], r["group_size"]) for r in records
             if r["impl"] in ("decoupleq", "bcq", "bcq_reference")}
    assert timed == {(impl, 2, gs) for impl in ("decoupleq", "bcq", "bcq_reference") for gs in (-1, 64)}
    bad = subprocess.run(cmd[:-2] + ["--bcq-kernels", "nope"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "--bcq-kernels: nope not runnable here" in bad.stderr
