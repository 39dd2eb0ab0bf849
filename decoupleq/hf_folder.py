"""``decoupleq.save`` / ``decoupleq.load`` of a Hugging Face folder (what ``save_pretrained`` writes).

A folder holds ``config.json`` with a decoupleq ``quantization_config``
(``decoupleq.hf_config``), ``model.safetensors`` or shards with
``model.safetensors.index.json``, ``generation_config.json`` for generative
models and, when given, the tokenizer's files. ``save`` writes it through the
model's own ``save_pretrained`` into a hidden folder beside the destination and
renames it into place whole; ``load`` checks ``config.json`` as ``load`` checks a
file's stored config (``decoupleq._hf_build``: transformers' own class for the
``model_type``, no key that selects code, sizes backed by the tensors) before
``from_pretrained`` of that class, whose quantizer checks the rest
(``decoupleq.hf_quantizer``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: config.json or an index larger than this is refused (real ones are kilobytes).
MAX_JSON_BYTES = 64 << 20


def _read_json(path: Path, what: str):
    from ._io_schema import parse_json

    if not path.is_file():
        raise ValueError(f"{what}: {path.name} is missing or not a regular file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{what}: {path.name} is larger than {MAX_JSON_BYTES} bytes")
    return parse_json(path.read_text(encoding="utf-8", errors="replace"), f"{what}: {path.name}")


def is_decoupleq_folder(path) -> bool:
    """True when ``path`` is a folder whose config.json carries a decoupleq quantization_config."""
    p = Path(path)
    try:
        cfg = _read_json(p / CONFIG_FILE, repr(str(p)))
    except (ValueError, OSError):
        return False
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == "decoupleq"


def weight_files(path: Path, what: str) -> list:
    """The folder's safetensors files: ``model.safetensors``, or the shards its index names
    (plain file names inside the folder, nothing else)."""
    if (path / INDEX_FILE).exists():
        index = _read_json(path / INDEX_FILE, what)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{what}: {INDEX_FILE} has no weight_map")
        names = sorted(set(wmap.values()))
        for n in names:
            if not isinstance(n, str) or os.path.basename(n) != n or not n.endswith(".safetensors") or n.startswith("."):
                raise ValueError(f"{what}: {INDEX_FILE} names {n!r}, not a safetensors file in the folder")
            if not (path / n).is_file():
                raise ValueError(f"{what}: shard {n!r} named by {INDEX_FILE} is missing")
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"{what}: neither {SINGLE_FILE} nor {INDEX_FILE} is in the folder")


def write_folder(model, path, tokenizer=None, max_shard_size=None) -> None:
    """``model.save_pretrained(path)`` (plus the tokenizer) for a decoupleq-quantized transformers
    model, into an existing empty folder. Raises ``ValueError`` for any other model."""
    import sys

    from torch import nn

    from . import _hf_hook

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "transformers" not in sys.modules:
        raise ValueError("a folder needs a transformers model; give a file name ending in .safetensors")
    from .hf_quantizer import DecoupleQHfQuantizer, is_transformers_model

    if not is_transformers_model(model):
        raise ValueError(
            f"a Hugging Face folder needs a transformers model, got {type(model).__name__}: "
            "give a file name ending in .safetensors"
        )
    if not isinstance(getattr(model, "hf_quantizer", None), DecoupleQHfQuantizer):
        _hf_hook.attach(model)  # a model quantized before this decoupleq, or by hand
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    # Equal models give equal bytes (resumed runs are compared byte for byte): safetensors
    # writes its header maps in hash order, so sort them.
    from .io import _canonical_header

    for f in sorted(Path(path).glob("*.safetensors")):
        _canonical_header(str(f))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def check_replaceable(path, arg: str, is_ours, ours: str) -> Path:
    """``path`` may be created or replaced as a whole: it is absent, an empty folder, or a
    folder ``is_ours`` accepts (a folder with anything else in it is refused, never deleted).

    Args:
        path: the destination folder.
        arg: how the caller's user names it, for the messages ("path", "--out").
        is_ours: ``is_ours(Path) -> bool``: a non-empty folder that may be replaced.
        ours: what ``is_ours`` accepts, for the message ("a decoupleq folder").

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError naming ``arg``.
    """
    out = Path(os.fspath(path))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"{arg} {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise ValueError(
            f"{arg} {str(out)!r} is a folder with other files in it (not {ours}): "
            "it would be replaced as a whole; give a new or empty folder"
        )
    return out


def replace_folder(out: Path, write):
    """Write the folder ``out`` as a whole: ``write(tmp)`` fills a hidden folder beside it,
    which is then renamed into place; a previous ``out`` (checked by ``check_replaceable``)
    is moved aside first and put back if anything fails, so an interrupted write leaves the
    previous folder (or none), never a mix. ``out``'s parent must exist.

    Returns:
        what ``write`` returned.
    """
    from .io import _umask

    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        result = write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / "previous")  # moves the old folder aside, whole
        os.replace(tmp, out)
    except BaseException:
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result


def check_destination(path, name: str = "path") -> Path:
    """``path`` as a ``Path`` if ``save_folder`` may write it (absent, an empty folder, or a
    decoupleq folder, in an existing directory); else ``TypeError``/``ValueError`` naming ``name``.
    Callers that do long work before saving check here first, so a bad destination fails early."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    out = check_replaceable(path, name, is_decoupleq_folder, "a decoupleq folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{name} {str(out)!r}: directory {str(parent)!r} does not exist")
    return out


