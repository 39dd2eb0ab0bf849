"""Resumable runs: each finished block of ``quantize`` is written to a run folder.

``quantize(model, calib, config, checkpoint_dir=DIR)`` writes, after every
block, what that block became and the next block's inputs; a run killed part
way (Ctrl-C, SIGKILL, a lost machine) and started again with the same model,
calibration data and settings (``resume=True``; ``--resume`` on the CLI)
skips the finished blocks and ends with the same bytes as a run that was
never interrupted.

The folder holds:

``fingerprint.json``
    What the run is for: the model (its config, parameter names, shapes,
    dtypes and a digest of the weights), the settings that change results,
    a digest of the calibration batches, the block names, the world size and
    the library version. Resuming with anything else is a ValueError that
    names what differs.
``block-KKKKK.safetensors``
    Block K once finished: the integer codes of each quantized layer
    (``codes/<layer>``, int8 (out, in)), the block's whole state after
    quantization and tuning (``state/<key>``), the global torch RNG state
    (``rng/torch``), and in the metadata the layer settings and the report
    entries. Written by rank 0 (every rank holds the same block).
``inputs-KKKKK.rankR.safetensors``
    The inputs of block K + 1 on rank R (``inputs/<j>``, and ``fp_inputs/<j>``
    for the ``"fp_inputs"`` tuning target), exactly as the uninterrupted run
    holds them, so nothing is recomputed with another summation order. Only
    the newest is kept. Blocks that do not feed each other need none (their
    inputs are caught afresh from the model with the restored blocks).
``progress.json``
    ``{"done": K}``: the commit record, replaced atomically after the block
    file and every rank's inputs file are complete. A run killed before it is
    replaced redoes block K.

Every file is written to a temporary name and renamed (``io._atomic_write``),
so a kill at any moment leaves either the old or the new file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import torch
from torch import nn

from .io import _atomic_write

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
PROGRESS = "progress.json"
_BLOCK_RE = re.compile(r"^block-(\d{5})\.safetensors$")
_INPUTS_RE = re.compile(r"^inputs-(\d{5})\.rank(\d+)\.safetensors$")

# ModelQuantConfig.to_dict() keys that do not change a single result byte
# (a different activation budget on resume is fine).
_NEUTRAL_SETTINGS = ("cache_budget_mb",)


# ---------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: hash its bits
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _digest_tensors(items) -> str:
    """blake2b over (name, dtype, shape, bytes) of each (name, tensor); about 1 GB/s."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in items:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _batch_items(batches):
    for i, b in enumerate(batches):
        if isinstance(b, torch.Tensor):
            yield f"{i}", b
        else:
            for k in sorted(b):
                v = b[k]
                if isinstance(v, torch.Tensor):
                    yield f"{i}.{k}", v
                else:
                    yield f"{i}.{k}={v!r}", torch.zeros(0)


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=repr))


def fingerprint(model: nn.Module, batches: list, settings: dict, block_names: list, world_size: int,
                weights=None) -> dict:
    """What a run folder belongs to (a JSON-friendly dict of parts, compared part by part).

    Args:
        model: the model as given to ``quantize`` (before any change).
        batches: the whole calibration set (every rank's batches), as normalised by
            ``calibration_batches``.
        settings: ``ModelQuantConfig.to_dict()``.
        block_names: the blocks' dotted names.
        world_size: processes taking part.
        weights: (name, tensor) of ``model.state_dict()`` when the model does not hold them
            (a model streamed from disk, ``decoupleq.stream``); the same digest.
    """
    from . import __version__

    cfg = getattr(model, "config", None)
    model_cfg = None
    if cfg is not None and hasattr(cfg, "to_dict"):
        model_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    params = list(model.state_dict().items())
    return _jsonable({
        "model": {
            "class": type(model).__name__,
            "config": model_cfg,
            "tensors": [[k, str(v.dtype), list(v.shape)] for k, v in params],
            "weights_digest": _digest_tensors(params if weights is None else weights),
        },
        "settings": {k: v for k, v in settings.items() if k not in _NEUTRAL_SETTINGS},
        "calibration": {"batches": len(batches), "digest": _digest_tensors(_batch_items(batches))},
        "blocks": list(block_names),
        "world_size": int(world_size),
        "library_version": __version__,
    })


