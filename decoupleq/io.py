"""Save and load quantized models: one safetensors file, no pickle.

File layout (format version 3): a single ``.safetensors`` file holding

- every entry of ``model.state_dict()`` in its own dtype: for quantized layers
  at 2, 3 and 4 bits ``<layer>.packed`` (uint32, (out, row_words)), the codes
  in the packed layout of ``decoupleq.packing`` ("decoupleq-lanes8-v1", the
  layout the kernels read, so loading needs no conversion); at 5 to 8 bits
  ``<layer>.codes`` (int8, (out, in_flat)); then ``<layer>.scale`` and
  ``<layer>.zero`` (float32, (out, G): float32 so that save -> load is
  bit-exact, including values tuned by SFT) and ``<layer>.bias``; every other
  parameter and persistent buffer unchanged (norms, embeddings, head...).
  Binary-coding (BCQ) layers (``BCQLinear``, layer type "bcq_linear") store
  ``<layer>.planes`` (uint32, (out, row_words): the level indices in the
  layout "decoupleq-bcq-lanes8-v1" of ``decoupleq.bcq``), ``<layer>.alpha``
  (float32, (out, G, bits)), ``<layer>.offset`` (float32, (out, G)) and
  ``<layer>.bias``.
  Tensors that share memory (tied embeddings) are stored once and listed as
  aliases;
- in the safetensors metadata, under the key ``"decoupleq"``, a JSON document:
  ``format`` ("decoupleq"), ``format_version``, the settings that produced the
  model (``quantization``: method, bits, group size, symmetric...), each
  quantized layer's description (``layers``: type, shapes, bits, group size,
  symmetric, method, bias, ``codes``: the storage of the codes, the packed
  format's name or "int8"), the tensor ``aliases``, ``model``: the class
  and, for Hugging Face models, the full config so ``load`` can rebuild the
  model without the original weights, ``checksums``: for every stored
  tensor the SHA-256 of its dtype, shape and bytes, and (files written since
  per-layer losses are kept; optional, no version change) ``layer_losses``:
  each quantized layer's relative loss in its quantization run
  (``decoupleq.layer_losses``);
- under the metadata key ``"decoupleq_sha256"``, the SHA-256 of that JSON
  document's text, so an edit of any layer description (a layer's ``bits``,
  say) fails as surely as an edit of a tensor.

``save`` writes to a temporary file in the destination directory, syncs it and
renames it over the destination (``os.replace``): an interrupted save leaves
the previous file (or none), never a partial one; the temporary files of an
earlier save that was killed are removed by the next save to the same place.
Saving to a symbolic link writes to the file it points to. The new file's
permissions follow the umask, as for any new file.

``load`` treats the file as data from anywhere and checks everything before it
changes anything (see its docstring); it raises ``ValueError`` with the
offending name on a truncated, corrupt, tampered or mismatched file.

Format versions 1 (int8 ``<layer>.codes`` at every bit width, packed while
loading) and 2 (no checksums, no BCQ layers) still load.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile

import numpy as np
import torch
from torch import nn

from . import _hf_build, _hf_hook, layer_losses, moe
from ._io_schema import (
    FLOAT_ST,
    META_DIGEST_KEY,
    ST_DTYPES,
    check_metadata,
    parse_json,
    tensor_digest,
    text_digest,
    verify_tensors,
)
from .capture import layer_in_features
from .models import is_quantizable
from .nn import PACKED_BITS, QUANT_MODULES, QuantConv2d, is_hf_conv1d, quant_module_from_info
from .nn_bcq import BCQLinear

log = logging.getLogger(__name__)

FORMAT = "decoupleq"
FORMAT_VERSION = 3
#: Versions ``load`` reads: 1 stored int8 codes at every bit width, 2 had no checksums
#: and no BCQ layers.
READABLE_VERSIONS = (1, 2, 3)
#: Every kind of quantized layer a file describes (``quant_info()["type"]``).
LAYER_MODULES = QUANT_MODULES + (BCQLinear,)
#: The first format version with BCQ layers.
BCQ_SINCE_VERSION = 3
METADATA_KEY = "decoupleq"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only read once per save)
    os.umask(old)
    return old


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if someone holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks, and no cleanup of others' temp files
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_stale_temps(directory: str, base: str) -> None:
    """Delete ``.<base>.XXXXXXXX.tmp`` files left by earlier saves that were killed.

    A save holds a lock on its temporary file until it is renamed, so a file
    whose lock can be taken belongs to no running save."""
    pattern = re.compile(r"^\." + re.escape(base) + r"\.[A-Za-z0-9_]{8}\.tmp$")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not pattern.match(name):
            continue
        full = os.path.join(directory, name)
        try:
            if not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                os.unlink(full)
                log.info("removed %s, left by an interrupted save", full)
        except OSError:
            pass
        finally:
            os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and ``path`` is untouched. The file gets mode ``0o666 & ~umask``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_temps(directory, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        _try_lock(fd)  # held until the rename: marks the temp file as in use
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)
    try:  # make the rename itself durable (best effort: not every platform allows it)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors file's header with sorted keys, in place and at the same length.

    safetensors writes the header's maps in hash order, which differs from one
    process to the next (the two metadata keys swap places), so the same model
    saved twice gave different bytes; sorted, equal models give equal files."""
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never seen (the writer's JSON is as compact); keep its header then
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors_and_aliases(model: nn.Module):
    tensors, aliases, seen = {}, {}, {}
    storages = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sk = _storage_key(t)
        if t.numel() and sk in seen:
            aliases[key] = seen[sk]
            continue
        if t.numel():
            seen[sk] = key
        # A partial view of a storage another tensor also uses cannot be written as is.
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in storages:
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors, aliases


def _model_description(model: nn.Module) -> dict:
    import json

    cls = type(model)
    desc = {"class": cls.__name__, "module": cls.__module__}
    cfg = getattr(model, "config", None)
    if cls.__module__.startswith("transformers.") and cfg is not None and hasattr(cfg, "to_json_string"):
        desc["hf_config_class"] = type(cfg).__name__
        desc["hf_config"] = json.loads(cfg.to_json_string(use_diff=False))
        # The layers are described by this file itself; a stored quantization_config is refused on load.
        desc["hf_config"].pop("quantization_config", None)
        desc["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return desc


def save(model: nn.Module, path, *, tokenizer=None, max_shard_size=None) -> None:
    """Write ``model``: a Hugging Face folder, or one safetensors file, atomically.

    Args:
        model: the model, typically returned by ``decoupleq.quantize``.
        path: a name ending in ``.safetensors``: one file (the single-file
            format above); its directory must exist. An existing file is
            replaced only once the new one is complete; a symbolic link is
            followed (its target is replaced, the link stays). The file's mode
            is ``0o666`` less the umask. Any other name, or an existing folder:
            a Hugging Face folder (``decoupleq.hf_folder``, what
            ``save_pretrained`` writes and ``from_pretrained`` reads: config.json
            with the ``quantization_config``, safetensors shards, the
            tokenizer), for transformers models only, written beside and
            renamed into place whole; an existing folder is replaced only if
            it is empty or a decoupleq folder.
        tokenizer: saved into the folder (``save_pretrained``) when given.
        max_shard_size: shard size of a folder (transformers' default if None).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``path`` is a directory (with other files in it) or its
            directory does not exist; a folder for a model that is not a
            transformers model; a tokenizer or shard size with a file.
    """
    import json

    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path) or not str(path).endswith(".safetensors"):
        from .hf_folder import save_folder

        return save_folder(model, path, tokenizer=tokenizer, max_shard_size=max_shard_size)
    if tokenizer is not None or max_shard_size is not None:
        raise ValueError("tokenizer and max_shard_size apply to a folder, not to a .safetensors file")
    # Write through a link to its target; the link itself stays as it was.
    target = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.exists(target) and not os.path.isfile(target):
        raise ValueError(f"path {path!r} exists and is not a regular file")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ValueError(f"path {path!r}: directory {parent!r} does not exist")

    layers = {name: m.quant_info() for name, m in model.named_modules() if isinstance(m, LAYER_MODULES)}
    tensors, aliases = _tensors_and_aliases(model)
    from . import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "quantization": getattr(model, "decoupleq_config", None),
        "layers": layers,
        "aliases": aliases,
        "model": _model_description(model),
        "checksums": {k: tensor_digest(t) for k, t in tensors.items()},
    }
    losses = layer_losses.to_store(model, layers)
    if losses is not None:  # covered by the document's checksum, as the layers are
        meta["layer_losses"] = losses
    text = json.dumps(meta, sort_keys=True)
    metadata = {METADATA_KEY: text, META_DIGEST_KEY: text_digest(text)}
    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        _canonical_header(tmp)

    _atomic_write(target, write)
    log.info("saved %d tensors (%d quantized layers) to %s", len(tensors), len(layers), path)


