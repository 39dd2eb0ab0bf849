"""``quantize`` over several processes with ``torch.distributed`` (launched by ``torchrun``).

The library never starts processes. It joins the process group it finds:
one already initialised by the caller, or, when ``torchrun`` (or anything
else) has set ``WORLD_SIZE`` > 1, ``RANK`` and ``MASTER_ADDR`` in the
environment, one it initialises itself with the gloo backend. Otherwise it
runs in one process as before, and every function here is the identity.

What is split (ALGORITHM 4.2, block by block; the blocks stay in order):

- Calibration batches: rank ``r`` of ``W`` runs batches ``r, r + W, ...``
  (round robin) through the model and every block.
- Hessians: each rank accumulates its batches' tokens; the token-weighted
  sums (``H_r * w_r``, float64) and the weights are summed with all-reduce.
- The layer solve: the rows of each weight are cut into ``W`` contiguous
  ranges, each rank solves its range against the common H, and the codes,
  scales, zeros and losses are all-gathered, so every rank holds the same
  quantized layer. Each row's solve reads only its own row and H, so the
  split does not change a row's integer codes (tests/test_distributed.py
  checks it for every method). Its float parts can move in the last bits:
  OpenBLAS's sgemm rounds a row's dot products differently with the number
  of rows in the call, and decoupleQ's float step amplifies that to ~1e-4
  relative in a scale.
- Block tuning: each step's batches (``BlockTuneConfig.batches_per_step``
  consecutive calibration batches) are spread over their owner ranks; the
  gradients of the float parts are summed with all-reduce (float64) before
  the shared Adam step, so every rank takes the same step. With the default
  of one batch per step only its owner computes a gradient; give
  ``batches_per_step`` a multiple of the world size to keep every rank busy.

Known gap: the float parts differ from one process's in the last bits
(per-rank float32 partial sums in the Hessian, sgemm's row-count-dependent
rounding in the split solve, the gradient summation order), and on some
models later blocks' solves amplify that into different codes (see README,
"Resuming, and several processes"); the tests' tiny Llama gives identical codes.

Collectives go through a gloo group (CPU tensors), also when the default
group is another backend. ``bytes_moved`` counts what each rank sent into
the collectives (the payload sizes, not the transport's own traffic).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: csrc/dq_solver.c's EARLY_STOP_RATE: decoupleQ stops alternating once fewer than this
#: fraction of a layer's rows improved in a step.
EARLY_STOP_RATE = 1e-4


class Dist:
    """This process's place in the run and the collectives ``quantize`` uses.

    Attributes:
        rank, world_size: as torch.distributed's (0 and 1 alone).
        bytes_moved: payload bytes this rank has passed to collectives.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group=None):
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.bytes_moved = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size})"

    # -- data --------------------------------------------------------------

    def shard(self, batches: list) -> list:
        """This rank's calibration batches: ``batches[rank::world_size]``."""
        return batches[self.rank::self.world_size]

    def owner(self, j: int) -> tuple:
        """(rank, local index) of global calibration batch ``j``."""
        return j % self.world_size, j // self.world_size

    # -- collectives -------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier(group=self.group)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a CPU tensor); returns it."""
        if self.active:
            self.bytes_moved += t.numel() * t.element_size()
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def all_reduce_scalars(self, *values: float) -> list:
        """Sums over ranks of a few float64 numbers."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_(t)
        return t.tolist()

    def hessian(self, acc):
        """The layer's H over every rank's tokens, float64 (n, n), and the total token count.

        Args:
            acc: this rank's ``HessianAccumulator`` (may hold no token).

        Raises:
            ValueError: no rank saw a token (as ``acc.hessian()`` alone would).
        """
        if not self.active:
            return acc.hessian(), int(acc.n_tokens)
        n = acc.n_features
        w = float(acc.total_weight)
        # The mean times its weight is the rank's sum (to float64 rounding).
        S = torch.from_numpy(acc.hessian() * w) if w > 0 else torch.zeros((n, n), dtype=torch.float64)
        tw = torch.tensor([w, float(acc.n_tokens)], dtype=torch.float64)
        self.all_reduce_(S)
        self.all_reduce_(tw)
        if tw[0] <= 0:
            raise ValueError("no calibration token reached this layer on any rank")
        return np.ascontiguousarray((S / tw[0]).numpy()), int(tw[1])

    def row_range(self, m: int, rank: int | None = None) -> tuple:
        """Rows ``[lo, hi)`` of an m-row layer that ``rank`` solves (contiguous, sizes differing by <= 1)."""
        r = self.rank if rank is None else rank
        base, extra = divmod(m, self.world_size)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def quantize_weight(self, W, H, config):
        """``decoupleq.quantize_weight`` with the rows split over ranks; every rank gets the whole result.

        Why a row's codes do not depend on the split (its float parts do, in
        the last bits, through sgemm's rounding; see the module docstring):
        every step of the solvers reads only the row itself and H, and decoupleQ's early stop
        (``EARLY_STOP_RATE`` = 1e-4 of the rows improving, csrc/dq_solver.c)
        fires only when no row at all improved as long as a layer has at most
        10,000 rows, and then the rows of every range stop too; a range that
        stops before the others holds rows that no later step would touch, so
        its trace is extended with their last errors. A layer of more rows,
        where a few improving rows can stop the whole layer, is solved whole by
        one rank and broadcast, so its codes are still those of one process.
        """
        from .solver import QuantizedWeight, quantize_weight

        if not self.active:
            return quantize_weight(W, H, config)
        Wt = torch.as_tensor(W)
        m = Wt.shape[0]
        if m * EARLY_STOP_RATE > 1.0 and config.method == "decoupleq":
            return self._solve_on_one_rank(Wt, H, config)
        lo, hi = self.row_range(m)
        pieces = None
        if hi > lo:
            part = quantize_weight(Wt[lo:hi], H, config)
            pieces = [part.codes, part.scale, part.zero, part.loss, part.trace]
        desc = torch.zeros(3, dtype=torch.int64)
        if pieces is not None:
            desc[:] = torch.tensor([pieces[0].shape[1], pieces[1].shape[1], pieces[4].shape[0]])
        self.bytes_moved += desc.numel() * 8
        torch.distributed.all_reduce(desc, op=torch.distributed.ReduceOp.MAX, group=self.group)
        n, G, k = (int(x) for x in desc)
        if pieces is not None and pieces[4].shape[0] < k:
            # This range stopped early: its rows keep their last errors for the remaining steps.
            t = pieces[4]
            pieces[4] = np.concatenate([t, np.repeat(t[-1:], k - t.shape[0], axis=0)])
        shapes = [(np.int8, (n,), False), (np.float32, (G,), False), (np.float32, (G,), False),
                  (np.float64, (), False), (np.float64, (k,), True)]
        codes, scale, zero, loss, trace = (
            self._gather_rows(None if pieces is None else pieces[i], m, dtype, tail, tr)
            for i, (dtype, tail, tr) in enumerate(shapes)
        )
        return QuantizedWeight(codes=codes, scale=scale, zero=zero, loss=loss, config=config, trace=trace)

    def _solve_on_one_rank(self, Wt, H, config):
        """Rank 0 solves the whole layer; the others receive its result."""
        from .solver import QuantizedWeight, quantize_weight

        m, n = Wt.shape
        if self.rank == 0:
            qw = quantize_weight(Wt, H, config)
            arrays = [qw.codes, qw.scale, qw.zero, qw.loss, qw.trace]
            desc = torch.tensor([qw.scale.shape[1], qw.trace.shape[0]], dtype=torch.int64)
        else:
            desc = torch.zeros(2, dtype=torch.int64)
        torch.distributed.broadcast(desc, src=0, group=self.group)
        G, k = (int(x) for x in desc)
        shapes = [((m, n), np.int8), ((m, G), np.float32), ((m, G), np.float32), ((m,), np.float64),
                  ((k, m), np.float64)]
        out = []
        for i, (shape, dtype) in enumerate(shapes):
            t = torch.from_numpy(np.ascontiguousarray(arrays[i])) if self.rank == 0 else \
                torch.from_numpy(np.zeros(shape, dtype))
            self.bytes_moved += t.numel() * t.element_size()
            torch.distributed.broadcast(t, src=0, group=self.group)
            out.append(t.numpy())
        codes, scale, zero, loss, trace = out
        return QuantizedWeight(codes=codes, scale=scale, zero=zero, loss=loss, config=config, trace=trace)

    def _gather_rows(self, piece, m, dtype, tail, trace):
        """All-gather row ranges (padded to the largest range) into one array of m rows.

        ``trace`` pieces are (k, rows): gathered along their second axis."""
        sizes = [self.row_range(m, r) for r in range(self.world_size)]
        most = max(hi - lo for lo, hi in sizes)
        buf = torch.from_numpy(np.zeros((most,) + tuple(tail), dtype))
        if piece is not None:
            p = torch.from_numpy(np.ascontiguousarray(piece.T if trace else piece))
            buf[: p.shape[0]] = p
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.bytes_moved += buf.numel() * buf.element_size() * self.world_size
        torch.distributed.all_gather(bufs, buf, group=self.group)
        full = torch.cat([b[: hi - lo] for b, (lo, hi) in zip(bufs, sizes)]).numpy()
        return np.ascontiguousarray(full.T if trace else full)

    def all_reduce_grads(self, params, count: int) -> None:
        """Sum every parameter's gradient over ranks (float64) and divide by ``count``.

        A parameter without a gradient on this rank contributes zeros; one
        without a gradient on every rank keeps none (the optimizer skips it,
        as in one process)."""
        if not params:
            return
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(torch.float64)
            for p in params
        ] + [torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)])
        self.all_reduce_(flat)
        has = flat[-len(params):]
        at = 0
        for j, p in enumerate(params):
            k = p.numel()
            p.grad = (flat[at: at + k] / count).view(p.shape).to(p.dtype) if has[j] > 0 else None
            at += k


_SINGLE = Dist()
_CURRENT = None  # (key, Dist) of the process group last joined


def _gloo_group():
    """A gloo group over every rank: the default group when it is gloo, else a new one."""
    import torch.distributed as td

    if td.get_backend() == "gloo":
        return None
    return td.new_group(backend="gloo")


def current() -> Dist:
    """The ``Dist`` of this process: the initialised process group, one described by
    the environment (``torchrun``; initialised here with gloo), or a single process."""
    if not torch.distributed.is_available():
        return _SINGLE
    import torch.distributed as td

    if not td.is_initialized():
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            world = 1
        if world <= 1 or not all(k in os.environ for k in _ENV):
            return _SINGLE
        td.init_process_group(backend="gloo")
        log.info("joined a gloo process group from the environment: rank %d of %d", td.get_rank(), world)
    if td.get_world_size() <= 1:
        return _SINGLE
    global _CURRENT
    key = (td.get_rank(), td.get_world_size(), id(td.group.WORLD))
    if _CURRENT is None or _CURRENT[0] != key:
        # One Dist per process group: its gloo group is made once, and bytes_moved adds up over calls.
        _CURRENT = (key, Dist(key[0], key[1], _gloo_group()))
    return _CURRENT[1]
