"""decoupleq inside transformers: ``from_pretrained`` / ``save_pretrained`` of quantized models.

Registered with transformers' own extension points (``register_quantization_config``,
``register_quantizer``) under ``quant_method = "decoupleq"`` when this module is
imported, which ``import decoupleq`` arranges (at once if transformers is already
imported, else when it is).

Saving: ``decoupleq.quantize`` (and ``decoupleq.load``) attach a ``DecoupleQConfig``
and this quantizer to a transformers model (``attach``), so ``save_pretrained``
writes ``config.json`` with its ``quantization_config`` (``decoupleq.hf_config``),
the tensors in decoupleq's layout (``decoupleq.io``), sharded as transformers
shards, and in every shard's metadata the SHA-256 of every tensor and of the
config's layer descriptions.

Loading (``from_pretrained``): transformers builds the model on the meta device;
before any weight is read, ``_process_model_before_weight_loading`` checks the
folder as ``decoupleq.load`` checks a file (every described layer is a layer of
the model with the right shape; the shards hold exactly the tensors the
quantized model will hold, with their shapes and dtypes, tied weights aside; the
checksum of the config) and only then swaps in empty ``QuantLinear`` /
``BCQLinear`` shells, still on the meta device; the checksums of every tensor's
bytes are verified on a second thread meanwhile (hashing releases the GIL), and
waited for before the model is returned. transformers then materialises each tensor
straight into its shell: the float model is never built, and peak memory is
about the file plus one tensor. After loading, packed codes, scales and zeros
are checked as ``load`` checks them. Any failure raises ``ValueError`` naming
the folder and the tensor or layer; a missing or mis-shaped quantized tensor
can never leave a randomly initialised layer behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from . import layer_losses
from ._io_schema import parse_json, tensor_digest, text_digest
from .hf_config import FORMAT_VERSION, QUANT_METHOD, DecoupleQConfig

log = logging.getLogger(__name__)

#: Shard metadata keys (safetensors ``__metadata__``, strings).
LAYOUT_KEY = "decoupleq_layout"
LAYOUT = "decoupleq-hf-v3"
CONFIG_DIGEST_KEY = "decoupleq_config_sha256"
CHECKSUMS_KEY = "decoupleq_checksums"
#: Names the marker tensor: ``<first quantized layer>.weight``, empty, uint8. A transformers
#: that does not know decoupleq (not imported) would otherwise load the folder as a float
#: model with random layers and only warn; the marker's shape mismatches that layer's float
#: weight, which transformers refuses (``ignore_mismatched_sizes=False``, its default).
MARKER_KEY = "decoupleq_marker"
#: A safetensors header larger than this is refused (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000
#: Bytes read at a time while verifying checksums.
CHUNK_BYTES = 8 << 20


def config_digest(cfg: DecoupleQConfig) -> str:
    return text_digest(json.dumps(cfg.canonical(), sort_keys=True))


def check_config_digest(cfg: DecoupleQConfig, meta: dict, what: str) -> None:
    """The shards' checksum of the config (``meta``: ``_read_shards``' metadata) is ``cfg``'s.

    Raises:
        ValueError naming ``what``: config.json was edited or belongs to another checkpoint.
    """
    if meta[CONFIG_DIGEST_KEY] != config_digest(cfg):
        raise ValueError(
            f"{what}: config.json's quantization_config does not match the checksum the shards carry "
            "(the config was edited, or belongs to another checkpoint)"
        )


class DecoupleQHfQuantizer(HfQuantizer):
    """transformers' hook for decoupleq checkpoints (see the module docstring).

    ``requires_calibration``: transformers cannot quantize a float model with
    decoupleq while loading it (that needs calibration data and
    ``decoupleq.quantize``); asking it to raises transformers' own error.
    """

    requires_calibration = True

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("decoupleq models cannot be offloaded to disk (device_map has 'disk')")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # The checksums are verified while transformers reads the tensors, and waited for
        # below: from_pretrained returns no model whose bytes failed them.
        self._layer_names, self._verifier = prepare_model(
            model, self.quantization_config, checkpoint_files, background=True
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._verifier.result()
        check_loaded(model, self._layer_names)
        model.decoupleq_config = self.quantization_config.settings
        stored = self.quantization_config.layer_losses
        layer_losses.restore(model, None if stored is None else
                             {name: stored[s] for name, s in self._layer_names.items() if s in stored})
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        # The float parts (scales, zeros, norms) train: decoupleq.prepare_for_sft.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """Refresh the config from the model's layers as they are now, and the shard metadata
        (checksums of every tensor and of the config's layer descriptions)."""
        cfg = DecoupleQConfig.from_model(model)
        self.quantization_config = cfg
        model.config.quantization_config = cfg
        state_dict = model.state_dict()
        metadata = {LAYOUT_KEY: LAYOUT, CONFIG_DIGEST_KEY: config_digest(cfg)}
        if cfg.layers:
            marker = f"{next(iter(cfg.layers))}.weight"
            state_dict[marker] = torch.zeros(0, dtype=torch.uint8)
            metadata[MARKER_KEY] = marker
        checksums = {}
        for key, t in state_dict.items():
            t = t.detach()
            checksums[key] = tensor_digest(t if t.is_cpu else t.cpu())
        metadata[CHECKSUMS_KEY] = json.dumps(checksums, sort_keys=True)
        return state_dict, metadata


# ---------------------------------------------------------------------------
# Loading: checks before any weight is read, then the shells
# ---------------------------------------------------------------------------


def _read_shards(files, what: str):
    """({tensor: shape}, {tensor: dtype}, metadata of the first shard) over all shards;
    every shard must carry the same decoupleq metadata."""
    from safetensors import safe_open

    shapes, dtypes, first = {}, {}, None
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                for k in f.keys():
                    if k in shapes:
                        raise ValueError(f"{what}: tensor {k!r} is stored in more than one shard")
                    sl = f.get_slice(k)
                    shapes[k], dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{what}: {os.path.basename(path)} is not a complete safetensors file: {exc}") from None
        mine = {k: meta.get(k) for k in (LAYOUT_KEY, CONFIG_DIGEST_KEY, CHECKSUMS_KEY, MARKER_KEY)}
        if mine[LAYOUT_KEY] != LAYOUT:
            raise ValueError(
                f"{what}: {os.path.basename(path)} was not written by decoupleq's save_pretrained "
                f"(metadata {LAYOUT_KEY!r} is {mine[LAYOUT_KEY]!r}, expected {LAYOUT!r})"
            )
        if first is None:
            first = mine
        elif mine != first:
            raise ValueError(f"{what}: the shards' decoupleq metadata differ ({os.path.basename(path)})")
    return shapes, dtypes, first


def _tied_aliases(model, shapes: dict) -> dict:
    """{tied key absent from the file: the key it is tied to, present in the file}."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    aliases = {}
    for a, b in tied.items():
        if a not in shapes and b in shapes:
            aliases[a] = b
        elif b not in shapes and a in shapes:
            aliases[b] = a
    return aliases


def verify_shard_bytes(path: str, checksums: dict, what: str, to_model=None) -> None:
    """Every tensor of one shard against its recorded SHA-256 (dtype, shape and bytes, as
    ``decoupleq._io_schema.tensor_digest``), read in chunks into one reused buffer: no tensor
    is built, and the file's pages are not mapped into the process (its RSS stays flat)."""
    name = os.path.basename(path)
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{what}: {name} is truncated")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{what}: {name} has a header of {n} bytes")
        header = parse_json(f.read(n).decode("utf-8", errors="replace"), f"{what}: header of {name}")
        if not isinstance(header, dict):
            raise ValueError(f"{what}: {name}: the header is not an object")
        entries = []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            want = checksums.get(key if to_model is None else to_model(key))  # recorded in the model's names
            if want is None:
                raise ValueError(f"{what}: tensor {key!r} has no recorded checksum")
            try:
                start, end = (int(x) for x in entry["data_offsets"])
                label = f"{entry['dtype']}|{list(entry['shape'])}|"
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{what}: {name}: tensor {key!r} has a malformed header entry") from None
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"{what}: tensor {key!r} lies outside {name}")
            entries.append((start, end, key, label, want))
        view = memoryview(buf)
        for start, end, key, label, want in sorted(entries):
            h = hashlib.sha256(label.encode())
            f.seek(8 + n + start)
            left = end - start
            while left:
                got = f.readinto(view[: min(left, CHUNK_BYTES)])
                if not got:
                    raise ValueError(f"{what}: {name} is truncated")
                h.update(view[:got])  # hashlib releases the GIL on large buffers
                left -= got
            if h.hexdigest() != want:
                raise ValueError(f"{what}: tensor {key!r} does not match its checksum: the file is corrupt or was edited")