# ---------------------------------------------------------------------------
# Reading: the header
# ---------------------------------------------------------------------------


def _source_path(path) -> str:
    """``path`` as a string, checked to be an existing regular file (links followed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a decoupleq file (nor a folder with config.json)")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file")
    return path


def _read_header(path: str, verify: bool = True):
    """(checked metadata document, {tensor: shape}, {tensor: safetensors dtype}) of a file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    except Exception as exc:  # SafetensorError is not importable as a public name
        raise ValueError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from None
    if METADATA_KEY not in raw and "decoupleq_layout" in raw:
        raise ValueError(
            f"{path!r} is a shard of a Hugging Face folder written by decoupleq: load the folder "
            "(decoupleq.load(folder) or from_pretrained(folder))"
        )
    if METADATA_KEY not in raw:
        raise ValueError(f"{path!r} is a safetensors file but not a decoupleq checkpoint (no {METADATA_KEY!r} metadata)")
    text = raw[METADATA_KEY]
    digest = raw.get(META_DIGEST_KEY)
    meta = parse_json(text, f"{path!r}: the decoupleq metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path!r}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path!r} has format_version {version!r}; this decoupleq reads format_version {FORMAT_VERSION} "
            f"(and {', '.join(str(v) for v in READABLE_VERSIONS if v != FORMAT_VERSION)}, read as well)"
        )
    if verify and (digest is not None or version >= 3):
        # Checked whenever present, so a version edited down from 3 cannot skip it.
        if digest != text_digest(text):
            raise ValueError(
                f"{path!r}: the decoupleq metadata does not match its checksum ({META_DIGEST_KEY!r}): "
                "the file is corrupt or was edited (load(..., verify=False) skips this check)"
            )
    check_metadata(meta, version, repr(path))
    return meta, shapes, dtypes


