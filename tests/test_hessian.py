"""HessianAccumulator (C) against its NumPy twin and explicit formulas; damp."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from decoupleq import _C, reference
from decoupleq.hessian import DEFAULT_FLUSH_TOKENS, HessianAccumulator, damp

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53
IMPLS = [HessianAccumulator, reference.HessianAccumulator]


def exact_mean(X, w=None):
    """sum_t w_t x_t x_tᵀ / sum_t w_t and sum_t w_t |x_t||x_t|ᵀ / sum_t w_t, in float64."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    w = np.ones(len(X)) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    H = (X * w[:, None]).T @ X / w.sum()
    A = (np.abs(X) * w[:, None]).T @ np.abs(X) / w.sum()
    return H, A


def assert_f32_close(H, X, w=None, flush_tokens=DEFAULT_FLUSH_TOKENS):
    """H within the worst-case rounding bound of the float32 path.

    Between two flushes at most K = min(N, flush_tokens) products are summed in
    float32 (recursive summation error <= (K-1) u sum|terms|), each product and
    each x*sqrt(w) scaling adds a few more roundings (+8 u covers them), the
    float64 flush adds ~N u64 (folded into the +8 at these sizes).  So
    |H - H_exact| <= (K + 8) u32 * sum_t w_t |x_ti x_tj| / sum_t w_t; a missing
    or doubled token is an O(1/N) error, far above it at the sizes used here.
    """
    H_exact, A = exact_mean(X, w)
    K = min(len(np.asarray(X).reshape(-1, H.shape[0])), flush_tokens)
    err = np.abs(H - H_exact)
    assert np.all(err <= (K + 8) * U32 * A + 1e-300), float((err / (A + 1e-300)).max())