def _differences(old, new, where="") -> list:
    """Dotted paths where two JSON values differ (at most a few, for the message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else k)
        return out
    if old != new:
        if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
            return [where]
        return [f"{where} ({old!r} in the folder, {new!r} now)"]
    return []


# ---------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, sort_keys=True, indent=1)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


class RunFolder:
    """One run's checkpoint folder, opened by ``open_run``.

    Attributes:
        path: the folder.
        done: index of the last committed block, -1 if none.
        rank, world_size: this process's place in the run.
    """

    def __init__(self, path: str, done: int, rank: int, world_size: int):
        self.path = path
        self.done = done
        self.rank = rank
        self.world_size = world_size

    def _block_path(self, i: int) -> str:
        return os.path.join(self.path, f"block-{i:05d}.safetensors")

    def _inputs_path(self, i: int, rank: int) -> str:
        return os.path.join(self.path, f"inputs-{i:05d}.rank{rank}.safetensors")

    # -- writing ------------------------------------------------------------

    def write_block(self, i: int, block: nn.Module, layers: dict, meta: dict) -> None:
        """Save finished block ``i`` (rank 0 only; every rank holds the same block).

        Args:
            block: the block as it now is (quantized layers in place, tuned).
            layers: relative name -> the quantized module (``QuantLinear`` / ``QuantConv2d``).
            meta: JSON-friendly report entries and layer settings, returned by ``read_block``.
        """
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        tensors = {f"state/{k}": v.detach().cpu().clone().contiguous() for k, v in block.state_dict().items()}
        for rel, m in layers.items():
            tensors[f"codes/{rel}"] = m.codes.detach().cpu().clone().contiguous()
        tensors["rng/torch"] = torch.get_rng_state()
        text = json.dumps(_jsonable(meta), sort_keys=True)
        _atomic_write(self._block_path(i), lambda tmp: save_file(tensors, tmp, metadata={"decoupleq.resume": text}))

    def write_inputs(self, i: int, inputs, fp_inputs) -> None:
        """Save this rank's inputs of block ``i + 1`` (and the full-precision path's, if any)."""
        from safetensors.torch import save_file

        tensors = {f"inputs/{j}": inputs[j].detach().cpu().contiguous() for j in range(len(inputs))}
        if fp_inputs is not None:
            tensors.update({f"fp_inputs/{j}": fp_inputs[j].detach().cpu().contiguous() for j in range(len(fp_inputs))})
        _atomic_write(self._inputs_path(i, self.rank), lambda tmp: save_file(tensors, tmp))

    def commit(self, i: int, dist) -> None:
        """Record block ``i`` as done (after every rank wrote its part), then drop older inputs."""
        dist.barrier()
        if self.rank == 0:
            _write_json(os.path.join(self.path, PROGRESS), {"done": i})
        dist.barrier()
        self.done = i
        self._remove_old_inputs(keep=i)

    def _remove_old_inputs(self, keep: int) -> None:
        for name in os.listdir(self.path):
            m = _INPUTS_RE.match(name)
            if m and int(m.group(2)) == self.rank and int(m.group(1)) != keep:
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    # -- reading ------------------------------------------------------------

    def read_block(self, i: int):
        """(codes by layer, state dict, torch RNG state, meta) of committed block ``i``."""
        from safetensors import safe_open

        path = self._block_path(i)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint_dir {self.path!r}: {os.path.basename(path)} is missing "
                             f"though progress.json says block {self.done} is done")
        codes, state, rng = {}, {}, None
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["decoupleq.resume"])
            for k in f.keys():
                kind, _, rest = k.partition("/")
                if kind == "codes":
                    codes[rest] = f.get_tensor(k)
                elif kind == "state":
                    state[rest] = f.get_tensor(k)
                elif k == "rng/torch":
                    rng = f.get_tensor(k)
        return codes, state, rng, meta

    def read_inputs(self, i: int, inputs, fp_inputs) -> None:
        """Replace this rank's cached inputs (and fp inputs) by those saved after block ``i``."""
        from safetensors import safe_open

        path = self._inputs_path(i, self.rank)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint_dir {self.path!r}: {os.path.basename(path)} is missing "
                             f"though progress.json says block {i} is done")
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for j in range(len(inputs)):
                inputs[j] = f.get_tensor(f"inputs/{j}")
            if fp_inputs is not None:
                for j in range(len(fp_inputs)):
                    fp_inputs[j] = f.get_tensor(f"fp_inputs/{j}")
        expected = len(inputs) + (len(fp_inputs) if fp_inputs is not None else 0)
        if len(keys) != expected:
            raise ValueError(f"checkpoint_dir {self.path!r}: {os.path.basename(path)} holds {len(keys)} tensors, "
                             f"expected {expected}")


