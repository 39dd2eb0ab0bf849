"""Quantization settings, validated when they are created."""
from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("rtn", "gptq", "decoupleq")
ROUNDINGS = ("gptq", "pgd")
ROUNDING_RULES = ("half_up", "half_even")


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix (and, by default, every layer of a model) is quantized.

    Defaults follow the decoupleQ reference's Llama script (ALGORITHM 4.7) at
    W2 g64, asymmetric, with GPTQ-style rounding and act-order.

    Attributes:
        method: ``"rtn"`` (min-max round-to-nearest), ``"gptq"`` (reference
            GPTQ, min-max groups recomputed along the sweep) or ``"decoupleq"``.
        bits: code width, 2 to 8. Codes are signed, ``-2**(bits-1) .. 2**(bits-1)-1``.
        group_size: input features sharing one scale and zero; ``-1`` for one
            per output channel. Must divide ``in_features``.
        symmetric: zero fixed at 0 and only the scale solved for.
        act_order: integer step visits columns by decreasing Hessian diagonal.
        iterations: decoupleQ's ``max_iter_num``: one GPTQ pass plus
            ``iterations - 1`` alternations of the integer and float steps.
        rounding: decoupleQ's integer step, ``"gptq"`` (column sweep with
            Hessian-inverse error feedback) or ``"pgd"`` (projected Adam on the
            box relaxation, then column-wise rounding). PGD costs
            ``O(pgd_steps_per_column * m * n**3 / 3)``: use it on small layers.
        pgd_steps_before_round: PGD phase A steps (K1).
        pgd_steps_per_column: PGD phase B steps after each rounded column (K2).
        pgd_lr: PGD phase A learning rate (phase B is fixed at 1e-3 as in the reference).
        damping: ``percdamp``: ``H + damping * mean(diag H) * I`` is the
            matrix every error is measured with.
        rounding_rule: ``"half_up"`` (decoupleQ's floor(x + 1/2)) or ``"half_even"``.
        blocksize: columns per lazy block of the GPTQ sweep (a speed knob).
    """

    method: str = "decoupleq"
    bits: int = 2
    group_size: int = 64
    symmetric: bool = False
    act_order: bool = True
    iterations: int = 4
    rounding: str = "gptq"
    pgd_steps_before_round: int = 0
    pgd_steps_per_column: int = 5
    pgd_lr: float = 1e-3
    damping: float = 0.01
    rounding_rule: str = "half_up"
    blocksize: int = 128

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("rounding", self.rounding, ROUNDINGS)
        _choice("rounding_rule", self.rounding_rule, ROUNDING_RULES)
        _integer("bits", self.bits, low=2, high=8)
        _integer("group_size", self.group_size, low=-1)
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per-channel) or a positive integer, got {self.group_size}")
        _integer("iterations", self.iterations, low=1)
        _integer("pgd_steps_before_round", self.pgd_steps_before_round, low=0)
        _integer("pgd_steps_per_column", self.pgd_steps_per_column, low=0)
        _integer("blocksize", self.blocksize, low=1)
        _flag("symmetric", self.symmetric)
        _flag("act_order", self.act_order)
        _positive_float("pgd_lr", self.pgd_lr, allow_zero=False)
        _positive_float("damping", self.damping, allow_zero=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def groups(self, in_features: int) -> int:
        """Number of groups per row for a layer with ``in_features`` columns.

        Raises:
            ValueError: if ``group_size`` does not divide ``in_features``.
        """
        if self.group_size == -1:
            return 1
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}"
            )
        return in_features // self.group_size


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _integer(name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _positive_float(name, value, allow_zero):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
