"""``quantize`` over several processes with ``torch.distributed`` (launched by ``torchrun``).

The library never starts processes. It joins the process group it finds:
one already initialised by the caller, or, when ``torchrun`` (or anything
else) has set ``WORLD_SIZE`` > 1, ``RANK`` and ``MASTER_ADDR`` in the
environment, one it initialises itself with the gloo backend. Otherwise it
runs in one process as before.

What is split (ALGORITHM 4.2, block by block; the blocks stay in order), with
S virtual shards (``ModelQuantConfig.shards``; None: S = the world size W):

- Calibration batches: batch ``j`` belongs to shard ``j % S``, and shard
  ``s`` to rank ``s % W`` (with S = W, or W dividing S: round robin, rank
  ``r`` runs batches ``r, r + W, ...``).
- Hessians: each shard's tokens go to their own accumulator (float32 partial
  sums, flushed into float64, in the shard's batch order); the shard sums are
  all-gathered and every rank adds them in shard order. A shard's sum does
  not depend on W, nor does the order of the additions, so with a fixed S
  every world size up to S gives bit-identical Hessians (the price: each rank
  holds S / W accumulators per layer input and receives S sums, not one).
- The layer solve: the rows of each weight are cut into S fixed contiguous
  ranges (``row_range``), range ``c`` is solved by rank ``c % W`` against the
  common H, and the codes, scales, zeros and losses are all-gathered, so
  every rank holds the same quantized layer. A range's solve depends only on
  its rows and H, so with a fixed S its result, floats included, is the same
  for every W. (Solving ranges of another size would move the float parts
  in the last bits: OpenBLAS's sgemm rounds a row's dot products differently
  with the rows in the call, and decoupleQ's float step amplifies that.)
- Block tuning: each step's batches (``BlockTuneConfig.batches_per_step``
  consecutive calibration batches) are run by their owners, each batch's
  gradient goes into its own float64 slot, the slots are summed over ranks
  (every slot has one nonzero contributor, so the sum is exact) and added in
  batch order; every rank takes the same Adam step. Losses likewise.

So with ``shards=S`` set, 1, 2, ... S ranks give bit-identical Hessians,
codes and float parts (tests/test_distributed.py: S = 6, W = 1, 2, 3),
provided every rank runs torch with the same thread count (a block's forward
pass rounds differently with torch's intra-op threads). With ``shards=None``
the codes match one process on small models but can diverge after a few
blocks (a last-bit difference flips a near-tie in a later solve).

Failures: a rank that raises during the run tells the others at their next
collective (every collective here starts with a small status all-reduce),
and they raise ``PeerFailure`` instead of waiting for gloo's timeout.

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


class PeerFailure(RuntimeError):
    """Another rank failed during the run; this one stops too (the first error is on that rank)."""


class ShardedAccumulator:
    """A layer input's Hessian kept as one ``HessianAccumulator`` per virtual shard.

    ``add`` sends the tokens to the shard of the batch being run
    (``Dist.batch``, set by the pipeline before each forward). Read the
    result with ``Dist.hessian``.
    """

    def __init__(self, dist: "Dist", n_features: int):
        self.dist = dist
        self.n_features = int(n_features)
        self.parts = {}  # shard -> HessianAccumulator

    def add(self, X, mask=None, weights=None) -> None:
        from .hessian import HessianAccumulator

        s = self.dist.shard_of(self.dist.global_index(self.dist.batch))
        acc = self.parts.get(s)
        if acc is None:
            acc = self.parts[s] = HessianAccumulator(self.n_features)
        acc.add(X, mask, weights)

    @property
    def n_tokens(self) -> int:
        return sum(int(a.n_tokens) for a in self.parts.values())

    @property
    def total_weight(self) -> float:
        return sum(float(a.total_weight) for a in self.parts.values())


class Dist:
    """This process's place in the run and the collectives ``quantize`` uses.

    Attributes:
        rank, world_size: as torch.distributed's (0 and 1 alone).
        shards: the virtual shard count of the run (None: one per rank).
        n_batches: calibration batches of the run over all ranks (None: not planned).
        batch: local index of the batch being run (read by ``ShardedAccumulator``).
        bytes_moved: payload bytes this rank has passed to collectives (shared
            by the ``planned`` copies of one process group's Dist).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, shards=None, n_batches=None,
                 _counter=None):
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.shards = shards
        self.n_batches = n_batches
        self.batch = 0
        self._counter = _counter if _counter is not None else [0]
        self._mine = self._local = None
        if n_batches is not None:
            self._mine = [j for j in range(n_batches) if self.batch_rank(j) == rank]
            seen = [0] * world_size
            self._local = []  # global batch -> its index among its owner's batches
            for j in range(n_batches):
                r = self.batch_rank(j)
                self._local.append(seen[r])
                seen[r] += 1

    @property
    def bytes_moved(self) -> int:
        return self._counter[0]

    @bytes_moved.setter
    def bytes_moved(self, value: int) -> None:
        self._counter[0] = value

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def n_shards(self) -> int:
        """S: the fixed shard count, or the world size when none is set."""
        return self.world_size if self.shards is None else self.shards

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, shards={self.shards})"

    def planned(self, shards, n_batches: int) -> "Dist":
        """This process's Dist for one run of ``n_batches`` batches over ``shards`` virtual shards.

        Raises:
            ValueError: fewer shards than ranks (a rank would own none).
        """
        if shards is not None and shards < self.world_size:
            raise ValueError(f"shards ({shards}) must be at least the world size ({self.world_size}): "
                             "every rank owns whole shards")
        return Dist(self.rank, self.world_size, self.group, shards, n_batches, self._counter)

    # -- data --------------------------------------------------------------

    def shard_of(self, j: int) -> int:
        """The virtual shard of global calibration batch ``j``."""
        return j % self.n_shards

    def batch_rank(self, j: int) -> int:
        """The rank that runs global calibration batch ``j`` (the owner of its shard)."""
        return self.shard_of(j) % self.world_size

    def shard(self, batches: list) -> list:
        """This rank's calibration batches, in order (round robin when W divides S)."""
        return [b for j, b in enumerate(batches) if self.batch_rank(j) == self.rank]

    def global_index(self, i: int) -> int:
        """The global index of this rank's local batch ``i``."""
        if self._mine is None:
            return self.rank + i * self.world_size
        return self._mine[i]

    def owner(self, j: int) -> tuple:
        """(rank, local index) of global calibration batch ``j``."""
        r = self.batch_rank(j)
        if self._local is None:
            return r, j // self.world_size
        return r, self._local[j]

    # -- collectives -------------------------------------------------------

    def _check(self) -> None:
        """The status exchange that starts every collective: raises PeerFailure if a rank failed."""
        if not self.active:
            return
        flags = torch.zeros(self.world_size, dtype=torch.float64)
        self._counter[0] += flags.numel() * 8
        torch.distributed.all_reduce(flags, group=self.group)
        if bool((flags > 0).any()):
            bad = [r for r in range(self.world_size) if flags[r] > 0]
            raise PeerFailure(f"rank(s) {', '.join(map(str, bad))} failed; rank {self.rank} stops too "
                              "(the error is in the failed rank's log)")

    def signal_failure(self) -> None:
        """Tell the other ranks, at their next collective, that this rank failed.

        Called once by a rank whose own work raised (not after a PeerFailure or a
        broken collective); errors of the exchange itself are ignored."""
        if not self.active:
            return
        flags = torch.zeros(self.world_size, dtype=torch.float64)
        flags[self.rank] = 1.0
        try:
            torch.distributed.all_reduce(flags, group=self.group)
        except Exception:  # the group is already broken: nothing left to tell
            log.debug("rank %d could not signal its failure", self.rank, exc_info=True)

    def barrier(self) -> None:
        if self.active:
            self._check()
            torch.distributed.barrier(group=self.group)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a CPU tensor); returns it."""
        if self.active:
            self._check()
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

    def _all_gather(self, buf: torch.Tensor) -> list:
        """Every rank's ``buf`` (same shape everywhere), indexed by rank."""
        if not self.active:
            return [buf]
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.bytes_moved += buf.numel() * buf.element_size() * self.world_size
        torch.distributed.all_gather(bufs, buf, group=self.group)
        return bufs

    def fold_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of float64 ``slots`` (k, c), each row filled by one rank only
        (zeros elsewhere), then its rows added in order: the same bits on every world size.

        x + 0 is exact, so the all-reduce only gathers; the one rounding order is
        the fold below."""
        self.all_reduce_(slots)
        total = slots[0].clone()
        for row in slots[1:]:
            total += row
        return total

    def accumulator(self, n_features: int):
        """A fresh Hessian accumulator for a layer input: plain with one shard, else sharded."""
        if self.n_shards == 1:
            from .hessian import HessianAccumulator

            return HessianAccumulator(n_features)
        return ShardedAccumulator(self, n_features)

    def hessian(self, acc):
        """The layer's H over every rank's tokens, float64 (n, n), and the total token count.

        Args:
            acc: this rank's accumulator from ``accumulator`` (may hold no token).

        Raises:
            ValueError: no rank saw a token (as ``acc.hessian()`` alone would).
        """
        if not isinstance(acc, ShardedAccumulator):
            return acc.hessian(), int(acc.n_tokens)
        n, W, S = acc.n_features, self.world_size, self.n_shards
        sums = {}
        for s, part in acc.parts.items():
            w = float(part.total_weight)
            if w > 0:  # the mean times its weight: the shard's sum, to float64 rounding
                sums[s] = (part.hessian() * w, w, float(part.n_tokens))
        total, weight, tokens = None, 0.0, 0.0
        self._check()
        # Round k: rank r contributes its shard k W + r (shard s belongs to rank s % W).
        for k in range(-(-S // W)):
            buf = torch.zeros(n * n + 2, dtype=torch.float64)
            got = sums.get(k * W + self.rank)
            if got is not None:
                buf[: n * n] = torch.from_numpy(got[0]).reshape(-1)
                buf[n * n:] = torch.tensor(got[1:], dtype=torch.float64)
            for r, b in enumerate(self._all_gather(buf)):
                if k * W + r >= S or not b[n * n] > 0:
                    continue
                total = b[: n * n].clone() if total is None else total.add_(b[: n * n])
                weight += float(b[n * n])
                tokens += float(b[n * n + 1])
        if total is None:
            raise ValueError("no calibration token reached this layer on any rank")
        return np.ascontiguousarray((total / weight).reshape(n, n).numpy()), int(tokens)

    def row_range(self, m: int, rank: int | None = None, parts: int | None = None) -> tuple:
        """Rows ``[lo, hi)`` of part ``rank`` of an m-row layer cut into ``parts`` (default: the
        world size) contiguous ranges whose sizes differ by <= 1."""
        r = self.rank if rank is None else rank
        p = self.world_size if parts is None else parts
        base, extra = divmod(m, p)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def quantize_weight(self, W, H, config):
        """``decoupleq.quantize_weight`` on S fixed row ranges spread over ranks; every rank gets
        the whole result (with one shard in one process: the plain whole-layer solve).

        Why a row's codes do not depend on the split (with a fixed S nothing does;
        otherwise its float parts can move in the last bits, see the module docstring):
        every step of the solvers reads only the row itself and H, and decoupleQ's early stop
        (``EARLY_STOP_RATE`` = 1e-4 of the rows improving, csrc/dq_solver.c)
        fires only when no row at all improved as long as a layer has at most
        10,000 rows, and then the rows of every range stop too; a range that
        stops before the others holds rows that no later step would touch, so
        its trace is extended with their last errors. Without a fixed S, a layer
        of more rows, where a few improving rows can stop the whole layer, is
        solved whole by one rank and broadcast, so its codes are still those of
        one process. (With a fixed S the ranges are the definition of the result.)
        """
        from .solver import QuantizedWeight, quantize_weight

        S, WS = self.n_shards, self.world_size
        if S == 1:
            return quantize_weight(W, H, config)
        Wt = torch.as_tensor(W)
        m = Wt.shape[0]
        if self.shards is None and m * EARLY_STOP_RATE > 1.0 and config.method == "decoupleq":
            return self._solve_on_one_rank(Wt, H, config)
        pieces = {}
        for c in range(self.rank, S, WS):
            lo, hi = self.row_range(m, c, S)
            if hi > lo:
                part = quantize_weight(Wt[lo:hi], H, config)
                pieces[c] = [part.codes, part.scale, part.zero, part.loss, part.trace]
        desc = torch.zeros(3, dtype=torch.int64)
        for p in pieces.values():
            desc = torch.maximum(desc, torch.tensor([p[0].shape[1], p[1].shape[1], p[4].shape[0]]))
        if self.active:
            self._check()
            self.bytes_moved += desc.numel() * 8
            torch.distributed.all_reduce(desc, op=torch.distributed.ReduceOp.MAX, group=self.group)
        n, G, k = (int(x) for x in desc)
        for p in pieces.values():
            if p[4].shape[0] < k:
                # This range stopped early: its rows keep their last errors for the remaining steps.
                t = p[4]
                p[4] = np.concatenate([t, np.repeat(t[-1:], k - t.shape[0], axis=0)])
        shapes = [(np.int8, (n,), False), (np.float32, (G,), False), (np.float32, (G,), False),
                  (np.float64, (), False), (np.float64, (k,), True)]
        codes, scale, zero, loss, trace = (
            self._gather_rows({c: p[i] for c, p in pieces.items()}, m, dtype, tail, tr)
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
        if self.active:
            self._check()
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

    def _gather_rows(self, pieces: dict, m, dtype, tail, trace):
        """All-gather the S row ranges ({range: rows} of this rank) into one array of m rows.

        Round k carries range k W + r from rank r, padded to the largest range.
        ``trace`` pieces are (k, rows): gathered along their second axis."""
        S, WS = self.n_shards, self.world_size
        sizes = [self.row_range(m, c, S) for c in range(S)]
        most = max(hi - lo for lo, hi in sizes)
        parts = [None] * S
        for k in range(-(-S // WS)):
            buf = torch.from_numpy(np.zeros((most,) + tuple(tail), dtype))
            piece = pieces.get(k * WS + self.rank)
            if piece is not None:
                p = torch.from_numpy(np.ascontiguousarray(piece.T if trace else piece))
                buf[: p.shape[0]] = p
            for r, b in enumerate(self._all_gather(buf)):
                c = k * WS + r
                if c < S:
                    lo, hi = sizes[c]
                    parts[c] = b[: hi - lo]
        full = torch.cat(parts).numpy()
        return np.ascontiguousarray(full.T if trace else full)

    def sum_batch_grads(self, params, slots: list, count: int) -> float:
        """Set every parameter's gradient to the mean over a step's ``count`` batches.

        Args:
            params: the trained parameters (same order on every rank).
            slots: this rank's batches of the step: ``(position in the step, loss)``
                after each batch's own backward pass, its gradients read here from
                ``p.grad`` as they were then (a list of (position, loss, grads)).
            count: the step's batches over all ranks.

        Each batch's gradient is one float64 slot; the slots are summed over
        ranks (exactly: one contributor each) and added in batch order, so the
        step is the same on every world size. A parameter that no batch gave a
        gradient keeps none (the optimizer skips it, as in one process).

        Returns:
            The step's summed loss.
        """
        sizes = [p.numel() for p in params]
        P = sum(sizes)
        buf = torch.zeros((count, P + len(params) + 1), dtype=torch.float64)
        for pos, loss, grads in slots:
            at = 0
            for j, (g, k) in enumerate(zip(grads, sizes)):
                if g is not None:
                    buf[pos, at: at + k] = g.reshape(-1).to(torch.float64)
                    buf[pos, P + j] = 1.0
                at += k
            buf[pos, -1] = loss
        total = self.fold_slots(buf)
        at = 0
        for j, (p, k) in enumerate(zip(params, sizes)):
            p.grad = (total[at: at + k] / count).view(p.shape).to(p.dtype) if total[P + j] > 0 else None
            at += k
        return float(total[-1])


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
