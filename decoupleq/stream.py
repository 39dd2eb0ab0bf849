"""Quantize a Hugging Face model that stays on disk, one float block in memory at a time.

``quantize_from_disk(folder, calibration, config, out=DIR)`` does what
``model = from_pretrained(folder); decoupleq.quantize(model, calibration,
config); decoupleq.save(model, DIR)`` does, with the same output bytes, but
never holds the float model: the model is built on the meta device from
``config.json`` (no memory), and its tensors are read from the folder's
safetensors files (plain reads at the header's offsets, no memory map) only when needed:

- a module outside the blocks (the embedding, the rotary table) when it is
  called; once the calibration inputs are caught, the tensors read for it are
  dropped again (the next call, or the save, reads them anew); a non-persistent
  buffer (rotary ``inv_freq``) is initialised as ``from_pretrained`` initialises
  it (the model's ``_init_weights``). The
  final norm and the head are never called while quantizing: they are read
  just before saving;
- a block when ``decoupleq.pipeline.quantize`` reaches it (the ``BlockSource``
  hooks below; the block loop itself is the pipeline's). Once the block is
  quantized, the float weights of its quantized layers go back to the meta
  device; the block keeps its quantized layers (codes packed, a few bits per
  weight) and its small float parts (norms).

The quantized model is then saved by ``decoupleq.save`` (``hf_folder.save_folder``:
shards, checksums, ``quantization_config``, written to a hidden folder and renamed
into place). Peak memory: the quantized model (for SmolLM2-135M at W2 g64 its float
embedding dominates) + one float block + the calibration activations and one
Hessian, as in ``quantize``; the whole float model is never in memory. On glibc the
run fixes malloc's mmap threshold at 1 MiB for the process and trims the heap after
each block (``decoupleq._heap``): without that, freed blocks stayed in the heap and
memory grew with every block.

One more pass reads the weights: ``quantize`` runs the first calibration batch
through every block to learn how the blocks are called; each block is loaded
for that pass and dropped after it.

Families: decoder models whose checkpoint names are the model's own
``state_dict`` names (Llama, Qwen2, Mistral: ``model.layers.N``); fused MoE
experts are refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ._heap import hold_large_buffers_in_mmap, trim_heap

log = logging.getLogger(__name__)


class _Shards:
    """The folder's safetensors tensors by name, each read on request straight into a new tensor.

    A tensor is read with plain file reads at the offsets of the file's header, not through
    a memory map: a mapped file's pages that were read count in the process's resident
    memory for as long as the map lives, so a mapped read of the embedding cost twice its
    size (the mapped pages and the copy) at the moment of reading.

    Attributes:
        where: tensor name -> file path.
        shapes: tensor name -> shape.
        dtypes: tensor name -> safetensors dtype string ("F32", "BF16"...).
        spans: tensor name -> (first byte, end byte) of its data in its file.
    """

    def __init__(self, files, what: str):
        from safetensors import safe_open

        self.where, self.shapes, self.dtypes, self.spans = {}, {}, {}, {}
        for f in files:
            try:
                # safetensors checks the file (header, offsets, sizes) as it opens it.
                with safe_open(str(f), framework="pt") as h:
                    names = list(h.keys())
                    for k in names:
                        s = h.get_slice(k)
                        self.shapes[k] = tuple(s.get_shape())
                        self.dtypes[k] = s.get_dtype()
                spans = _data_spans(f)
            except Exception as exc:
                raise ValueError(f"{what}: {f.name} is not a complete safetensors file: {exc}") from None
            for k in names:
                if k in self.where:
                    raise ValueError(f"{what}: tensor {k!r} is in both {self.where[k].name} and {f.name}")
                self.where[k] = f
                self.spans[k] = spans[k]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor, floats cast to ``dtype``."""
        stored = _TORCH_DTYPES[self.dtypes[name]]
        t = torch.empty(self.shapes[name], dtype=stored)
        first, end = self.spans[name]
        raw = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes
        if raw.nbytes != end - first:
            raise ValueError(f"{self.where[name].name}: tensor {name!r} holds {end - first} bytes, "
                             f"its shape and dtype need {raw.nbytes}")
        with open(self.where[name], "rb") as fh:
            fh.seek(first)
            view, got = memoryview(raw), 0
            while got < raw.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise ValueError(f"{self.where[name].name} ends inside tensor {name!r}")
                got += n
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