def assert_f64_close(H, X, w=None):
    """float64 path: dsyrk vs a float64 matmul, both bounded by N u64 sum|terms|."""
    H_exact, A = exact_mean(X, w)
    N = len(np.asarray(X).reshape(-1, H.shape[0]))
    assert np.all(np.abs(H - H_exact) <= (N + 8) * U64 * A + 1e-300)


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("n", [1, 7, 33, 127])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference_and_formula_any_row_counts(n, dtype):
    rng = np.random.default_rng(n)
    # Row counts hit the 1-token, staged (< 256 rows) and direct (>= 256) paths.
    sizes = [1, 7, 300, 1, 31, 600, 2]
    X = rand(rng, (sum(sizes), n), dtype)
    X[3] = 0.0                     # an all-zero token
    X[10] = 2.5                    # a constant token
    X[400, n // 2] = 3e4           # one huge outlier
    c, r = HessianAccumulator(n), reference.HessianAccumulator(n)
    start = 0
    for k in sizes:
        c.add(X[start:start + k])
        r.add(X[start:start + k])
        start += k
    Hc, Hr = c.hessian(), r.hessian()
    assert Hc.dtype == np.float64 and Hc.shape == (n, n)
    assert np.array_equal(Hc, Hc.T)
    assert c.n_tokens == r.n_tokens == len(X)
    assert c.total_weight == len(X)
    if dtype == np.float64:
        assert_f64_close(Hc, X)
    else:
        assert_f32_close(Hc, X)
    assert_f64_close(Hr, X)


@pytest.mark.parametrize("flush_tokens", [DEFAULT_FLUSH_TOKENS, 7, 64])
def test_one_token_at_a_time_equals_one_batch(flush_tokens):
    # Small windows also cap the row buffer, so it fills and drains here.
    rng = np.random.default_rng(1)
    X = rand(rng, (300, 33))
    one = HessianAccumulator(33, flush_tokens=flush_tokens)
    batch = HessianAccumulator(33, flush_tokens=flush_tokens)
    for t in range(len(X)):
        one.add(X[t:t + 1])
    batch.add(X)
    assert one.n_tokens == batch.n_tokens == 300
    assert_f32_close(one.hessian(), X, flush_tokens=flush_tokens)
    assert_f32_close(batch.hessian(), X, flush_tokens=flush_tokens)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_weighted_batches_fill_the_row_buffers(dtype):
    # Weighted rows are always copied; 5000 rows of 127 overflow both buffers
    # (4 MiB each) at least once, and the float32 one is capped at 4096 rows.
    rng = np.random.default_rng(17)
    X = rand(rng, (5000, 127), dtype)
    w = rng.random(5000)
    acc = HessianAccumulator(127)
    acc.add(X, weights=w)
    acc.add(X[:9], weights=w[:9])
    assert acc.n_tokens == 5009
    Xa, wa = np.concatenate([X, X[:9]]), np.concatenate([w, w[:9]])
    if dtype == np.float32:
        assert_f32_close(acc.hessian(), Xa, wa)
    else:
        assert_f64_close(acc.hessian(), Xa, wa)


@pytest.mark.parametrize("flush_tokens", [1, 5, 256, 300])
def test_small_flush_windows_are_exact_enough(flush_tokens):
    # Odd flush windows exercise the flush before/after staged and direct syrk
    # calls; the bound tightens with the window, so it checks the flush happens.
    rng = np.random.default_rng(flush_tokens)
    X = rand(rng, (1000, 7))
    acc = HessianAccumulator(7, flush_tokens=flush_tokens)
    for lo, hi in [(0, 3), (3, 700), (700, 701), (701, 1000)]:
        acc.add(X[lo:hi])
    assert_f32_close(acc.hessian(), X, flush_tokens=flush_tokens)


def test_flush_every_token_is_exact_on_integers():
    # Integer data whose products and sums are exact in float64 but not in a
    # float32 running sum: 4096^2 = 2^24 swallows later +1s in float32.
    X = np.ones((600, 2), dtype=np.float32)
    X[0] = 4096.0
    acc = HessianAccumulator(2, flush_tokens=1)
    for t in range(len(X)):
        acc.add(X[t:t + 1])
    H_exact = X.astype(np.float64).T @ X.astype(np.float64) / len(X)
    assert np.array_equal(acc.hessian(), H_exact)


def test_huge_float32_tokens_do_not_overflow():
    # 1e30^2 overflows float32; such tokens are summed in float64 instead.
    rng = np.random.default_rng(2)
    X = rand(rng, (300, 7))
    X[17, 3] = 1e30
    X[290] = -3e25
    for w in (None, np.full(300, 0.5)):
        acc = HessianAccumulator(7)
        acc.add(X, weights=w)
        H = acc.hessian()
        assert np.isfinite(H).all()
        assert_f32_close(H, X, w)


def test_hessian_is_repeatable_and_accumulation_continues():
    rng = np.random.default_rng(3)
    X = rand(rng, (500, 33))
    acc = HessianAccumulator(33)
    acc.add(X[:100])
    H1 = acc.hessian()
    assert np.array_equal(H1, acc.hessian())
    assert H1 is not acc.hessian()
    acc.add(X[100:])
    assert_f32_close(H1, X[:100])
    assert_f32_close(acc.hessian(), X)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_accumulator_raises(impl):
    acc = impl(5)
    acc.add(np.zeros((0, 5), np.float32))  # an empty batch is a no-op
    assert acc.n_tokens == 0
    with pytest.raises(ValueError, match="no tokens"):
        acc.hessian()


def test_float16_numpy_input_is_widened():
    rng = np.random.default_rng(4)
    X = rand(rng, (50, 7)).astype(np.float16)
    acc = HessianAccumulator(7)
    acc.add(X)
    assert_f32_close(acc.hessian(), X)


# ---------------------------------------------------------------- mask and weights


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_excludes_and_does_not_count(impl):
    rng = np.random.default_rng(5)
    X = rand(rng, (301, 7))
    mask = rng.random(301) < 0.6
    X[np.flatnonzero(~mask)[:5]] = np.nan  # masked tokens are never looked at
    acc = impl(7)
    acc.add(X, mask=mask)
    assert acc.n_tokens == mask.sum()
    assert_f32_close(acc.hessian(), X[mask])


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_formula(impl):
    rng = np.random.default_rng(6)
    X = rand(rng, (280, 33))
    w = rng.random(280) * 3
    w[::7] = 0.0
    acc = impl(33)
    acc.add(X[:1], weights=w[:1])
    acc.add(X[1:], weights=w[1:])
    assert acc.n_tokens == np.count_nonzero(w)
    assert np.isclose(acc.total_weight, w.sum(), rtol=1e-14)
    assert_f32_close(acc.hessian(), X, w)


def test_mask_and_weights_combine_and_integer_mask():
    rng = np.random.default_rng(7)
    X = rand(rng, (2, 40, 7))
    mask = (rng.random((2, 40)) < 0.5).astype(np.int64)  # HF attention masks are 0/1 ints
    w = rng.random((2, 40)) + 0.1
    acc = HessianAccumulator(7)
    acc.add(X, mask=mask, weights=w)
    assert acc.n_tokens == mask.sum()
    assert_f32_close(acc.hessian(), X, w * mask)


def test_all_masked_batch_counts_nothing():
    acc = HessianAccumulator(3)
    acc.add(np.ones((4, 3), np.float32), mask=np.zeros(4, bool))
    assert acc.n_tokens == 0
    with pytest.raises(ValueError, match="no tokens"):
        acc.hessian()


def test_float64_weighted_matches_reference_tightly():
    rng = np.random.default_rng(8)
    X = rand(rng, (300, 33), np.float64)
    w = rng.random(300)
    c, r = HessianAccumulator(33), reference.HessianAccumulator(33)
    c.add(X, weights=w)
    r.add(X, weights=w)
    assert_f64_close(c.hessian(), X, w)
    assert_f64_close(r.hessian(), X, w)


# ---------------------------------------------------------------- 3-D and torch


def test_3d_input_is_flattened_to_tokens():
    rng = np.random.default_rng(9)
    X = rand(rng, (3, 5, 7))
    a, b = HessianAccumulator(7), HessianAccumulator(7)
    a.add(X)
    b.add(X.reshape(15, 7))
    assert a.n_tokens == 15
    assert np.array_equal(a.hessian(), b.hessian())


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 150, 33, generator=g)
    for t in (base, base.double(), base.half(), base.bfloat16(),
              base.clone().requires_grad_(True), base.transpose(0, 1)):
        expected = t.detach().float().double().numpy()  # the values as widened
        acc = HessianAccumulator(33)
        acc.add(t)
        assert acc.n_tokens == 300
        if t.dtype == torch.float64:
            assert_f64_close(acc.hessian(), expected)
        else:
            assert_f32_close(acc.hessian(), expected)
    mask = torch.rand(2, 150, generator=g) < 0.5
    acc = HessianAccumulator(33)
    acc.add(base, mask=mask)
    assert acc.n_tokens == int(mask.sum())
    assert_f32_close(acc.hessian(), base.numpy()[mask.numpy()])


