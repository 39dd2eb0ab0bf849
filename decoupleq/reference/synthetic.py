"""A synthetic layer problem that looks like a transformer linear layer's.

Activations of real LLM layers have a fast-decaying spectrum (a few directions
carry most of the energy), a non-zero mean, and a handful of "outlier"
feature channels whose magnitude is tens of times the rest. Weights are
roughly Gaussian with heavier tails and output rows of different scales.
The generator reproduces those traits so that solver comparisons (RTN vs GPTQ
vs decoupleQ) behave as they do on real layers, without needing a model.
"""
from __future__ import annotations

import numpy as np

from . import _checks

SPECTRUM_DECAY = 0.8      # singular values of X fall like k^-0.8
OUTLIER_FRACTION = 1 / 64  # share of input channels that are outliers (at least 1)
OUTLIER_GAIN = 20.0        # their magnitude relative to the other channels
WEIGHT_DOF = 5             # Student-t degrees of freedom of the weights


def synthetic_problem(m, n, seed, n_tokens=None):
    """Weights and Hessian of a synthetic linear layer.

    X (N x n) = Gaussian latents with singular values k^-0.8, rotated by a
    random orthogonal matrix, plus a small per-channel mean; max(1, n/64)
    channels are multiplied by 20 (activation outliers). H = XᵀX / N (float64,
    undamped: damp it before calling a solver). W (m x n) is Student-t (5
    degrees of freedom) with a log-normal scale per row, around 0.02.

    Args:
        m: output features (rows of W), >= 1.
        n: input features, >= 1.
        seed: seed of numpy's default_rng; the result is a function of
            (m, n, seed, n_tokens) only.
        n_tokens: N, the number of calibration tokens; default 4n. N < n gives
            a singular H, as with little calibration data.
    Returns:
        W: float32 (m, n); H: float64 (n, n), symmetric positive semidefinite.
    """
    m = _checks.integer("m", m, low=1)
    n = _checks.integer("n", n, low=1)
    seed = _checks.integer("seed", seed, low=0)
    N = 4 * n if n_tokens is None else _checks.integer("n_tokens", n_tokens, low=1)
    rng = np.random.default_rng(seed)

    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sv = np.arange(1, n + 1, dtype=np.float64) ** -SPECTRUM_DECAY
    X = (rng.standard_normal((N, n)) * sv) @ basis.T
    X += 0.1 * sv[0] * rng.standard_normal(n) / np.sqrt(n)
    outliers = rng.choice(n, size=max(1, int(n * OUTLIER_FRACTION)), replace=False)
    X[:, outliers] *= OUTLIER_GAIN
    H = X.T @ X / N
    H = (H + H.T) / 2

    row_scale = 0.02 * np.exp(0.3 * rng.standard_normal(m))
    t = rng.standard_t(WEIGHT_DOF, size=(m, n)) / np.sqrt(WEIGHT_DOF / (WEIGHT_DOF - 2))
    W = (t * row_scale[:, None]).astype(np.float32)
    return np.ascontiguousarray(W), np.ascontiguousarray(H)