# safetensors dtype names of the floats a full-precision folder holds (the only ones read).
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _data_spans(path: Path) -> dict:
    """name -> (first, end) byte of each tensor's data in a safetensors file (little-endian
    u64 header length, the JSON header, then the data the header's offsets point into)."""
    import json
    import struct
    import sys

    if sys.byteorder != "little":
        raise ValueError("streaming reads safetensors' little-endian bytes as they are: "
                         "this machine is big-endian")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: (8 + n + int(e["data_offsets"][0]), 8 + n + int(e["data_offsets"][1]))
            for k, e in header.items() if k != "__metadata__"}


def _check_folder(folder) -> tuple:
    """(folder Path, its safetensors files); errors name ``folder``."""
    from .hf_folder import CONFIG_FILE, _read_json, weight_files

    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path to a Hugging Face model folder, got {type(folder).__name__}")
    path = Path(os.fspath(folder))
    what = f"folder {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"{what} is not a folder (give a Hugging Face folder with config.json and safetensors files)")
    cfg = _read_json(path / CONFIG_FILE, what)
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {CONFIG_FILE} is not an object")
    if isinstance(cfg.get("quantization_config"), dict):
        raise ValueError(f"{what} holds a quantized model (config.json has a quantization_config); "
                         "give a full-precision folder")
    return path, weight_files(path, what)


def _build_meta(path: Path, what: str, dtype: torch.dtype):
    """The model of ``path``'s config.json on the meta device, built as ``zoo.load_hf_folder``
    builds the in-memory one (transformers' ``AutoModelForCausalLM``, ``dtype``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ._hf_compat import dtype_kwargs

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"{what}: config.json is not a config transformers reads: {exc}") from None
    if getattr(config, "auto_map", None):
        raise ValueError(f"{what}: config.json asks for remote code (auto_map); not supported")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    except ValueError as exc:
        raise ValueError(f"{what}: no causal LM class for this config.json: {exc}") from None
    model.eval()
    # What from_pretrained gives the in-memory model, so both save the same files.
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ValueError(f"{what}: generation_config.json: {exc}") from None
    return model


def _own_tensors(module: nn.Module):
    """(kind "p" | "b", attribute, tensor) of the module's own parameters and buffers."""
    for kind, table in (("p", module._parameters), ("b", module._buffers)):
        for attr, t in table.items():
            if t is not None:
                yield kind, attr, t


def _set(holders, new) -> None:
    for mod, kind, attr, _, _ in holders:
        (mod._parameters if kind == "p" else mod._buffers)[attr] = new


