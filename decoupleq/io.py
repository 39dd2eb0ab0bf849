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
  format's name or "int8"), the tensor ``aliases``, and ``model``: the class
  and, for Hugging Face models, the full config so ``load`` can rebuild the
  model without the original weights.

``save`` writes to a temporary file in the destination directory, syncs it and
renames it over the destination (``os.replace``): an interrupted save leaves
the previous file (or none), never a partial one. ``load`` checks the format,
its version and every shape before it changes anything, and raises
``ValueError`` with the offending name on a truncated or mismatched file.

Format version 1 (int8 ``<layer>.codes`` at every bit width) still loads: its
2-4-bit codes are packed while loading. Format version 2 (the same as 3
without BCQ layers) loads as it is.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

import torch
from torch import nn

from .capture import layer_in_features
from .models import is_quantizable
from .nn import QUANT_MODULES, QuantConv2d, is_hf_conv1d, quant_module_from_info
from .nn_bcq import BCQLinear

log = logging.getLogger(__name__)

FORMAT = "decoupleq"
FORMAT_VERSION = 3
#: Versions ``load`` reads: 1 stored int8 codes at every bit width; 2 had no BCQ layers.
READABLE_VERSIONS = (1, 2, 3)
#: Every kind of quantized layer a file describes (``quant_info()["type"]``).
LAYER_MODULES = QUANT_MODULES + (BCQLinear,)
#: The first format version with BCQ layers.
BCQ_SINCE_VERSION = 3
METADATA_KEY = "decoupleq"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every platform allows it)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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
    cls = type(model)
    desc = {"class": cls.__name__, "module": cls.__module__}
    cfg = getattr(model, "config", None)
    if cls.__module__.startswith("transformers.") and cfg is not None and hasattr(cfg, "to_json_string"):
        desc["hf_config_class"] = type(cfg).__name__
        desc["hf_config"] = json.loads(cfg.to_json_string(use_diff=False))
        desc["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return desc


def save(model: nn.Module, path) -> None:
    """Write ``model`` (quantized or not) to one safetensors file at ``path``, atomically.

    Args:
        model: the model, typically returned by ``decoupleq.quantize``.
        path: destination file (``.safetensors`` by convention); its directory
            must exist. An existing file is replaced only once the new one is
            complete.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``path`` is a directory or its directory does not exist.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; give a file name such as model.safetensors")
    parent = os.path.dirname(os.path.abspath(path))
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
    }
    text = json.dumps(meta, sort_keys=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    log.info("saved %d tensors (%d quantized layers) to %s", len(tensors), len(layers), path)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read_metadata(path) -> dict:
    """The JSON document of a decoupleq file, checked for format and version (tensors are not read).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file (for example truncated), not a
            decoupleq file, or an unsupported format version.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # SafetensorError is not importable as a public name
        raise ValueError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from None
    if METADATA_KEY not in raw:
        raise ValueError(f"{path!r} is a safetensors file but not a decoupleq checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r}: the decoupleq metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path!r}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path!r} has format_version {version!r}; this decoupleq reads format_version {FORMAT_VERSION} "
            f"(and {', '.join(str(v) for v in READABLE_VERSIONS if v != FORMAT_VERSION)}, read as well)"
        )
    for k in ("layers", "aliases", "model"):
        if not isinstance(meta.get(k), dict):
            raise ValueError(f"{path!r}: metadata field {k!r} is missing or not an object")
    return meta


def _codes_storage(info: dict, version: int) -> str:
    """How a layer's codes are stored in a file of ``version``: the packed format's name or "int8"."""
    from .packing import FORMAT

    storage = info.get("codes", "int8") if version >= 2 else "int8"
    if storage not in ("int8", FORMAT):
        raise ValueError(f"codes stored as {storage!r}: this decoupleq reads 'int8' and {FORMAT!r}")
    return storage


def _expected_shapes(name: str, info: dict, version: int = FORMAT_VERSION) -> dict:
    """{tensor name: (shape, safetensors dtype or None)} of one quantized layer in the file."""
    from .packing import row_words

    if info.get("type") == "bcq_linear":
        return _expected_bcq_shapes(name, info, version)

    out, n = int(info["out_features"]), int(info["in_features"])
    gs = int(info["group_size"])
    if gs != -1 and (gs <= 0 or n % gs):
        raise ValueError(f"layer {name}: group_size {gs} does not divide in_features {n}")
    G = 1 if gs == -1 else n // gs
    if _codes_storage(info, version) == "int8":
        shapes = {f"{name}.codes": ((out, n), "I8")}
    else:
        shapes = {f"{name}.packed": ((out, row_words(int(info["bits"]), n)), "U32")}
    shapes.update({f"{name}.scale": ((out, G), None), f"{name}.zero": ((out, G), None)})
    if info.get("bias"):
        shapes[f"{name}.bias"] = ((out,), None)
    return shapes


def _expected_bcq_shapes(name: str, info: dict, version: int) -> dict:
    """The tensors of a BCQ layer: planes, alpha, offset (float32, as written) and bias."""
    from .bcq import FORMAT as BCQ_FORMAT
    from .bcq import MAX_BITS
    from .bcq import row_words as bcq_row_words

    if version < BCQ_SINCE_VERSION:
        raise ValueError(f"layer {name}: BCQ layers need format_version >= {BCQ_SINCE_VERSION}, the file has {version}")
    if info.get("codes") != BCQ_FORMAT:
        raise ValueError(f"layer {name}: BCQ indices stored as {info.get('codes')!r}: this decoupleq reads {BCQ_FORMAT!r}")
    out, n, bits = int(info["out_features"]), int(info["in_features"]), int(info["bits"])
    gs = int(info["group_size"])
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"layer {name}: BCQ bits {bits} is outside [1, {MAX_BITS}]")
    if gs != -1 and (gs <= 0 or n % gs):
        raise ValueError(f"layer {name}: group_size {gs} does not divide in_features {n}")
    G = 1 if gs == -1 else n // gs
    shapes = {
        f"{name}.planes": ((out, bcq_row_words(bits, n)), "U32"),
        f"{name}.alpha": ((out, G, bits), "F32"),
        f"{name}.offset": ((out, G), "F32"),
    }
    if info.get("bias"):
        shapes[f"{name}.bias"] = ((out,), None)
    return shapes