def read_metadata(path) -> dict:
    """The JSON document of a decoupleq file, checked (format, version, checksum, every layer's
    description); tensors are not read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory or not a regular file, not a safetensors file
            (for example truncated), not a decoupleq file, an unsupported format
            version, or a document that fails its checks.
    """
    return _read_header(_source_path(path))[0]


# ---------------------------------------------------------------------------
# Reading: the plan (what the model will hold), checked before anything changes
# ---------------------------------------------------------------------------


def _file_shapes(name: str, info: dict, version: int) -> dict:
    """{tensor name: (shape, safetensors dtype)} of one quantized layer as stored in the file.

    The bias is stored in its own dtype (``bias_dtype``)."""
    return _layer_shapes(name, info, packed=version >= 2 and info.get("codes", "int8") != "int8")


def _model_shapes(name: str, info: dict) -> dict:
    """{state_dict key: (shape, safetensors dtype)} of the quantized layer ``load`` will build
    (packed codes at 2-4 bits whatever the file's version)."""
    return _layer_shapes(name, info, packed=info["bits"] in PACKED_BITS)


def _layer_shapes(name: str, info: dict, packed: bool) -> dict:
    from .packing import row_words

    if info["type"] == "bcq_linear":
        return _bcq_shapes(name, info)
    out, n, gs = info["out_features"], info["in_features"], info["group_size"]
    G = 1 if gs == -1 else -(-n // gs)  # the last group may be short
    shapes = {f"{name}.codes": ((out, n), "I8")} if not packed else {
        f"{name}.packed": ((out, row_words(info["bits"], n)), "U32")
    }
    shapes.update({f"{name}.scale": ((out, G), "F32"), f"{name}.zero": ((out, G), "F32")})
    if info["bias"]:
        from ._io_schema import BIAS_DTYPES

        shapes[f"{name}.bias"] = ((out,), ST_DTYPES[BIAS_DTYPES[info["bias_dtype"]]])
    return shapes


def _bcq_shapes(name: str, info: dict) -> dict:
    """The tensors of a BCQ layer (its description already checked): planes, alpha, offset
    (float32, as written) and bias."""
    from ._io_schema import BIAS_DTYPES
    from .bcq import row_words as bcq_row_words

    out, n, bits, gs = info["out_features"], info["in_features"], info["bits"], info["group_size"]
    G = 1 if gs == -1 else n // gs
    shapes = {
        f"{name}.planes": ((out, bcq_row_words(bits, n)), "U32"),
        f"{name}.alpha": ((out, G, bits), "F32"),
        f"{name}.offset": ((out, G), "F32"),
    }
    if info["bias"]:
        shapes[f"{name}.bias"] = ((out,), ST_DTYPES[BIAS_DTYPES[info["bias_dtype"]]])
    return shapes


def _module_from_info(info: dict) -> nn.Module:
    """The empty quantized layer a file's description asks for, by layer kind."""
    if info["type"] == "bcq_linear":
        return BCQLinear.from_info(info)
    return quant_module_from_info(info)


def _check_layer_slot(model: nn.Module, name: str, info: dict):
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantized layer {name!r} from the file is not a module of the model") from None
    if isinstance(current, LAYER_MODULES):
        got = (current.out_features, current.in_features)
    elif is_quantizable(current):
        out = current.weight.shape[1] if is_hf_conv1d(current) else current.weight.shape[0]
        got = (out, layer_in_features(current))
    else:
        raise ValueError(f"layer {name!r}: the model has a {type(current).__name__} there, not a quantizable layer")
    want = (info["out_features"], info["in_features"])
    if got != want:
        raise ValueError(f"layer {name!r}: the file has (out, in) = {want} but the model has {got}")
    if info["type"] == "conv2d" and not isinstance(current, (nn.Conv2d, QuantConv2d)):
        raise ValueError(f"layer {name!r}: the file has a conv2d but the model has a {type(current).__name__}")
    if info["type"] == "linear" and isinstance(current, (nn.Conv2d, QuantConv2d)):
        raise ValueError(f"layer {name!r}: the file has a linear layer but the model has a {type(current).__name__}")
    return current


def _plan(model: nn.Module, meta: dict, shapes: dict, dtypes: dict, what: str) -> dict:
    """Check that the file fills ``model`` exactly once its quantized layers are swapped in.

    Nothing is changed. Every tensor the model will hold must be in the file
    (or an alias of one) with its shape; quantized layers' tensors with their
    exact dtypes; other tensors with the model's dtype or, for floating point,
    another floating dtype (the file's wins: a bfloat16 checkpoint loads into
    a float32 skeleton as bfloat16).

    Returns:
        {state_dict key: torch dtype} of the model's tensors whose dtype changes.

    Raises:
        ValueError naming the first tensor or layer that does not match.
    """
    layers, aliases, version = meta["layers"], meta["aliases"], meta["format_version"]
    # First the file against itself: each layer's tensors against its description.
    for name, info in layers.items():
        for key, (want, dtype) in _file_shapes(name, info, version).items():
            got = shapes.get(key)
            if got is None:
                raise ValueError(f"{what}: tensor {key!r} of quantized layer {name!r} is missing")
            if got != want:
                raise ValueError(f"{what}: tensor {key!r} has shape {got}, layer {name!r} needs {want}")
            if dtypes[key] != dtype:
                raise ValueError(f"{what}: tensor {key!r} has dtype {dtypes[key]}, layer {name!r} needs {dtype}")
    # Then against the model.
    own = model.state_dict(keep_vars=True)
    replaced = set()
    for name, info in layers.items():
        current = _check_layer_slot(model, name, info)
        replaced.update(f"{name}.{k}" for k in current.state_dict(keep_vars=True))
    expected = {k: (tuple(t.shape), ST_DTYPES.get(t.dtype)) for k, t in own.items() if k not in replaced}
    quant_keys = set()
    for name, info in layers.items():
        ms = _model_shapes(name, info)
        expected.update(ms)
        quant_keys.update(ms)

    # What the file will provide, under the names the model will use.
    provided = {k: (shapes[k], dtypes[k]) for k in shapes}
    for name, info in layers.items():
        if f"{name}.codes" in provided and info["bits"] in PACKED_BITS:  # version 1: packed while loading
            provided.pop(f"{name}.codes")
            provided[f"{name}.packed"] = ((expected[f"{name}.packed"][0]), "U32")
    layer_keys = {k for name, info in layers.items() for k in _file_shapes(name, info, version)}
    for dup, kept in aliases.items():
        if dup in shapes:
            raise ValueError(f"{what}: {dup!r} is both a stored tensor and an alias")
        if kept not in shapes:
            raise ValueError(f"{what}: alias {dup!r} points to missing tensor {kept!r}")
        if kept in layer_keys or dup in quant_keys:  # save never shares a quantized layer's tensors
            raise ValueError(f"{what}: alias {dup!r} -> {kept!r} involves a quantized layer's tensor")
        provided[dup] = provided[kept]

    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    changes = {}
    torch_dtype = {v: k for k, v in ST_DTYPES.items()}
    for key, (want_shape, want_dtype) in expected.items():
        got_shape, got_dtype = provided[key]
        if tuple(got_shape) != tuple(want_shape):
            raise ValueError(f"{what}: tensor {key!r} has shape {tuple(got_shape)}, the model has {tuple(want_shape)}")
        if got_dtype == want_dtype:
            continue
        if key not in quant_keys and got_dtype in FLOAT_ST and want_dtype in FLOAT_ST:
            changes[key] = torch_dtype[got_dtype]
            continue
        raise ValueError(f"{what}: tensor {key!r} has dtype {got_dtype}, the model needs {want_dtype}")
    return changes


# ---------------------------------------------------------------------------
# Reading: the tensors
# ---------------------------------------------------------------------------


def _read_tensors(path: str, meta: dict, verify: bool) -> dict:
    """All tensors of the file, checksums verified (format 3, unless ``verify`` is False)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from None
    if verify and (meta["format_version"] >= 3 or "checksums" in meta):
        verify_tensors(tensors, meta.get("checksums"), repr(path))
    return tensors


def _check_codes(tensors: dict, layers: dict, what: str) -> None:
    """Codes that are what their layer says: packed words with no bit outside the ``bits``-wide
    fields of ``in_features`` columns, int8 codes in the signed ``bits`` range, finite scales and zeros."""
    from .packing import pack

    masks = {}
    for name, info in layers.items():
        if info["type"] == "bcq_linear":
            _check_bcq_tensors(tensors, name, info, what)
            continue
        bits, n = info["bits"], info["in_features"]
        packed = tensors.get(f"{name}.packed")
        if packed is not None:
            if (bits, n) not in masks:
                # Every field of n columns set: the bits a row of codes may use at all.
                masks[bits, n] = ~pack(np.full((1, n), (1 << (bits - 1)) - 1, dtype=np.int8), bits)[0]
            if np.bitwise_and(packed.numpy(), masks[bits, n]).any():
                raise ValueError(
                    f"{what}: layer {name!r}: the packed codes have bits set outside {bits}-bit fields of "
                    f"{n} columns (corrupt, or the layer's bits were changed)"
                )
        else:
            codes = tensors[f"{name}.codes"]
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
                raise ValueError(
                    f"{what}: layer {name!r}: int8 codes in [{int(codes.min())}, {int(codes.max())}] are "
                    f"outside the {bits}-bit range [{lo}, {hi}]"
                )
        for part in ("scale", "zero"):
            if not bool(torch.isfinite(tensors[f"{name}.{part}"]).all()):
                raise ValueError(f"{what}: layer {name!r}: {part} holds NaN or Inf")


def _check_bcq_tensors(tensors: dict, name: str, info: dict, what: str) -> None:
    """A BCQ layer's sign slots use no bit outside ``bits``-wide slots of ``in_features``
    columns, and its alpha and offset are finite."""
    from .bcq import pack as bcq_pack

    bits, n = info["bits"], info["in_features"]
    mask = ~bcq_pack(np.full((1, n), (1 << bits) - 1, dtype=np.uint8), bits)[0]
    if np.bitwise_and(tensors[f"{name}.planes"].numpy(), mask).any():
        raise ValueError(
            f"{what}: layer {name!r}: the BCQ sign slots have bits set outside {bits}-bit slots of "
            f"{n} columns (corrupt, or the layer's bits were changed)"
        )
    for part in ("alpha", "offset"):
        if not bool(torch.isfinite(tensors[f"{name}.{part}"]).all()):
            raise ValueError(f"{what}: layer {name!r}: {part} holds NaN or Inf")


def _pack_old_codes(tensors: dict, name: str, info: dict, version: int, what: str) -> None:
    """int8 codes of a 2-4-bit layer (format version 1) -> the packed buffer the layer now holds."""
    from .packing import pack

    bits = info["bits"]
    if version >= 2 or bits not in PACKED_BITS:
        return
    codes = tensors.pop(f"{name}.codes")
    try:
        tensors[f"{name}.packed"] = torch.from_numpy(pack(codes.numpy(), bits))
    except ValueError as exc:
        raise ValueError(f"{what}: layer {name!r}: {exc}") from None


# ---------------------------------------------------------------------------
# Reading: the verb
# ---------------------------------------------------------------------------


def load(path, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Load a model written by ``save``; a bad file changes nothing.

    Args:
        path: the safetensors file, or a Hugging Face folder written by ``save``
            / ``save_pretrained`` (its config.json checked as a file's stored
            config is, then ``from_pretrained`` of that transformers class with
            every check of ``decoupleq.hf_quantizer``; checksums are always
            verified there, while the tensors load; ``model`` must be None).
        model: None to rebuild a Hugging Face model from the stored config
            (no original weights needed), or a module of the same architecture
            (full precision or already quantized) to load into, in place.
        verify: check the per-tensor and metadata checksums (format version
            3; about one SHA-256 pass over the file). ``False`` skips them for
            speed; every other check still runs.

    Everything is checked before ``model`` (or anything else) changes: the
    format and version; the metadata checksum and every tensor's checksum;
    every field of every quantized layer's description (types and ranges, the
    codes' storage against ``bits``); that the file holds exactly the tensors
    the model will need, with their shapes and dtypes; that packed codes use
    only their ``bits``-wide fields and int8 codes stay in range; that scales
    and zeros are finite. Without ``model``, the class to build must be one
    of transformers' own classes for the config's ``model_type`` (never a
    name looked up as the file says); config keys that select code
    (``auto_map``, ``trust_remote_code``, an attention implementation other
    than "eager"/"sdpa", kernel settings) are refused; layer counts and
    sizes in the config must be backed by the tensors in the file; and the
    model is first built on the meta device and checked against the file,
    so a lying config costs neither memory nor time.

    Returns:
        The model in eval mode, with ``QuantLinear`` / ``QuantConv2d`` layers
        and bit-identical parameters and buffers; ``model.decoupleq_config``
        is the stored settings, ``model.decoupleq_layer_losses`` the stored
        per-layer relative losses (none for a file without them).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory or special file, a truncated, corrupt or
            tampered file, an unsupported format version, shapes, dtypes or
            names that do not match; the message names the tensor, layer or
            key. ``model`` is unchanged.
        TypeError: ``model`` not a module, ``verify`` not a bool.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    if os.path.isdir(os.fspath(path)) and os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        if model is not None:
            raise ValueError(f"{os.fspath(path)!r} is a folder: load(folder) builds its model; model must be None")
        from .hf_folder import load_folder

        return load_folder(path)
    path = _source_path(path)
    what = repr(path)
    meta, shapes, dtypes = _read_header(path, verify)
    layers, version = meta["layers"], meta["format_version"]

    # A stored Hugging Face description is checked even when the model is given: a file
    # that names code to run, or sizes its tensors do not back, is refused either way.
    hf = None
    if "hf_config" in meta["model"] or model is None:
        hf = _hf_build.make_config(meta["model"], shapes, what)
    tensors = _read_tensors(path, meta, verify)  # the file's own bytes first: cheap to refuse
    if hf is not None:
        # No memory on the meta device, and no more modules than the file's tensors back.
        # An empty tensor backs no parameter, so it buys no room in the build's budget.
        backed = sum(1 for s in shapes.values() if int(np.prod(s)) > 0) + len(meta["aliases"])
        skeleton = _hf_build.build(hf[1], hf[0], "meta", what, file_tensors=backed)
        moe.unfuse_for_layers(skeleton, layers)  # quantized experts live in per-expert layers
        _plan(skeleton, meta, shapes, dtypes, what)
        extra = _hf_build.extra_buffer_elements(skeleton)
        if extra > max(_hf_build.MAX_EXTRA_BUFFER_ELEMENTS, sum(int(np.prod(s)) for s in shapes.values())):
            raise ValueError(f"{what}: the stored config makes {extra} elements of buffers beyond the file's tensors")
        del skeleton
    # A caller's model with fused MoE experts gets their per-expert form (same forward) where
    # the file quantized them; undone if anything below fails, so a bad file changes nothing.
    undo_experts = moe.unfuse_for_layers(model, layers) if model is not None else None
    try:
        if model is not None:
            _plan(model, meta, shapes, dtypes, what)
        for name, info in layers.items():
            _pack_old_codes(tensors, name, info, version, what)
        _check_codes(tensors, layers, what)
        for dup, kept in meta["aliases"].items():
            tensors[dup] = tensors[kept]

        if model is None:
            model = _hf_build.build(hf[1], hf[0], "cpu", what)
            moe.unfuse_for_layers(model, layers)
        changes = _plan(model, meta, shapes, dtypes, what)  # cheap; on the very model to fill
        _fill(model, layers, tensors, changes)
    except BaseException:
        if undo_experts is not None:
            undo_experts()
        raise
    model.eval()
    model.decoupleq_config = meta.get("quantization")
    layer_losses.restore(model, meta.get("layer_losses"))
    _hf_hook.attach(model)
    log.info("loaded %d tensors (%d quantized layers) from %s", len(tensors), len(layers), path)
    return model


def _fill(model: nn.Module, layers: dict, tensors: dict, changes: dict) -> None:
    """Swap in the quantized layers, set dtypes, copy the tensors; undone if anything fails."""
    swapped, retyped = [], []
    try:
        for name, info in layers.items():
            shell = _module_from_info(info)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, shell)
        for key, dtype in changes.items():
            retyped.append(_set_dtype(model, key, dtype))
        model.load_state_dict(tensors, strict=True)
    except BaseException:
        for undo in reversed(retyped):
            undo()
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)
        raise


def _set_dtype(model: nn.Module, key: str, dtype: torch.dtype):
    """Give the model's tensor ``key`` the file's dtype (parameters keep their identity, so ties hold).

    Returns a function that undoes it."""
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters and mod._parameters[attr] is not None:
        p = mod._parameters[attr]
        old = p.data
        p.data = p.data.to(dtype)

        def undo():
            p.data = old
    else:
        old = mod._buffers[attr]
        mod._buffers[attr] = old.to(dtype)

        def undo():
            mod._buffers[attr] = old
    return undo