class BlockSource:
    """A meta-device model whose tensors come from a folder's safetensors files when needed.

    ``decoupleq.pipeline.quantize(..., _source=this)`` calls ``probing``, ``load``,
    ``release`` and ``state_items``; ``quantize_from_disk`` is the public entry point.

    Attributes:
        model: the transformers model (meta tensors until loaded).
        folder: the source folder.
        dtype: the dtype floating tensors get (float32 by default, as ``zoo.load_model``).
    """

    def __init__(self, folder, dtype: torch.dtype | None = None):
        path, files = _check_folder(folder)
        self.folder = path
        self.what = f"folder {str(path)!r}"
        self.dtype = dtype or torch.float32
        self.shards = _Shards(files, self.what)
        self.model = _build_meta(path, self.what, self.dtype)
        self._aliases = self._tensor_aliases()
        self._check_tensors()
        self._hooks = []
        self._outside_hooks()

    # -- setup ----------------------------------------------------------------

    def _tensor_aliases(self) -> dict:
        """id(tensor) -> every (module, kind, attribute, full name, persistent) holding it
        (tied weights are one tensor held twice)."""
        out = {}
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            for kind, attr, t in _own_tensors(mod):
                full = f"{mname}.{attr}" if mname else attr
                persistent = kind == "p" or attr not in mod._non_persistent_buffers_set
                out.setdefault(id(t), []).append((mod, kind, attr, full, persistent))
        return out

    def _file_key(self, holders) -> str | None:
        """The checkpoint name of a tensor held under ``holders`` (any of its tied names)."""
        for _, _, _, full, persistent in holders:
            if persistent and full in self.shards.where:
                return full
        return None

    def _check_tensors(self) -> None:
        """Every stored tensor of the model is in the folder with its shape, and the folder holds
        nothing else: checked before any work (a config that does not match its weights)."""
        from .moe import _fused_modules

        fused = [n for n, _ in _fused_modules(self.model)]
        if fused:
            raise ValueError(f"{self.what}: fused MoE experts ({fused[0]}) cannot be streamed yet; "
                             "load the model and use decoupleq.quantize")
        wanted, missing, bad = set(), [], []
        for holders in self._aliases.values():
            names = [h[3] for h in holders if h[4]]
            if not names:
                continue  # a non-persistent buffer: initialised, not read
            wanted.update(names)
            key = self._file_key(holders)
            if key is None:
                missing.append(names[0])
                continue
            mod, kind, attr = holders[0][:3]
            shape = tuple((mod._parameters if kind == "p" else mod._buffers)[attr].shape)
            if self.shards.shapes[key] != shape:
                bad.append(f"{key} is {list(self.shards.shapes[key])} in the folder, {list(shape)} for the config")
        extra = sorted(set(self.shards.where) - wanted)
        if missing or bad or extra:
            parts = []
            if missing:
                parts.append(f"tensors missing from the folder {sorted(missing)[:4]}"
                             + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
            if bad:
                parts.append("; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
            if extra:
                parts.append(f"tensors the config's model does not have {extra[:4]}"
                             + (f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""))
            raise ValueError(f"{self.what}: config.json does not match the weights: " + "; ".join(parts))
        for name, dt in self.shards.dtypes.items():
            if dt not in _TORCH_DTYPES:
                raise ValueError(f"{self.what}: tensor {name!r} is {dt}; a full-precision folder holds floats")

    def _outside_hooks(self) -> None:
        """Modules outside the blocks load on their first call (the embedding, the rotary table)."""
        from .models import find_blocks

        spec = find_blocks(self.model)
        inside = {id(m) for b in spec.blocks for m in b.modules()}
        self._outside = []
        for _, mod in self.model.named_modules():
            if id(mod) in inside or not any(True for _ in _own_tensors(mod)):
                continue
            self._outside.append(mod)
            self._hooks.append(mod.register_forward_pre_hook(lambda m, args: self.load(m)))

    # -- loading --------------------------------------------------------------

    def _materialise(self, module: nn.Module) -> None:
        """Give ``module``'s own meta tensors their values: from the folder, or for a
        non-persistent buffer, transformers' own initialisation. Tied tensors are set once."""
        metas = [(k, a, t) for k, a, t in _own_tensors(module) if t.is_meta]
        if not metas:
            return
        if any(self._file_key(self._aliases[id(t)]) is None for _, _, t in metas):
            # A table built at init (rotary inv_freq): allocate, then init as from_pretrained does.
            if len(metas) != sum(1 for _ in _own_tensors(module)):
                raise ValueError(f"{self.what}: {type(module).__name__} has tensors both loaded and to be "
                                 "initialised; it cannot be streamed")
            holders = {(k, a): self._aliases.pop(id(t)) for k, a, t in metas}
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                self.model._init_weights(module)
            metas = []
            for (k, a), h in holders.items():
                new = module._parameters[a] if k == "p" else module._buffers[a]
                _set(h, new)  # a tied holder elsewhere gets the same tensor
                self._aliases[id(new)] = h
                if self._file_key(h) is not None:
                    metas.append((k, a, new))
        with torch.no_grad():
            for kind, attr, t in metas:
                holders = self._aliases.pop(id(t))
                value = self.shards.get(self._file_key(holders), t.dtype)
                new = nn.Parameter(value, requires_grad=t.requires_grad) if kind == "p" else value
                _set(holders, new)
                self._aliases[id(new)] = holders

    def load(self, module: nn.Module) -> None:
        """Read every meta tensor of ``module`` (a block, or the whole model) from the folder."""
        for m in module.modules():
            self._materialise(m)

    def drop(self, module: nn.Module, only_read: bool = False) -> None:
        """Send ``module``'s tensors back to the meta device: their memory is freed.
        ``only_read``: only tensors read from the folder (not initialised tables)."""
        for m in module.modules():
            for kind, attr, t in list(_own_tensors(m)):
                if t.is_meta:
                    continue
                if only_read and self._file_key(self._aliases.get(id(t), ())) is None:
                    continue
                holders = self._aliases.pop(id(t), None) or [(m, kind, attr, None, None)]
                meta = torch.empty_like(t, device="meta")
                new = nn.Parameter(meta, requires_grad=t.requires_grad) if kind == "p" else meta
                _set(holders, new)
                if holders[0][3] is not None:
                    self._aliases[id(new)] = holders

    # -- the pipeline's side ----------------------------------------------------

    @contextlib.contextmanager
    def probing(self, blocks):
        """While the model runs to find how its blocks are called, each block is loaded just
        before it runs and dropped after it: one float block in memory at a time."""
        handles, loaded = [], []

        def pre(m, args):
            if any(t.is_meta for t in m.parameters()):
                self.load(m)
                loaded.append(m)

        def post(m, args, out):
            if m in loaded:
                loaded.remove(m)
                self.drop(m)

        for b in blocks:
            # Ahead of the block's other hooks: the catcher's hook sees a loaded block.
            handles.append(b.register_forward_pre_hook(pre, prepend=True))
            handles.append(b.register_forward_hook(post, prepend=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m in loaded:  # a pass stopped at this block
                self.drop(m)
            # The calibration inputs are caught: the embedding (the largest tensor of a small
            # model) goes until a later call or the save reads it again.
            for m in self._outside:
                self.drop(m, only_read=True)
            trim_heap()

    def release(self, originals) -> None:
        """The float layers a finished block replaced by quantized ones: their weights go."""
        for m in originals:
            self.drop(m)
        # What the block freed goes back to the system, so memory follows one block.
        trim_heap()

    def state_items(self):
        """(name, tensor) of the model's ``state_dict``, each read from the folder when asked for
        (one in memory at a time): the bytes ``resume.fingerprint`` digests of an in-memory model."""
        by_name = {h[3]: holders for holders in self._aliases.values() for h in holders}
        for name, t in self.model.state_dict(keep_vars=True).items():
            key = self._file_key(by_name[name]) if name in by_name else None
            if not t.is_meta or key is None:
                yield name, t
            else:
                yield name, self.shards.get(key, t.dtype)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def quantize_from_disk(
    folder,
    calibration,
    config=None,
    *,
    out,
    tokenizer=None,
    max_shard_size=None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> nn.Module:
    """Quantize the full-precision Hugging Face model in ``folder`` block by block from disk,
    and save it to ``out``.

    The same as ``model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)``,
    ``decoupleq.quantize(model, calibration, config, ...)``, ``decoupleq.save(model, out)``,
    and ``out`` gets the same bytes, but the float model is never in memory: one float block
    at a time (see ``decoupleq.stream``).

    Args:
        folder: a Hugging Face folder: ``config.json`` and ``model.safetensors`` or shards
            with ``model.safetensors.index.json`` (``decoupleq.zoo`` caches the packaged
            SmolLM2 as one: ``load_model(...).extra["cached_at"]``). Decoder families whose
            checkpoint names are the model's own (Llama, Qwen2, Mistral).
        calibration: as for ``quantize``: token ids, LongTensor ``[num_samples, seq_len]``,
            or a list of batches; ``None`` for data-free RTN. Sampling from the model itself
            (``calibration_data("self", ...)``) needs the whole model: use text here.
        config: a ``QuantConfig`` or ``ModelQuantConfig``, as for ``quantize``.
        out: the output folder (``decoupleq.save``'s rules: new, empty, or an earlier
            decoupleq folder, replaced as a whole; written to a hidden folder and renamed);
            None returns the quantized model unsaved (the CLI saves it with its summary).
        tokenizer: saved with the model when given.
        max_shard_size: as for ``decoupleq.save`` / ``save_pretrained``.
        dtype: floating dtype while quantizing (default float32, as ``zoo.load_model``).
        **overrides: ``quantize``'s keywords (``blockwise``, ``skip``, ``cache_budget_mb``,
            ``checkpoint_dir``, ``resume``...).

    On glibc this fixes malloc's mmap threshold at 1 MiB for the rest of the process
    (so each freed block leaves the process's memory) and trims the heap after each block.

    Returns:
        The quantized model, every tensor loaded (as ``decoupleq.load`` would give it), with
        ``decoupleq_report``.

    Raises:
        TypeError / ValueError naming ``folder`` (not a folder, a missing shard, a config that
        does not match the weights), ``out``, or the wrong argument of ``quantize``, before any
        block is quantized; a non-finite weight names its layer when its block is read.
        Nothing is written to ``out`` by a failing call.
    """
    from .hf_folder import check_destination, save_folder
    from .pipeline import quantize

    if out is not None:
        check_destination(out, "out")
    source = BlockSource(folder, dtype)
    hold_large_buffers_in_mmap()
    try:
        model = quantize(source.model, calibration, config, _source=source, **overrides)
        source.load(model)  # the final norm and the head, read only now
    finally:
        source.close()
    if out is not None:
        save_folder(model, out, tokenizer, max_shard_size)
    return model


def folder_digest(path) -> str:
    """SHA-256 over a folder's files (names and bytes), to compare two outputs."""
    h = hashlib.sha256()
    p = Path(os.fspath(path))
    for f in sorted(x for x in p.iterdir() if x.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
