"""NeUQI initialisation (ALGORITHM 7): C against its NumPy twin, the zero against an
exhaustive search, and each method's use of it through QuantConfig.init."""
import numpy as np
import pytest

import decoupleq
from decoupleq import QuantConfig, quantize_weight
from decoupleq import reference as R
from decoupleq.reference import neuqi as RN
from decoupleq.reference.synthetic import synthetic_problem

from _kernel_builds import outputs_per_build

C = decoupleq._C


def nasty_weights(m, n, seed):
    """Heavy-tailed rows with the edge cases: all zero, constant, one outlier, all positive."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)) * np.exp(0.6 * rng.standard_normal((m, n)))
    W[0] = 0.0
    if m > 1:
        W[1] = 0.37
    if m > 2:
        W[2, n // 3] = 40.0
    if m > 3:
        W[3] = np.abs(W[3]) + 0.5
    return np.ascontiguousarray(W, np.float32)


def weights_of(n, seed):
    rng = np.random.default_rng(seed)
    return np.abs(rng.standard_normal(n)) + 0.05


# ---------------------------------------------------------------- C == twin


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,n", [(8, 24), (16, 48), (-1, 33)])
@pytest.mark.parametrize("symmetric,integer_zero", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("weighted", [False, True])
def test_c_matches_the_reference(bits, group_size, n, symmetric, integer_zero, weighted):
    W = nasty_weights(7, n, seed=bits * 10 + n)
    hd = weights_of(n, seed=n) if weighted else None
    S, Z, obj = C.neuqi_params(W, bits, group_size, symmetric, hd, integer_zero)
    S2, Z2, obj2 = R.neuqi_params(W, bits, group_size, symmetric, hd, integer_zero)
    np.testing.assert_allclose(obj, obj2, rtol=1e-9, atol=1e-12 * max(1.0, obj2.max()))
    # The same candidate wins, but where two candidates' objectives tie to
    # rounding (the all-zero and constant rows 0 and 1 have many exact fits).
    same = (S == S2) & (Z == Z2)
    assert np.all(same | np.isclose(obj, obj2, rtol=1e-12, atol=1e-15))
    assert same[2:].mean() >= 0.9
    if symmetric:
        assert np.all(Z == 0)


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    W = nasty_weights(64, 256, seed=3)
    hd = weights_of(256, seed=4)
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "1")
    one = C.neuqi_params(W, 2, 64, False, hd, False)
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "2")
    two = C.neuqi_params(W, 2, 64, False, hd, False)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


NEUQI_SCRIPT = """
import sys
import numpy as np
from decoupleq import _C as C
d = np.load(sys.argv[1])
out = {}
for bits in (2, 3, 4):
    for group in (64, 37, -1):
        S, Z, obj = C.neuqi_params(d["W"], bits, group, False, d["hd"], False)
        out[f"S{bits}_{group}"], out[f"Z{bits}_{group}"], out[f"o{bits}_{group}"] = S, Z, obj
