"""Quantize one weight matrix against its Hessian: the Python face of the C solver."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import _C
from ._arrays import as_float_matrix
from .config import QuantConfig

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("c", "reference")


@dataclass
class QuantizedWeight:
    """One quantized weight matrix.

    Attributes:
        codes: int8 (m, n), signed integers in ``[-2**(bits-1), 2**(bits-1)-1]``.
        scale: float32 (m, G), one per output row and group of ``group_size`` inputs,
            ``G = ceil(n / group_size)`` (the last group shorter when it does not divide n).
        zero: float32 (m, G), added after scaling (all zero when symmetric).
        loss: float64 (m,), each row's error ``(w^ - w) H00 (w^ - w)^T`` with the
            damped Hessian H00.
        config: the settings that produced it.
        trace: float64 (k, m), each row's best error after each solver step
            (decoupleQ only; one row for RTN and GPTQ).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    loss: np.ndarray
    config: QuantConfig
    trace: np.ndarray = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    @property
    def group_size(self) -> int:
        """Inputs per group, resolved (``in_features`` when there is one group per row).

        Taken from the config: with a short last group, G = ceil(n / g) holds
        for several g, so the shapes alone do not tell it."""
        n = self.codes.shape[1]
        if self.scale.shape[1] == 1:
            return n
        return self.config.group_size

    def dequantize(self) -> np.ndarray:
        """The float32 (m, n) weight ``codes * scale + zero`` groupwise."""
        n = self.codes.shape[1]
        g = self.group_size
        # Group j covers columns j*g .. j*g + g - 1, the last one cut at n.
        s = np.repeat(self.scale, g, axis=1)[:, :n]
        z = np.repeat(self.zero, g, axis=1)[:, :n]
        return self.codes.astype(np.float32) * s + z


def _backend(impl: str):
    if impl == "c":
        return _C
    if impl == "reference":
        from . import reference

        return reference
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _data_free_params(backend, W32, config):
    """(S, Z) without a Hessian: min-max, or NeUQI with every weight counted equally."""
    if config.init == "minmax":
        return backend.minmax_params(W32, config.bits, config.group_size, config.symmetric)
    if config.init == "shrink":
        raise ValueError("init 'shrink' needs a Hessian (H is None); use 'minmax' or 'neuqi'")
    S, Z, _ = backend.neuqi_params(
        W32, config.bits, config.group_size, config.symmetric, None, config.init == "neuqi_int"
    )
    return S, Z


def quantize_weight(W, H, config: QuantConfig | None = None, *, impl: str = "c") -> QuantizedWeight:
    """Quantize the weight ``W`` given the Hessian ``H`` of its layer's inputs.

    Args:
        W: (m, n) weight, rows are output channels: a NumPy array or a CPU
            torch tensor of any float dtype (computed in float32). Not modified.
        H: (n, n) mean outer product of the layer's inputs (as returned by
            ``HessianAccumulator.hessian()``), undamped; damping is applied here
            with ``config.damping``. Not modified. ``None`` is allowed for
            ``method="rtn"`` only: the codes need no Hessian, and ``loss`` is
            then NaN (there is nothing to weigh the error by).
        config: a ``QuantConfig``; the default is decoupleQ W2 g64.
        impl: ``"c"`` (the C core) or ``"reference"`` (the NumPy twin, slow).

    Returns:
        A ``QuantizedWeight``.

    Raises:
        TypeError / ValueError: naming the argument, before any work starts.
    """
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.method == "uniquanf":
        raise ValueError(
            "method 'uniquanf' trains whole blocks: use decoupleq.quantize (its layer-level start is "
            "decoupleq.uniquanf_init.unified_init)"
        )
    backend = _backend(impl)
    W32 = as_float_matrix(W, "W", np.float32)
    m, n = W32.shape
    if m == 0 or n == 0:
        raise ValueError(f"W must have at least one row and one column, got shape {W32.shape}")
    if H is None and config.method != "rtn":
        raise ValueError(f"H is required for method {config.method!r} (only 'rtn' rounds without one)")
    H64 = None if H is None else as_float_matrix(H, "H", np.float64, shape=(n, n))

    common = dict(
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        rule=config.rounding_rule,
    )
    if H64 is None:
        S, Z = _data_free_params(backend, W32, config)
        A = backend.rtn_codes(W32, S, Z, config.bits, config.symmetric, config.rounding_rule,
                              group_size=config.group_size)
        err = np.full(m, np.nan)
        return QuantizedWeight(codes=A, scale=S, zero=Z, loss=err, config=config, trace=err[None, :].copy())
    H00 = backend.damp(H64, config.damping)
    if config.method == "rtn":
        if config.init == "minmax":
            A, S, Z, err = backend.rtn(W32, H00, **common)
        else:
            S, Z = backend.start_params(W32, H00, init=config.init, **common)
            A = backend.rtn_codes(W32, S, Z, config.bits, config.symmetric, config.rounding_rule,
                                  group_size=config.group_size)
            err = backend.row_errors(W32, A, S, Z, H00, group_size=config.group_size)
        trace = err[None, :].copy()
    elif config.method == "gptq":
        if config.init == "minmax":
            A, S, Z, err = backend.gptq(
                W32, H00, act_order=config.act_order, blocksize=config.blocksize, **common
            )
        else:
            # Static groups: the initialisation's parameters, held fixed.
            S, Z = backend.start_params(W32, H00, init=config.init, **common)
            A, err = backend.round_gptq(
                W32, S, Z, H00, act_order=config.act_order, blocksize=config.blocksize,
                baseline_damping=True, **common,
            )
        trace = err[None, :].copy()
    else:
        A, S, Z, err, trace = backend.decoupleq(
            W32,
            H00,
            act_order=config.act_order,
            iterations=config.iterations,
            rounding=config.rounding,
            blocksize=config.blocksize,
            steps_before_round=config.pgd_steps_before_round,
            steps_per_column=config.pgd_steps_per_column,
            lr=config.pgd_lr,
            init=config.init,
            **common,
        )
    log.debug("quantized %dx%d with %s: mean loss %.6g", m, n, config.method, float(err.mean()))
    return QuantizedWeight(codes=A, scale=S, zero=Z, loss=err, config=config, trace=trace)