def save_folder(model, path, tokenizer=None, max_shard_size=None) -> None:
    """Write ``path`` as a whole: a hidden folder beside it, renamed into place.

    ``path`` must be absent, an empty folder, or a folder this function wrote before
    (anything else is refused, never deleted).
    """
    out = check_destination(path)
    replace_folder(out, lambda tmp: write_folder(model, tmp, tokenizer, max_shard_size))
    log.info("saved %s", out)


def _shapes(files) -> dict:
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as exc:
            raise ValueError(f"{str(f)!r} is not a complete safetensors file: {exc}") from None
    return shapes


def model_class(path) -> tuple:
    """(transformers model class, parsed config.json) of a decoupleq folder, checked as
    ``decoupleq.load`` checks a file's stored config."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from . import _hf_build

    path = Path(os.fspath(path))
    what = repr(str(path))
    cfg = _read_json(path / CONFIG_FILE, what)
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {CONFIG_FILE} is not an object")
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "decoupleq":
        raise ValueError(
            f"{what} is not a decoupleq folder (config.json has no decoupleq quantization_config); "
            "a full-precision model loads with transformers' from_pretrained"
        )
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise ValueError(f"{what}: config.json 'architectures' must name exactly one model class, got {archs!r}")
    model_type = cfg.get("model_type")
    rest = {k: v for k, v in cfg.items() if k != "quantization_config"}
    attn = rest.pop("_attn_implementation", None) or rest.get("attn_implementation")
    _hf_build.check_config(rest, attn, _hf_build.file_dims(_shapes(weight_files(path, what))), what)
    config_cls = CONFIG_MAPPING[model_type] if isinstance(model_type, str) and model_type in CONFIG_MAPPING else None
    desc = {"hf_config": rest, "class": archs[0],
            "hf_config_class": config_cls.__name__ if config_cls is not None else None}
    _, model_cls = _hf_build.resolve_classes(desc, what)
    return model_cls, cfg


def load_folder(path):
    """The model of a decoupleq folder, built by its transformers class's ``from_pretrained``
    (local files only, no remote code), every check of ``decoupleq.hf_quantizer`` included."""
    from . import hf_quantizer  # noqa: F401  (registered, whatever the import order)

    model_cls, _ = model_class(path)
    model = model_cls.from_pretrained(os.fspath(path), local_files_only=True, trust_remote_code=False)
    model.eval()
    return model


def folder_layers(path) -> tuple:
    """(``DecoupleQConfig``, {layer: full description} in the model's module order) of a folder,
    from a meta-device build; the config is checked against the checksum its shards carry
    (tensors are not read)."""
    import torch

    from . import moe
    from .hf_config import DecoupleQConfig
    from .hf_quantizer import _read_shards, check_config_digest

    model_cls, cfg = model_class(path)
    qcfg = DecoupleQConfig.from_dict(cfg["quantization_config"])
    what = repr(str(path))
    _, _, meta = _read_shards([str(f) for f in weight_files(Path(os.fspath(path)), what)], what)
    check_config_digest(qcfg, meta, what)
    config = model_cls.config_class.from_dict({k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        skeleton = model_cls(config)
    moe.unfuse_for_layers(skeleton, qcfg.layers)  # quantized experts live in per-expert layers
    infos = {}
    for name in qcfg.layers:
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{what}: quantized layer {name!r} is not a module of {model_cls.__name__}") from None
        infos[name] = qcfg.layer_info(name, module, what)
    # In the model's order (config.json keeps its keys sorted): q_proj before o_proj, block 2 before 10.
    order = {name: k for k, (name, _) in enumerate(skeleton.named_modules())}
    return qcfg, dict(sorted(infos.items(), key=lambda item: order[item[0]]))


def folder_size(path) -> int:
    """Bytes of the folder's weight files."""
    p = Path(os.fspath(path))
    return sum(f.stat().st_size for f in weight_files(p, repr(str(p))))