class _Verifier:
    """The shards' checksums, verified on a second thread while transformers reads the tensors
    (the hashing releases the GIL); ``result()`` waits and re-raises its error."""

    def __init__(self, files, checksums: dict, what: str, to_model=None):
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(files, checksums, what, to_model),
                                        name="decoupleq-verify", daemon=True)
        self._thread.start()

    def _run(self, files, checksums, what, to_model):
        try:
            for path in files:
                verify_shard_bytes(path, checksums, what, to_model)
        except BaseException as exc:  # handed to the loading thread by result()
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _checkpoint_key_renamer(model: nn.Module):
    """checkpoint key -> the model's key, by the renamings transformers itself applies when it
    loads this model (its weight converters fuse float tensors decoupleq never stores, so only
    the renamings concern quantized layers). Identity where this transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return lambda key: key
    return lambda key: apply_renamings(key, renamings)


def prepare_model(model: nn.Module, cfg: DecoupleQConfig, files, background: bool = False):
    """Check a folder against the meta model, then swap in the quantized layers' empty shells.

    Nothing is changed unless every check passes; with ``background`` the checksums of the
    tensors' bytes are verified on a second thread, and ``result()`` of the returned verifier
    must be called before the model is used.

    Returns:
        ({name of a quantized layer in the model: its name in the folder}, the checksum verifier).

    Raises:
        ValueError naming the folder and the layer, tensor or key at fault.
    """
    from . import moe
    from .io import _module_from_info, _plan

    files = [os.fspath(f) for f in (files or [])]
    what = repr(os.path.dirname(files[0])) if files else "the checkpoint"
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{what}: decoupleq models load from safetensors files only, got {files or 'none'}")
    shapes, dtypes, meta = _read_shards(files, what)
    # transformers renames some checkpoint keys on load (and back on save: Mixtral's experts are
    # saved under the legacy ``block_sparse_moe``); the checks below are in the model's names.
    to_model = _checkpoint_key_renamer(model)
    shapes = {to_model(k): v for k, v in shapes.items()}
    dtypes = {to_model(k): v for k, v in dtypes.items()}
    marker = meta[MARKER_KEY]
    marker = to_model(marker) if isinstance(marker, str) else marker
    if cfg.layers:
        if not (isinstance(marker, str) and marker.endswith(".weight") and marker[: -len(".weight")] in cfg.layers
                and shapes.get(marker) == (0,) and dtypes.get(marker) == "U8"):
            raise ValueError(f"{what}: the shards lack decoupleq's marker tensor (or it is not an empty uint8 "
                             f"'<quantized layer>.weight'): {marker!r}")
        shapes, dtypes = dict(shapes), dict(dtypes)
        del shapes[marker], dtypes[marker]
    names = {name: name for name in cfg.layers}  # {name in the model: name in the file}
    prefix = getattr(model, "base_model_prefix", "") or ""
    p = prefix + "."
    if prefix and not any(k.startswith(p) for k in model.state_dict()) and any(k.startswith(p) for k in shapes):
        # A model with a head saved, its base model loaded (AutoModel of a CausalLM folder):
        # transformers drops the prefix and leaves the head's tensors unused; so do we.
        shapes = {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}
        dtypes = {k[len(p):]: v for k, v in dtypes.items() if k.startswith(p)}
        names = {name[len(p):]: name for name in cfg.layers if name.startswith(p)}
    # Quantized experts live in per-expert layers: fused expert modules the folder's layers run
    # through get their per-expert form (same forward) before the layers are looked up.
    moe.unfuse_for_layers(model, list(names))
    infos = {}
    for name, stored in names.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{what}: quantized layer {stored!r} is not a module of {type(model).__name__}"
            ) from None
        info = cfg.layer_info(stored, module, what)
        infos[name] = info
    check_config_digest(cfg, meta, what)
    checksums = parse_json(meta[CHECKSUMS_KEY] or "null", f"{what}: {CHECKSUMS_KEY}")
    if not isinstance(checksums, dict):
        raise ValueError(f"{what}: shard metadata {CHECKSUMS_KEY!r} is missing or not an object")
    doc = {"layers": infos, "aliases": _tied_aliases(model, shapes), "format_version": FORMAT_VERSION}
    _plan(model, doc, shapes, dtypes, what)
    verifier = _Verifier(files, checksums, what, to_model)
    if not background:
        verifier.result()

    if cfg.layers:
        # The marker is no tensor of the quantized model: not reported as an unused checkpoint key.
        tail = re.escape(marker[len(p):] if marker.startswith(p) and prefix else marker)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {tail}
    modules = dict(model.named_modules())
    for name, info in infos.items():
        parent_name, _, child = name.rpartition(".")
        with torch.device("meta"):
            shell = _module_from_info(info)
        setattr(modules[parent_name], child, shell)
        # transformers initialises modules whose tensors it did not load; a model's init code
        # reaches into children (GPT-2: ``attn.c_proj.weight``), which a shell does not have.
        # Every tensor of the shell and of its ancestors comes from the checked file.
        shell._is_hf_initialized = True
        parts = name.split(".")
        for i in range(len(parts)):
            modules[".".join(parts[:i])]._is_hf_initialized = True
    log.info("%s: %d quantized layers checked and prepared", what, len(infos))
    return {name: names[name] for name in infos}, verifier


def check_loaded(model: nn.Module, names) -> None:
    """After loading: every quantized layer (``names``) holds real tensors (none left on the meta
    device), packed codes use only their fields, and the float parts are finite."""
    from .io import LAYER_MODULES, _check_codes

    what = repr(getattr(model, "name_or_path", "") or "the checkpoint")
    tensors, layers = {}, {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LAYER_MODULES):
            raise ValueError(f"{what}: layer {name!r} is a {type(module).__name__} after loading")
        for key, t in module.state_dict().items():
            if t.is_meta:
                raise ValueError(f"{what}: tensor {name}.{key} was not loaded")
            tensors[f"{name}.{key}"] = t.detach().cpu()
        layers[name] = module.quant_info()
    _check_codes(tensors, layers, what)


# ---------------------------------------------------------------------------
# Saving: what a quantized model carries
# ---------------------------------------------------------------------------


def is_transformers_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def attach(model: nn.Module) -> nn.Module:
    """Give a quantized transformers model its ``quantization_config`` and this quantizer, so
    ``save_pretrained`` writes a folder ``from_pretrained`` reads back. Other modules are
    returned unchanged."""
    if not is_transformers_model(model):
        return model
    cfg = DecoupleQConfig.from_model(model)
    model.config.quantization_config = cfg
    model.hf_quantizer = DecoupleQHfQuantizer(cfg, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    return model


def register() -> None:
    """Register the config and the quantizer with transformers (once)."""
    for mapping, cls, reg in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, DecoupleQConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, DecoupleQHfQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            reg(QUANT_METHOD)(cls)
        elif getattr(current, "__module__", None) != cls.__module__:
            raise RuntimeError(
                f"transformers already has a {QUANT_METHOD!r} quantization method ({current.__module__}."
                f"{current.__qualname__}); decoupleq cannot register its own"
            )


register()