def test_module_does_not_import_torch():
    code = ("import sys, numpy as np; sys.modules['torch'] = None\n"
            "from decoupleq.hessian import HessianAccumulator\n"
            "a = HessianAccumulator(3); a.add(np.ones((2, 3), np.float32))\n"
            "assert a.hessian()[0, 0] == 1.0\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- non-finite tokens


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_nonfinite_row_raises_and_leaves_accumulator_unchanged(impl, bad, rows):
    rng = np.random.default_rng(10)
    X0 = rand(rng, (20, 7))
    acc = impl(7)
    acc.add(X0)
    H0 = acc.hessian()
    X = rand(rng, (rows, 7))
    k = rows - 1
    X[k, 6] = bad
    with pytest.raises(ValueError, match=rf"X contains NaN or Inf in row {k}\b"):
        acc.add(X)
    assert acc.n_tokens == 20 and acc.n_skipped == 0
    assert np.array_equal(acc.hessian(), H0)


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_in_3d_input_names_the_token(impl):
    X = np.ones((2, 4, 3), np.float32)
    X[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or Inf at token \[1, 2\]"):
        impl(3).add(X)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_skip_nonfinite_counts_and_skips(impl, dtype):
    rng = np.random.default_rng(11)
    X = rand(rng, (400, 7), dtype)
    X[[0, 13, 399], [1, 6, 0]] = [np.nan, np.inf, -np.inf]
    acc = impl(7, skip_nonfinite=True)
    acc.add(X[:1])
    acc.add(X[1:])
    keep = np.isfinite(X).all(axis=1)
    assert acc.n_skipped == 3 and acc.n_tokens == 397
    if dtype == np.float32:
        assert_f32_close(acc.hessian(), X[keep])
    else:
        assert_f64_close(acc.hessian(), X[keep])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise_naming_the_argument(impl):
    acc = impl(4)
    x = np.ones((3, 4), np.float32)
    cases = [
        (dict(X=np.ones((3, 4), np.int64)), TypeError, "X"),
        (dict(X=np.ones((3, 4), bool)), TypeError, "X"),
        (dict(X=[[1.0] * 4]), TypeError, "X"),
        (dict(X=np.ones(4, np.float32)), ValueError, "X must be 2-D"),
        (dict(X=np.ones((1, 2, 3, 4), np.float32)), ValueError, "X must be 2-D"),
        (dict(X=np.ones((3, 5), np.float32)), ValueError, "X has 5 features"),
        (dict(X=x, weights=np.array([1.0, -1.0, 1.0])), ValueError, r"weights\[1\] = -1.0"),
        (dict(X=x, weights=np.array([1.0, np.nan, 1.0])), ValueError, "weights"),
        (dict(X=x, weights=np.ones(2)), ValueError, "weights must have shape"),
        (dict(X=x, weights=np.ones(3, bool)), TypeError, "weights"),
        (dict(X=x, mask=np.ones(4, bool)), ValueError, r"mask must have shape \(3,\)"),
        (dict(X=x, mask=np.ones(3)), TypeError, "mask"),
        (dict(X=x, mask=np.array([0, 1, 2])), ValueError, "mask"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            acc.add(**kwargs)
    assert acc.n_tokens == 0
    with pytest.raises(ValueError, match="n_features"):
        impl(0)
    with pytest.raises(TypeError, match="n_features"):
        impl(4.0)
    with pytest.raises(ValueError, match="flush_tokens"):
        impl(4, flush_tokens=0)


def test_core_boundary_rejects_unconverted_arrays():
    state = _C.hessian_new(4)
    with pytest.raises(ValueError, match="X must be C-contiguous"):
        _C.hessian_add(state, np.ones((4, 8), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="X must be in native byte order"):
        _C.hessian_add(state, np.ones((3, 4), ">f4"))
    with pytest.raises(TypeError, match="state"):
        _C.hessian_add(object(), np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="weights has 2 entries"):
        _C.hessian_add(state, np.ones((3, 4), np.float32), np.ones(2))


def test_big_endian_and_strided_inputs_are_converted():
    rng = np.random.default_rng(12)
    X = rand(rng, (40, 14))
    acc = HessianAccumulator(7)
    acc.add(X.astype(">f4")[:, ::2])
    assert_f32_close(acc.hessian(), X[:, ::2])


def test_callers_arrays_are_untouched():
    rng = np.random.default_rng(13)
    X32 = rand(rng, (300, 7))
    X32[5, 0] = np.nan
    cases = [X32, X32.astype(np.float64), X32.astype(np.float16), X32.T.copy().T]
    mask = np.ones(300, bool)
    mask[5] = False
    w = rng.random(300)
    for X in cases:
        copies = [X.copy(), mask.copy(), w.copy()]
        acc = HessianAccumulator(7)
        acc.add(X, mask=mask, weights=w)
        acc.add(X[10:20], mask=mask[10:20])
        acc.hessian()
        for a, b in zip(copies, [X, mask, w]):
            assert np.array_equal(a, b, equal_nan=True)


# ---------------------------------------------------------------- threads


def test_two_threads_two_accumulators_match_one_thread():
    rng = np.random.default_rng(14)
    data = [rand(rng, (2048, 127)), rand(rng, (2048, 127))]

    def feed(acc, X):
        for i in range(0, len(X), 128):
            acc.add(X[i:i + 128])
            acc.add(X[i:i + 1], weights=np.array([0.0]))

    serial = [HessianAccumulator(127), HessianAccumulator(127)]
    for acc, X in zip(serial, data):
        feed(acc, X)
    parallel = [HessianAccumulator(127), HessianAccumulator(127)]
    threads = [threading.Thread(target=feed, args=(a, X)) for a, X in zip(parallel, data)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, p in zip(serial, parallel):
        assert p.n_tokens == s.n_tokens == 2048
        # Same calls in the same order on each accumulator, at one BLAS thread
        # count: the same sums, bit for bit.
        assert np.array_equal(p.hessian(), s.hessian())


# ---------------------------------------------------------------- damp


@pytest.mark.parametrize("fn", [_C.damp, reference.damp, damp])
def test_damp_semantics(fn):
    rng = np.random.default_rng(15)
    X = rng.standard_normal((50, 33))
    X[:, 4] = 0.0  # a dead input
    H = X.T @ X / 50
    H_before = H.copy()
    H00 = fn(H, 0.01)
    lam = 0.01 * np.mean(np.diag(H))
    assert H00 is not H and np.array_equal(H, H_before)
    # Only the mean's summation order may differ: |d lam| <= n u lam.
    assert np.allclose(H00, H + lam * np.eye(33), rtol=2 * U64, atol=33 * U64 * lam)
    assert H00[4, 4] > 0 and np.isclose(H00[4, 4], lam, rtol=1e-13)
    off = ~np.eye(33, dtype=bool)
    assert np.array_equal(H00[off], H[off])
    assert np.array_equal(fn(H, 0.0), H)
    Z = np.zeros((7, 7))
    assert np.array_equal(fn(Z, 0.5), 0.5 * np.eye(7))
    with pytest.raises(ValueError, match="singular"):
        fn(Z, 0.0)
    for p in (-0.01, np.nan, np.inf):
        with pytest.raises(ValueError, match="percdamp"):
            fn(H, p)
    with pytest.raises(TypeError, match="H"):
        fn(H.astype(np.float32), 0.01)
    with pytest.raises(ValueError, match="square"):
        fn(np.ones((3, 4)), 0.01)
    with pytest.raises(ValueError, match="2-dimensional"):
        fn(np.ones(3), 0.01)
    bad = H.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        fn(bad, 0.01)
    neg = H.copy()
    neg[3, 3] = -1.0
    with pytest.raises(ValueError, match=r"negative diagonal entry H\[3, 3\]"):
        fn(neg, 0.01)


def test_damp_c_matches_reference():
    rng = np.random.default_rng(16)
    for n in (1, 7, 127):
        X = rng.standard_normal((3 * n, n))
        H = X.T @ X
        assert np.allclose(_C.damp(H, 0.01), reference.damp(H, 0.01), rtol=4 * n * U64, atol=0)