np.savez(sys.argv[2], **out)
"""


def test_portable_build_is_bit_identical_to_the_simd_build(tmp_path):
    # DECOUPLEQ_KERNEL=reference selects the portable pass of phase 2; the
    # AVX2 one (where the CPU has it) must round every operation the same.
    # Groups of 64, 37 (a short last group, middle sets not a multiple of 4)
    # and whole rows.
    W = nasty_weights(16, 256, seed=11)
    out = outputs_per_build(NEUQI_SCRIPT, tmp_path, W=W, hd=weights_of(256, seed=12))
    assert len(out["auto"].files) == 27
    for key in out["auto"].files:
        np.testing.assert_array_equal(out["reference"][key], out["auto"][key], err_msg=key)


def test_bad_arguments_name_what_is_wrong():
    W = nasty_weights(4, 16, seed=0)
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or positive, got 0"):
        C.neuqi_params(W, 2, 0, False)
    with pytest.raises(ValueError, match="hdiag"):
        C.neuqi_params(W, 2, 8, False, np.ones(15))
    with pytest.raises(ValueError, match="hdiag must be >= 0"):
        C.neuqi_params(W, 2, 8, False, -np.ones(16))
    with pytest.raises(ValueError, match="bits"):
        C.neuqi_params(W, 9, 8, False)
    bad = W.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W"):
        C.neuqi_params(bad, 2, 8, False)
    with pytest.raises(ValueError, match="init must be one of"):
        C.start_params(W, np.eye(16), 2, 8, False, "half_up", "best")


# ------------------------------------------------------ optimality of the zero


exhaustive_best_zero = RN.exhaustive_zero


def random_group(rng):
    g = int(rng.integers(32, 257))
    kind = rng.integers(3)
    if kind == 0:   # skewed
        w = rng.gamma(1.5, 1.0, g) - 0.4
    elif kind == 1:  # outliers
        w = rng.standard_normal(g)
        w[rng.integers(g, size=2)] *= 25
    else:            # heavy tails
        w = rng.standard_t(3, g)
    return w.astype(np.float32), np.abs(rng.standard_normal(g)) + 0.05


def test_the_zero_is_optimal_for_every_scale_searched_and_never_above_minmax():
    """For the returned scale and every other scale NeUQI searched, its zero is the
    global optimum: within 1e-6 of an exhaustive search over all breakpoints (which is
    itself checked against a dense grid of zeros on a few groups)."""
    rng = np.random.default_rng(12)
    for trial in range(150):
        w, hd = random_group(rng)
        bits = int(rng.integers(2, 5))
        n = 2**bits
        h = hd / hd.sum()
        S, Z, obj = C.neuqi_params(w[None, :], bits, -1, False, hd.astype(np.float64), False)
        s = float(S[0, 0])
        # The returned scale: NeUQI's objective equals the exhaustive optimum.
        best = exhaustive_best_zero(w.astype(np.float64) / s, h, n) * s * s
        assert obj[0, 0] <= best * (1 + 1e-6) + 1e-15
        # Every coarse scale: the twin's per-scale zero is exhaustive-optimal too.
        lo, hi = RN.minmax_range(w.astype(np.float64), False)
        s0 = (hi - lo) / (n - 1)
        for k in (8, 24, 40, 56, 64):
            sk = s0 * k / 64
            got, _ = RN.best_zero(w.astype(np.float64), h, sk, n)
            want = exhaustive_best_zero(w.astype(np.float64) / sk, h, n) * sk * sk
            assert got <= want * (1 + 1e-6) + 1e-15, (trial, k)
        # Never above min-max (the library's own range and zero).
        Smm, Zmm = C.minmax_params(w[None, :], bits, -1, False)
        A = C.rtn_codes(w[None, :], Smm, Zmm, bits, False, "half_up")
        mm = float(np.sum(h * ((A[0] * Smm[0, 0] + Zmm[0, 0]).astype(np.float64) - w) ** 2))
        assert obj[0, 0] <= mm * (1 + 1e-6)
        if trial < 3:
            x = w.astype(np.float64) / s
            zs = np.linspace(-n - 1.0, 2.0, 200001)
            grid = min(RN.exact_objective(x, h, z, n) for z in zs[::50])
            assert exhaustive_best_zero(x, h, n) <= grid + 1e-12


def test_integer_zero_is_an_integer_zero_point_and_optimal_for_its_scale():
    rng = np.random.default_rng(5)
    for _ in range(40):
        w, hd = random_group(rng)
        bits = int(rng.integers(2, 5))
        n, qmin = 2**bits, -(2 ** (bits - 1))
        S, Z, obj = C.neuqi_params(w[None, :], bits, -1, False, hd.astype(np.float64), True)
        s = float(S[0, 0])
        z = float(Z[0, 0]) / s + qmin
        assert abs(z - round(z)) < 1e-4 and -(n - 1) <= round(z) <= 0
        h = hd / hd.sum()
        each = [RN.exact_objective(w.astype(np.float64) / s, h, float(zi), n) * s * s
                for zi in range(-(n - 1), 1)]
        # obj is at the float64 scale, `each` at the stored float32 one.
        assert obj[0, 0] <= min(each) * (1 + 1e-6) + 1e-15


# ------------------------------------------------------------ with each method


@pytest.mark.parametrize("bits,group_size", [(2, -1), (2, 16), (3, 32)])
def test_neuqi_lowers_rtn_and_gptq_losses_against_minmax(bits, group_size):
    W, H = synthetic_problem(64, 128, seed=7)
    loss = {}
    for method in ("rtn", "gptq"):
        for init in ("minmax", "neuqi"):
            cfg = QuantConfig(method=method, bits=bits, group_size=group_size, init=init)
            loss[method, init] = quantize_weight(W, H, cfg).loss.mean()
    assert loss["rtn", "neuqi"] < loss["rtn", "minmax"]
    assert loss["gptq", "neuqi"] < loss["gptq", "minmax"]


@pytest.mark.parametrize("init", ["minmax", "shrink", "neuqi", "neuqi_int"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "decoupleq"])
def test_every_init_matches_the_reference_with_every_method(method, init):
    W, H = synthetic_problem(12, 32, seed=9)
    cfg = QuantConfig(method=method, bits=2, group_size=16, init=init, iterations=3, blocksize=8)
    c = quantize_weight(W, H, cfg)
    r = quantize_weight(W, H, cfg, impl="reference")
    np.testing.assert_array_equal(c.codes, r.codes)
    np.testing.assert_allclose(c.scale, r.scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c.loss, r.loss, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("init", ["minmax", "neuqi", "neuqi_int"])
def test_decoupleq_from_any_start_never_raises_a_row_loss(init):
    W, H = synthetic_problem(48, 64, seed=2)
    qw = quantize_weight(W, H, QuantConfig(bits=2, group_size=16, init=init))
    assert np.all(np.diff(qw.trace, axis=0) <= 0)
    rtn = quantize_weight(W, H, QuantConfig(method="rtn", bits=2, group_size=16, init=init))
    np.testing.assert_array_equal(qw.trace[0], rtn.loss)


def test_gptq_with_an_init_holds_its_parameters_fixed():
    W, H = synthetic_problem(16, 64, seed=3)
    cfg = QuantConfig(method="gptq", bits=2, group_size=16, init="neuqi")
    qw = quantize_weight(W, H, cfg)
    H00 = decoupleq.damp(H, cfg.damping)
    S, Z = C.start_params(W, H00, 2, 16, False, "half_up", "neuqi")
    np.testing.assert_array_equal(qw.scale, S)
    np.testing.assert_array_equal(qw.zero, Z)


def test_config_resolves_and_checks_init():
    assert QuantConfig().init == "neuqi"
    assert QuantConfig(method="gptq").init == "neuqi"
    assert QuantConfig(init="shrink").to_dict()["init"] == "shrink"
    with pytest.raises(ValueError, match="init must be one of"):
        QuantConfig(init="clip")