def _module_from_info(info: dict) -> nn.Module:
    """The empty quantized layer a file's description asks for, by layer kind."""
    if info.get("type") == "bcq_linear":
        return BCQLinear.from_info(info)
    return quant_module_from_info(info)


def _build_hf_model(desc: dict, path: str) -> nn.Module:
    if "hf_config" not in desc:
        raise ValueError(
            f"{path!r} holds a {desc.get('class')} (not a Hugging Face model): pass the model "
            "architecture as load(path, model=...)"
        )
    import transformers

    try:
        config_cls = getattr(transformers, desc["hf_config_class"])
        model_cls = getattr(transformers, desc["class"])
    except AttributeError as exc:
        raise ValueError(f"{path!r}: this transformers version lacks {exc.name}") from None
    cfg = config_cls.from_dict(dict(desc["hf_config"]))
    if desc.get("attn_implementation"):
        try:
            cfg._attn_implementation = desc["attn_implementation"]
        except Exception:  # older configs without the setter
            pass
    return model_cls(cfg)


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
    want = (int(info["out_features"]), int(info["in_features"]))
    if got != want:
        raise ValueError(f"layer {name!r}: the file has (out, in) = {want} but the model has {got}")
    if info["type"] == "conv2d" and not isinstance(current, (nn.Conv2d, QuantConv2d)):
        raise ValueError(f"layer {name!r}: the file has a conv2d but the model has a {type(current).__name__}")


def load(path, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by ``save``.

    Args:
        path: the safetensors file.
        model: None to rebuild a Hugging Face model from the stored config
            (no original weights needed), or a module of the same architecture
            (full precision or already quantized) to load into, in place.

    Returns:
        The model in eval mode, with ``QuantLinear`` / ``QuantConv2d`` layers
        and bit-identical parameters and buffers; ``model.decoupleq_config``
        is the stored settings.

    Raises:
        FileNotFoundError, ValueError (truncated file, wrong format version,
        shapes or names that do not match), TypeError (``model`` not a module).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    path = os.fspath(path)
    meta = read_metadata(path)
    layers, aliases = meta["layers"], meta["aliases"]

    # Every check against the file happens before the model is touched.
    version = meta["format_version"]
    with safe_open(path, framework="pt") as f:
        file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        file_dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for name, info in layers.items():
        try:
            shapes = _expected_shapes(name, info, version)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"layer {name!r}: incomplete description in the file ({exc!r})") from None
        for key, (want, dtype) in shapes.items():
            got = file_shapes.get(key)
            if got is None:
                raise ValueError(f"{path!r}: tensor {key!r} of quantized layer {name!r} is missing")
            if got != want:
                raise ValueError(f"{path!r}: tensor {key!r} has shape {got}, layer {name!r} needs {want}")
            if dtype is not None and file_dtypes[key] != dtype:
                raise ValueError(f"{path!r}: tensor {key!r} has dtype {file_dtypes[key]}, layer {name!r} needs {dtype}")
    for dup, kept in aliases.items():
        if kept not in file_shapes:
            raise ValueError(f"{path!r}: alias {dup!r} points to missing tensor {kept!r}")

    if model is None:
        model = _build_hf_model(meta["model"], path)
    for name, info in layers.items():
        _check_layer_slot(model, name, info)

    for name, info in layers.items():
        shell = _module_from_info(info)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, shell)

    tensors = load_file(path)
    for name, info in layers.items():
        _pack_old_codes(tensors, name, info, version, path)
    for dup, kept in aliases.items():
        tensors[dup] = tensors[kept]
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, t in tensors.items():
        target = own[key]
        if tuple(target.shape) != tuple(t.shape):
            raise ValueError(f"{path!r}: tensor {key!r} has shape {tuple(t.shape)}, the model has {tuple(target.shape)}")
        if target.dtype != t.dtype:
            _set_dtype(model, key, t.dtype)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    model.decoupleq_config = meta.get("quantization")
    log.info("loaded %d tensors (%d quantized layers) from %s", len(tensors), len(layers), path)
    return model


def _pack_old_codes(tensors: dict, name: str, info: dict, version: int, path: str) -> None:
    """int8 codes of a 2-4-bit layer (format version 1) -> the packed buffer the layer now holds."""
    from .nn import PACKED_BITS
    from .packing import pack

    bits = int(info["bits"])
    if info.get("type") == "bcq_linear" or _codes_storage(info, version) != "int8" or bits not in PACKED_BITS:
        return
    codes = tensors.pop(f"{name}.codes")
    try:
        tensors[f"{name}.packed"] = torch.from_numpy(pack(codes.numpy(), bits))
    except ValueError as exc:
        raise ValueError(f"{path!r}: layer {name!r}: {exc}") from None


def _set_dtype(model: nn.Module, key: str, dtype: torch.dtype):
    """Give the model's tensor ``key`` the file's dtype (parameters keep their identity, so ties hold)."""
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters and mod._parameters[attr] is not None:
        p = mod._parameters[attr]
        p.data = p.data.to(dtype)
    elif attr in mod._buffers and mod._buffers[attr] is not None:
        mod._buffers[attr] = mod._buffers[attr].to(dtype)
