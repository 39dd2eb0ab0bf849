"""Quantization settings, validated when they are created."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

METHODS = ("rtn", "gptq", "decoupleq", "uniquanf")
INITS = ("minmax", "shrink", "neuqi", "neuqi_int")
#: The init each method gets when ``QuantConfig.init`` is None (see its docstring).
#: UniQuanF always starts from min-max UQ (ALGORITHM 8) and takes no other init.
DEFAULT_INITS = {"rtn": "neuqi", "gptq": "neuqi", "decoupleq": "neuqi", "uniquanf": "minmax"}
ROUNDINGS = ("gptq", "pgd")
ROUNDING_RULES = ("half_up", "half_even")
INIT_WEIGHTINGS = ("hessian_diag", "none")


@dataclass(frozen=True)
class UniQuanFConfig:
    """UniQuanF's settings (ALGORITHM 8), used when ``QuantConfig.method == "uniquanf"``.

    The paper's recipe trains on 128 x 2048 C4 tokens for 20 epochs (2,560
    Adam steps per block at batch 1). The defaults here keep its learning
    rates, mapping and mixing, and cut the epochs for a CPU: with the
    pipeline's usual 32 windows of 256 tokens, ``epochs=2`` is 64 steps per
    block. Chosen by time, not yet by an end-to-end quality sweep: a training
    step on a SmolLM2-135M block (256 tokens, W2 g64) took about 0.6 s of a
    loaded 2-core machine, so 64 steps x 30 blocks is about 20-30 minutes.
    One epoch over 16 WikiText-2 windows lowered block 0's output MSE from
    0.485 (the initialisation) to 0.323 (from 0.770 to 0.441 with the
    paper's unweighted initialisation, ``init_weighting="none"``); decoupleQ
    with block tuning reached 0.144 (0.175 before tuning) on the same
    windows, so at this budget UniQuanF trails decoupleQ on that block.

    Attributes:
        clip_steps: clipping ratios ``k/clip_steps`` (k = 1..clip_steps) tried
            by the initialisation; 1 (the reference script) tries ratio 1
            only; 0 tries ratio 1 and fits the BCQ shift instead.
        init_iters: alternating refinements of the BCQ fit (T, 15 in the reference).
        epochs: passes over the calibration batches when training a block.
        lr_delta: Adam learning rate of delta1, delta2, delta3 (5e-3).
        lr_alpha: Adam learning rate of alpha (5e-4).
        input_prob: probability that an element of the block input comes from
            the quantized path rather than the full-precision one (QDrop, 0.5).
        period: indices are reassigned every ``period`` forward passes (p = 2).
        local_mapping: a reassignment only considers idx-1, idx, idx+1.
        grad_filter: block both gradient paths where |u - level| > min|alpha|.
        seed: seeds the QDrop masks and the order of the batches.
        init_weighting: ``"hessian_diag"`` (beyond the paper): the
            initialisation's BCQ fit and its candidate choice weigh each
            input column's error by the diagonal of the layer's damped
            Hessian (``mean x_j^2`` over the calibration tokens, plus
            ``damping`` times its mean), gathered on the same pass that
            computes the block's targets. ``"none"``: the paper's unweighted
            fit. On SmolLM2-135M's block 0 (4 x 256 WikiText-2 tokens, W2
            g64) the unweighted fit's Hessian-weighted layer error was 2.6x
            (q_proj), 1.6x (k_proj) and 3.6x (o_proj) that of min-max UQ,
            the weighted fit's 0.50x, 0.43x and 0.21x; on every layer of
            blocks 0, 15 and 29 the weighted fit was below min-max UQ at 2
            and 3 bits (``benchmarks/bench_uniquanf_init.py``).
    """

    clip_steps: int = 1
    init_iters: int = 15
    epochs: int = 2
    lr_delta: float = 5e-3
    lr_alpha: float = 5e-4
    input_prob: float = 0.5
    period: int = 2
    local_mapping: bool = True
    grad_filter: bool = True
    seed: int = 0
    init_weighting: str = "hessian_diag"

    def __post_init__(self):
        _integer("clip_steps", self.clip_steps, low=0)
        _integer("init_iters", self.init_iters, low=0)
        _integer("epochs", self.epochs, low=0)
        _positive_float("lr_delta", self.lr_delta, allow_zero=True)
        _positive_float("lr_alpha", self.lr_alpha, allow_zero=True)
        _positive_float("input_prob", self.input_prob, allow_zero=True)
        if self.input_prob > 1:
            raise ValueError(f"input_prob must be in [0, 1], got {self.input_prob}")
        _integer("period", self.period, low=1)
        _flag("local_mapping", self.local_mapping)
        _flag("grad_filter", self.grad_filter)
        _integer("seed", self.seed, low=0)
        _choice("init_weighting", self.init_weighting, INIT_WEIGHTINGS)

    def to_dict(self) -> dict:
        return asdict(self)



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
            per output channel. When it does not divide a layer's
            ``in_features`` the last group of each row is shorter (group
            ``j`` is columns ``j*g .. j*g+g-1``, cut at ``in_features``; there
            are ``ceil(in_features / g)`` groups); ``ModelQuantConfig.indivisible``
            can choose the old per-channel fallback instead.
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
        init: where each group's scale and zero start. ``"minmax"``: the
            group's range (ALGORITHM 1.2); ``"shrink"``: min-max, then each
            row's range shrunk by the factor (1.0 down to 0.205) with the
            lowest Hessian-weighted error (3.3; decoupleQ's reference start);
            ``"neuqi"``: NeUQI (7), a continuous zero and a scale searched
            coarse-to-fine on the error weighted by the Hessian diagonal;
            ``"neuqi_int"``: NeUQI with an integer zero point. How each method
            uses it: RTN rounds with these parameters; GPTQ with ``"minmax"``
            is the reference GPTQ (ranges recomputed along the sweep), with
            any other init it holds the parameters fixed through the sweep
            (static groups, act-order allowed); decoupleQ starts its
            alternation from them (``"shrink"`` runs the search in iteration
            0, as the reference). ``symmetric`` means a zero of 0 for every
            init: min-max and shrink use the range +-max|w|, NeUQI searches
            the scale alone. RTN without a Hessian (data-free) weighs every
            weight equally and cannot use ``"shrink"``. ``None`` (default)
            takes the method's default from ``DEFAULT_INITS``: NeUQI for RTN,
            GPTQ and decoupleQ (UniQuanF starts from min-max UQ). Chosen by
            ``benchmarks/bench_solver.py --real smollm2-135m --inits minmax
            shrink neuqi``: on every linear type of SmolLM2-135M's blocks 0,
            15 and 29, GPTQ + NeUQI's mean loss was 0.40-0.43x min-max GPTQ's
            at W2 per-channel, 0.56-0.63x at W2 g64 and 0.71-0.80x at W4
            per-channel; decoupleQ from NeUQI ended 3-15% below decoupleQ
            from the shrink start on all types but one (W2 per-channel
            down_proj, 1% above). The search costs several GPTQ passes
            (3-18x one on that run), so ``"shrink"`` is the faster choice.
        uniquanf: UniQuanF's settings (a ``UniQuanFConfig``, or a dict of its
            fields), used by ``method="uniquanf"``: binary-coding levels with
            flexible mapping, trained block by block (``decoupleq.quantize``
            only; bits 2 to 4, asymmetric).
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
    init: str | None = None
    uniquanf: UniQuanFConfig = field(default_factory=UniQuanFConfig)

    def __post_init__(self):
        if isinstance(self.uniquanf, dict):
            object.__setattr__(self, "uniquanf", UniQuanFConfig(**self.uniquanf))
        if not isinstance(self.uniquanf, UniQuanFConfig):
            raise TypeError(f"uniquanf must be a UniQuanFConfig or a dict, got {type(self.uniquanf).__name__}")
        if self.method == "uniquanf":
            if isinstance(self.bits, int) and not 2 <= self.bits <= 4:
                raise ValueError(f"bits must be 2, 3 or 4 with method 'uniquanf', got {self.bits}")
            if self.symmetric is True:
                raise ValueError("method 'uniquanf' is asymmetric only: symmetric must be False")
        _choice("method", self.method, METHODS)
        if self.init is None:
            object.__setattr__(self, "init", DEFAULT_INITS[self.method])
        _choice("init", self.init, INITS)
        if self.method == "uniquanf" and self.init != "minmax":
            raise ValueError(f"method 'uniquanf' starts from min-max UQ: init must be 'minmax', got {self.init!r}")
        _choice("rounding", self.rounding, ROUNDINGS)
        _choice("rounding_rule", self.rounding_rule, ROUNDING_RULES)
        _integer("bits", self.bits, low=2, high=8)
        _integer("group_size", self.group_size, low=-1)
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per-channel) or a positive integer, got {self.group_size}")
        # Upper bounds: far past any useful setting, low enough that a typo fails here,
        # naming the field, instead of as an overflow or MemoryError deep in the solver.
        _integer("group_size", self.group_size, high=MAX_GROUP_SIZE)
        _integer("iterations", self.iterations, low=1, high=MAX_ITERATIONS)
        _integer("pgd_steps_before_round", self.pgd_steps_before_round, low=0, high=MAX_PGD_STEPS)
        _integer("pgd_steps_per_column", self.pgd_steps_per_column, low=0, high=MAX_PGD_STEPS)
        _integer("blocksize", self.blocksize, low=1, high=MAX_BLOCKSIZE)
        _flag("symmetric", self.symmetric)
        _flag("act_order", self.act_order)
        _positive_float("pgd_lr", self.pgd_lr, allow_zero=False)
        _positive_float("damping", self.damping, allow_zero=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def groups(self, in_features: int) -> int:
        """Number of groups per row for a layer with ``in_features`` columns:
        ``ceil(in_features / group_size)`` (the last group is shorter when
        ``group_size`` does not divide it), 1 per-channel."""
        return num_groups(in_features, self.group_size)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row: ``ceil(in_features / group_size)``, or 1 when ``group_size == -1``.

    Every group starts at a multiple of ``group_size``, so column ``c`` is in
    group ``c // group_size``; the last group holds what is left
    (``in_features - (G - 1) * group_size`` columns).
    """
    g = None if isinstance(group_size, bool) or not hasattr(group_size, "__index__") else group_size.__index__()
    if g == -1:
        return 1
    if g is None or g < 1:
        raise ValueError(f"group_size must be -1 (per-channel) or a positive int, got {group_size!r}")
    return -(-int(in_features) // g)


#: Upper bounds of QuantConfig's integer knobs: far past any useful setting; a value past
#: one is a ValueError naming the field, not an overflow or MemoryError in the solver.
MAX_ITERATIONS = 1000
MAX_BLOCKSIZE = 1 << 20
MAX_GROUP_SIZE = 1 << 24
MAX_PGD_STEPS = 10**6


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


# ---------------------------------------------------------------------------
# Model-level options (the pipeline: decoupleq.pipeline.quantize)
# ---------------------------------------------------------------------------

from dataclasses import field  # noqa: E402  (kept here so the section above stays untouched)

INDIVISIBLE_POLICIES = ("short", "per_channel", "skip", "error")
TUNE_TARGETS = ("quantized_inputs", "fp_inputs")


@dataclass(frozen=True)
class BlockTuneConfig:
    """Block-wise tuning of the float parts after a block's layers are quantized (ALGORITHM 4.3).

    The integer codes stay frozen. Each step runs the partly quantized block on
    one cached calibration batch and minimises the mean squared error to the
    full-precision block's output on the same (quantized-path) input.

    Defaults are chosen for a CPU: one epoch over the calibration batches at
    ``lr=2e-4`` (the reference uses 1e-5 for 4 epochs over 128 x 2048 tokens;
    with 32 windows of a few hundred tokens there are far fewer steps). On
    SmolLM2-135M, W2 g64 decoupleQ, 32 x 256 WikiText-2 calibration tokens,
    the tuned MSE of its first two blocks was 0.1267 / 0.0734 at 1e-4 x 1 epoch,
    0.1228 / 0.0702 at 1e-4 x 2, **0.1233 / 0.0709 at 2e-4 x 1**, and
    0.1205 / 0.0697 at 4e-4 x 1 (untuned 0.1535 / 0.079); one epoch instead of
    two cut a block's time on 2 cores from 23 s to 20 s
    (``benchmarks/bench_blockwise.py`` runs this comparison). Earlier, on a 4-layer
    byte-level Llama (hidden 128, W2 g32, tinyshakespeare): no tuning 7.016
    perplexity (full precision 6.954), 1e-4 x 2 6.982, 1e-3 unstable (a block's
    loss rose and was restored). If the tuned block's loss ends above the loss
    it started from, the float parts are restored (``keep_best``), so tuning
    never makes a block worse on its calibration data.

    Attributes:
        enabled: run the tuning at all.
        lr: Adam learning rate (betas (0.9, 0.99), eps 2e-5 as in the reference).
        epochs: passes over the cached calibration batches, in fixed order.
        weight_decay: Adam's L2-style decay on every trained parameter.
        train_norms: also train weights and biases of normalization modules
            (LayerNorm, BatchNorm, RMSNorm and any class whose name contains "Norm").
        train_bias: also train the biases of the quantized layers.
        keep_best: restore the pre-tuning float parts if tuning raised the loss.
        target: what the tuned block is fitted to. ``"quantized_inputs"`` (the
            reference's labels): the full-precision block applied to the same
            inputs, which come from the already quantized earlier blocks; each
            block then only learns to undo its own error. ``"fp_inputs"``: the
            full-precision model's own activations, the full-precision block
            applied to the full-precision model's inputs to it; each block
            then also makes up for the error the earlier blocks left. This
            costs one more activation cache (the full-precision path) and one
            more forward of each block over the calibration set. It needs
            blocks that feed each other (as in a decoder); where they do not,
            ``quantize`` warns and uses ``"quantized_inputs"``. SmolLM2-135M,
            W4 per-channel decoupleQ, 64 x 256 WikiText-2 calibration tokens,
            2 epochs: test perplexity 32.84 with ``"quantized_inputs"``, 32.17
            with ``"fp_inputs"`` (full precision 29.60; 16 x 512 tokens).
        batches_per_step: calibration batches whose gradients are averaged into
            one Adam step (1: a step per batch). In a distributed run a step's
            batches are computed by the ranks holding them, so a multiple of
            the world size keeps every rank busy; the result is the same
            (to float rounding) with any number of ranks.
    """

    enabled: bool = True
    lr: float = 2e-4
    epochs: int = 1
    weight_decay: float = 1e-6
    train_norms: bool = True
    train_bias: bool = False
    keep_best: bool = True
    target: str = "quantized_inputs"
    batches_per_step: int = 1

    def __post_init__(self):
        _flag("enabled", self.enabled)
        _positive_float("lr", self.lr, allow_zero=False)
        _integer("epochs", self.epochs, low=1)
        _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _flag("train_norms", self.train_norms)
        _flag("train_bias", self.train_bias)
        _flag("keep_best", self.keep_best)
        _choice("target", self.target, TUNE_TARGETS)
        _integer("batches_per_step", self.batches_per_step, low=1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelQuantConfig:
    """Everything ``decoupleq.quantize`` needs besides the model and the data.

    Attributes:
        quant: how each layer is quantized (a ``QuantConfig``).
        blockwise: block-wise float-part tuning (a ``BlockTuneConfig``); a bool
            is accepted and means ``BlockTuneConfig(enabled=...)``.
        true_sequential: quantize a block's layers group by group
            (Llama: ``[k,v,q], [o], [up,gate], [down]``), each group's Hessians
            taken from the block with the earlier groups already quantized.
            ``False``: every layer's Hessian comes from the full-precision block.
        skip: layers left in full precision, besides embeddings and the output
            head (which are never quantized because they are outside the blocks).
            A callable ``skip(name, module) -> bool``, a pattern, or a tuple of
            patterns, matched against the full dotted module name: glob patterns
            (``"*.mlp.down_proj"``) or, with a ``"re:"`` prefix, regular
            expressions searched in the name (``"re:layers\\.0\\."``).
        cache_budget_mb: MiB of RAM the cached block activations (inputs and,
            with block-wise tuning, the full-precision outputs) may take; past
            it, activations are memory-mapped files in a temporary directory.
        batch_size: rows of a calibration tensor run through the model at once.
        indivisible: what to do with a layer whose input width is not a multiple
            of ``quant.group_size``: ``"short"`` (default: groups of
            ``group_size`` with a shorter last group, ``ceil(in / g)`` groups
            per row, as HQQ and llama.cpp quantize such widths),
            ``"per_channel"`` (the behaviour before short groups: one scale and
            zero per output channel, logged), ``"skip"`` (leave it in full
            precision, logged) or ``"error"`` (ValueError before any work).
            ``method="uniquanf"`` (BCQ layers) has no short last group: with
            ``"short"`` such a layer is a ValueError before any work.
        tmpdir: parent directory of the temporary activation files (default:
            the system temporary directory, never the working directory).
        verbose: progress bars and INFO logs; ``False`` is quiet.
        expert_min_tokens: an MoE expert layer whose own Hessian comes from fewer
            routed calibration tokens than this takes the pooled Hessian of the
            same layer of all experts of its block instead (``decoupleq.moe``).
        shards: None, or a fixed number of virtual shards (>= 1) that makes the
            result independent of the number of ``torchrun`` ranks: calibration
            batch j belongs to shard ``j % shards``, each shard's Hessian sum is
            accumulated alone and the shard sums are added in shard order, and
            each layer's rows are solved in ``shards`` fixed ranges, on every
            world size alike (``decoupleq.distributed``). With the same value, 1,
            2, ... ``shards`` ranks give bit-identical Hessians and models (a
            world size dividing it keeps the ranks' work equal). None: one shard
            per rank (in one process: the plain whole-layer path).
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    blockwise: BlockTuneConfig = field(default_factory=BlockTuneConfig)
    true_sequential: bool = True
    skip: object = ()
    cache_budget_mb: float = 4096.0
    batch_size: int = 1
    indivisible: str = "short"
    tmpdir: object = None
    verbose: bool = True
    expert_min_tokens: int = 64
    shards: object = None

    def __post_init__(self):
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig, got {type(self.quant).__name__}")
        if isinstance(self.blockwise, bool):
            object.__setattr__(self, "blockwise", BlockTuneConfig(enabled=self.blockwise))
        if not isinstance(self.blockwise, BlockTuneConfig):
            raise TypeError(
                f"blockwise must be a BlockTuneConfig or a bool, got {type(self.blockwise).__name__}"
            )
        _flag("true_sequential", self.true_sequential)
        _flag("verbose", self.verbose)
        object.__setattr__(self, "skip", _normalize_skip(self.skip))
        _positive_float("cache_budget_mb", self.cache_budget_mb, allow_zero=True)
        _integer("batch_size", self.batch_size, low=1)
        _integer("expert_min_tokens", self.expert_min_tokens, low=0)
        if self.shards is not None:
            _integer("shards", self.shards, low=1)
        _choice("indivisible", self.indivisible, INDIVISIBLE_POLICIES)
        if self.tmpdir is not None and not isinstance(self.tmpdir, (str, bytes)) and not hasattr(
            self.tmpdir, "__fspath__"
        ):
            raise TypeError(f"tmpdir must be a path or None, got {type(self.tmpdir).__name__}")

    @property
    def needs_calibration(self) -> bool:
        """False for RTN without block tuning: then no activation is ever looked at, and
        ``decoupleq.quantize`` accepts ``calibration=None`` (callers need not build any)."""
        return self.quant.method != "rtn" or self.blockwise.enabled

    def to_dict(self) -> dict:
        """A JSON-friendly summary (a callable ``skip`` is shown by its name)."""
        skip = self.skip
        if callable(skip):
            skip = getattr(skip, "__qualname__", repr(skip))
        else:
            skip = list(skip)
        d = {
            "quant": self.quant.to_dict(),
            "blockwise": self.blockwise.to_dict(),
            "true_sequential": self.true_sequential,
            "skip": skip,
            "cache_budget_mb": self.cache_budget_mb,
            "batch_size": self.batch_size,
            "indivisible": self.indivisible,
            "expert_min_tokens": self.expert_min_tokens,
        }
        if self.shards is not None:  # only when set: older records stay as they were
            d["shards"] = self.shards
        return d


def _normalize_skip(skip):
    import re

    if skip is None:
        return ()
    if callable(skip):
        return skip
    if isinstance(skip, str):
        skip = (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        raise TypeError(
            f"skip must be a callable, a pattern string or a sequence of patterns, got {type(skip).__name__}"
        ) from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip patterns must be strings, got {type(p).__name__} ({p!r})")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"skip pattern {p!r} is not a valid regular expression: {exc}") from None
    return patterns