def open_run(path, fp: dict, resume: bool, rank: int = 0, world_size: int = 1, dist=None) -> RunFolder:
    """Create or reopen the run folder ``path`` for a run with fingerprint ``fp``.

    A missing folder (or an empty one) starts a new run. A folder holding a
    run with the same fingerprint is resumed when ``resume`` is True and
    refused otherwise; a folder holding another run, or other files, is
    refused. Nothing in the folder is changed before these checks pass.

    Raises:
        ValueError naming ``checkpoint_dir`` and, for another run, what differs.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint_dir {path!r} exists and is not a directory")
    fp_path = os.path.join(path, FINGERPRINT)
    names = [n for n in os.listdir(path) if not n.startswith(".")] if os.path.isdir(path) else []
    if names and FINGERPRINT not in names:
        raise ValueError(f"checkpoint_dir {path!r} is not empty and holds no {FINGERPRINT}: not a run folder "
                         "(give an empty or new folder)")
    done = -1
    if FINGERPRINT in names:
        with open(fp_path) as f:
            old = json.load(f)
        diff = _differences(old, fp)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; ... ({len(diff) - 4} more)" if len(diff) > 4 else "")
            raise ValueError(f"checkpoint_dir {path!r} belongs to another run: {shown}")
        progress = os.path.join(path, PROGRESS)
        if os.path.isfile(progress):
            with open(progress) as f:
                done = int(json.load(f)["done"])
        if done >= 0 and not resume:
            raise ValueError(f"checkpoint_dir {path!r} holds a run with {done + 1} finished block(s): pass "
                             "resume=True (--resume) to continue it, or give another folder")
    if dist is not None:
        dist.barrier()  # every rank checked before rank 0 writes
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        if FINGERPRINT not in names:
            _write_json(fp_path, fp)
    if dist is not None:
        dist.barrier()
    if done >= 0:
        log.info("resuming from %s: blocks 0..%d are done", path, done)
    return RunFolder(path, done, rank, world_size)


def restore_block(run: RunFolder, i: int, spec, plan, journal, report, swap) -> nn.Module:
    """Put committed block ``i`` back into the model: its quantized layers and tuned state.

    Args:
        run: the open run folder.
        spec, plan: the model's blocks and block ``i``'s plan (``pipeline._plan``).
        journal: the ``rollback.Journal`` that records the swaps (a failure restores them).
        report: the ``QuantReport``; the block's entries from the first run are appended.
        swap: ``swap(i, name, module, qw) -> new module`` (``pipeline._swap_in_quantized``).

    Returns:
        The block (a new module when the block is itself a layer).

    Raises:
        ValueError: the saved block does not match the planned one.
    """
    from .blockwise import BlockTuneResult
    from .pipeline import BlockReport, LayerReport
    from .solver import QuantizedWeight

    codes, state, rng, meta = run.read_block(i)
    block = spec.blocks[i]
    saved = meta["layers"]
    unknown = sorted(set(saved) - set(plan.layers))
    if unknown:
        raise ValueError(f"checkpoint_dir {run.path!r}: block {i} holds layers {unknown} that are not planned")
    journal.snapshot(block, exclude=[m for m, _ in plan.layers.values()])
    for rel in saved:
        module, lcfg = plan.layers[rel]
        prefix = f"{rel}." if rel else ""
        qw = QuantizedWeight(codes=codes[rel], scale=state[prefix + "scale"], zero=state[prefix + "zero"],
                             loss=None, config=lcfg)
        new = swap(i, rel, module, qw)
        if rel == "":
            block = new
    own = block.state_dict()
    if set(own) != set(state):
        raise ValueError(f"checkpoint_dir {run.path!r}: block {i}'s saved state does not match the block "
                         f"(keys differ: {sorted(set(own) ^ set(state))[:4]})")
    for k, v in own.items():
        if v.dtype != state[k].dtype or v.shape != state[k].shape:
            raise ValueError(f"checkpoint_dir {run.path!r}: block {i} {k} is {state[k].dtype} "
                             f"{tuple(state[k].shape)} in the folder, {v.dtype} {tuple(v.shape)} here")
    block.load_state_dict(state, strict=True)
    if rng is not None:
        torch.set_rng_state(rng)
    report.layers += [LayerReport(**{**d, "shape": tuple(d["shape"])}) for d in meta["report_layers"]]
    report.skipped += meta["skipped"]
    b = meta["report_block"]
    if b is not None:
        tune = BlockTuneResult(**b["tune"]) if b["tune"] is not None else None
        report.blocks.append(BlockReport(b["index"], b["name"], b["seconds"], b["groups"], tune))
    return block


def quantized_layers(block: nn.Module, plan) -> dict:
    """Relative name -> module of block's planned layers that are now quantized."""
    from .nn import QUANT_MODULES

    out = {}
    for rel in plan.layers:
        m = block.get_submodule(rel) if rel else block
        if isinstance(m, QUANT_MODULES):
            out[rel] = m
    return out


def block_meta(i: int, swapped: dict, report, n_layers_before: int, n_skipped_before: int) -> dict:
    """The JSON-friendly record of block ``i``'s report entries and quantized layers."""
    import dataclasses

    b = report.blocks[-1] if report.blocks and report.blocks[-1].index == i else None  # None: nothing planned
    return {
        "layers": {name: {} for name in swapped},
        "report_layers": [dataclasses.asdict(r) for r in report.layers[n_layers_before:]],
        "skipped": report.skipped[n_skipped_before:],
        "report_block": None if b is None else {
            "index": b.index, "name": b.name, "seconds": b.seconds, "groups": b.groups,
            "tune": dataclasses.asdict(b.tune) if b.tune is not None else None,
        },
    }
