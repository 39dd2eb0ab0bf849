"""Rebuild a Hugging Face model from a file's stored config, treating the file as data.

A file names its model class and config; ``load`` must neither run code the
file chooses nor allocate what a lying config asks for. So:

- the config class comes from transformers' own ``model_type`` registry
  (``CONFIG_MAPPING``), and the model class must be one that transformers'
  auto mappings (``AutoModel``, ``AutoModelForCausalLM``...) list for that
  ``model_type``, and a subclass of ``PreTrainedModel``: no name from the
  file is looked up anywhere else;
- config keys that select code are refused: ``auto_map``,
  ``trust_remote_code``, custom pipelines, quantization and kernel settings,
  and any attention implementation other than ``"eager"`` or ``"sdpa"`` (a
  Hub kernel repository such as ``"kernels-community/flash-attn"`` would
  make transformers fetch and run code);
- sizes are bounded by the tensors actually in the file: layer counts by the
  layer indices present in tensor names, widths and vocabulary by the largest
  tensor dimension; then the model is built on the meta device (no memory)
  and its every parameter and buffer checked against the file
  (``decoupleq.io``) before a real one is built. Even on the meta device a
  module costs time, so construction stops as soon as the model has
  registered more parameters than the file holds tensors: a config backed
  only by cheap tensor names costs no more than a real file of its size.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Attention implementations a file may ask for (both are in torch itself).
SAFE_ATTENTION = ("eager", "sdpa")
#: transformers' own GPU / paged implementations (no download): a model saved with one of
#: them loads with "sdpa" instead. Anything else (a Hub kernel repository) is refused.
BUILTIN_ATTENTION = (
    "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention", "sdpa_paged",
    "eager_paged", "flash_paged",
)
_ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
#: Config keys that make transformers import, download or dispatch to code beyond the model class.
FORBIDDEN_KEYS = (
    "auto_map", "trust_remote_code", "custom_pipelines", "quantization_config", "use_kernels",
    "kernel_config",
)
#: Counts of repeated modules: bounded by the largest index + 1 found in the file's tensor names.
_COUNT_KEYS = re.compile(
    r"^(num_hidden_layers|n_layers?|num_layers|(en|de)coder_layers|num_(en|de)coder_layers|"
    r"num_(local_)?experts|n_routed_experts|n_shared_experts|num_experts_per_tok)$"
)
#: Fused expert tensors ([E, ...], transformers 5's MoE experts kept in full precision).
_FUSED_EXPERTS = re.compile(r"experts\.(gate_up_proj|down_proj|up_proj)$")
#: Widths and vocabulary: bounded by the largest dimension of any tensor in the file.
_WIDTH_KEYS = re.compile(
    r"^(vocab_size|hidden_size|intermediate_size|n_embd|n_inner|d_model|d_ff|d_kv|ffn_dim|"
    r"(en|de)coder_ffn_dim|head_dim|embedding_size|num_attention_heads|num_key_value_heads|n_head|"
    r"num_heads|type_vocab_size|n_positions|moe_intermediate_size|word_embed_proj_dim)$"
)
#: Any other integer in a config past this is refused (no real config has one).
MAX_CONFIG_INT = 1 << 40
#: Non-persistent buffers (rotary tables, masks) a model may build beyond its stored tensors.
MAX_EXTRA_BUFFER_ELEMENTS = 1 << 26
#: Building a model from a file stops once it registers more than PARAM_SLACK x (the file's
#: tensors and aliases) + BUDGET_BASE parameters (a model re-registering a parameter stays
#: inside), or MODULES_PER_TENSOR x that + BUDGET_BASE submodules (activations, dropout and
#: containers hold no tensors; a Llama layer has 13 modules for 9 tensors).
PARAM_SLACK = 1
MODULES_PER_TENSOR = 4
BUDGET_BASE = 64


def _walk(cfg: dict, where: str = "hf_config"):
    """(path, key, value) of every entry of a config and its nested sub-configs, iteratively."""
    stack = [(cfg, where)]
    while stack:
        d, path = stack.pop()
        for k, v in d.items():
            yield path, k, v
            if isinstance(v, dict):
                stack.append((v, f"{path}.{k}"))


def check_config(cfg: dict, attn, file_dims: dict, what: str) -> None:
    """Refuse config entries that select code, and sizes the file's tensors do not back.

    Args:
        cfg: the stored ``hf_config`` dict.
        attn: the stored ``attn_implementation`` (None or a string).
        file_dims: ``{"max_dim": largest tensor dimension, "max_count": largest layer index + 1}``.

    Raises:
        ValueError naming the key.
    """
    if attn is not None and attn not in SAFE_ATTENTION + BUILTIN_ATTENTION:
        raise ValueError(f"{what}: attn_implementation {attn!r} is refused (a file may ask only for {SAFE_ATTENTION})")
    for path, k, v in _walk(cfg):
        if not isinstance(k, str):
            raise ValueError(f"{what}: {path} has a non-string key")
        # A kernel named by a string or mapping (a Hub repository); a size such as
        # Mamba's conv_kernel = 4 is data.
        names_kernel = "kernel" in k.lower() and bool(v) and (
            isinstance(v, (str, dict)) or (isinstance(v, list) and any(isinstance(x, str) for x in v))
        )
        if names_kernel or (k in FORBIDDEN_KEYS and v not in (None, False, {}, [])):
            raise ValueError(f"{what}: config key {path}.{k} selects code to run and is refused")
        if k in _ATTN_KEYS and v is not None and v not in SAFE_ATTENTION + BUILTIN_ATTENTION:
            raise ValueError(
                f"{what}: config {path}.{k} = {v!r} is refused (a file may ask only for {SAFE_ATTENTION})"
            )
        if isinstance(v, int) and not isinstance(v, bool):
            if _COUNT_KEYS.match(k) and v > file_dims["max_count"]:
                raise ValueError(
                    f"{what}: config {path}.{k} = {v} but the file's tensors hold at most "
                    f"{file_dims['max_count']} of them"
                )
            if _WIDTH_KEYS.match(k) and v > file_dims["max_dim"]:
                raise ValueError(
                    f"{what}: config {path}.{k} = {v} exceeds every tensor dimension in the file "
                    f"(largest {file_dims['max_dim']})"
                )
            if abs(v) > MAX_CONFIG_INT:
                raise ValueError(f"{what}: config {path}.{k} = {v} is out of range")


def file_dims(shapes: dict) -> dict:
    """The sizes a file's tensors back: the largest dimension, and the most distinct indices
    under one prefix (``model.layers.0.``, ``model.layers.1.``... count 2). Distinct indices,
    not the largest: one tensor named ``model.layers.99999.x`` backs one layer, not 100000."""
    max_dim = max((d for s in shapes.values() for d in s), default=0)
    indices = {}
    fused = 0
    for key, s in shapes.items():
        for m in re.finditer(r"\.(\d+)(?=\.)", key):
            indices.setdefault(key[: m.start()], set()).add(m.group(1))
        # Fused MoE experts left in full precision hold one matrix per expert along dim 0.
        if len(s) == 3 and _FUSED_EXPERTS.search(key):
            fused = max(fused, s[0])
    return {"max_dim": max_dim, "max_count": max(max((len(v) for v in indices.values()), default=0), fused)}


def _auto_class_names(model_type: str) -> set:
    """Every model class name transformers' auto mappings list for ``model_type``."""
    from transformers.models.auto import modeling_auto

    names = set()
    for attr in dir(modeling_auto):
        if not attr.endswith("_MAPPING_NAMES"):
            continue
        mapping = getattr(modeling_auto, attr)
        if not isinstance(mapping, dict):
            continue
        v = mapping.get(model_type)
        if isinstance(v, str):
            names.add(v)
        elif isinstance(v, (tuple, list)):
            names.update(x for x in v if isinstance(x, str))
    return names


def resolve_classes(desc: dict, what: str):
    """(config class, model class) of a stored Hugging Face model description, from the allowlist."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = desc["hf_config"]
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{what}: hf_config model_type {model_type!r} is not a model type this transformers knows")
    config_cls = CONFIG_MAPPING[model_type]
    if desc.get("hf_config_class") != config_cls.__name__:
        raise ValueError(
            f"{what}: hf_config_class {desc.get('hf_config_class')!r} is not {config_cls.__name__} "
            f"(the config class of model_type {model_type!r})"
        )
    name = desc.get("class")
    allowed = _auto_class_names(model_type)
    if name not in allowed:
        raise ValueError(
            f"{what}: model class {name!r} is not one of transformers' model classes for {model_type!r} "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
    model_cls = getattr(transformers, name, None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise ValueError(f"{what}: {name!r} is not a transformers PreTrainedModel in this version")
    if not issubclass(config_cls, model_cls.config_class):
        raise ValueError(f"{what}: {name} takes a {model_cls.config_class.__name__}, not a {config_cls.__name__}")
    return config_cls, model_cls


def make_config(desc: dict, shapes: dict, what: str):
    """The validated config object of a stored model description (builds no model)."""
    if "hf_config" not in desc:
        raise ValueError(
            f"{what} holds a {desc.get('class')} (not a Hugging Face model): pass the model "
            "architecture as load(path, model=...)"
        )
    attn = desc.get("attn_implementation")
    check_config(desc["hf_config"], attn, file_dims(shapes), what)
    config_cls, model_cls = resolve_classes(desc, what)
    stored = {k: v for k, v in desc["hf_config"].items() if k not in _ATTN_KEYS}  # set below, not by the file
    try:
        cfg = config_cls.from_dict(stored)
    except RecursionError:
        raise ValueError(f"{what}: hf_config is nested too deeply") from None
    except Exception as exc:  # a config class's own validation
        raise ValueError(f"{what}: hf_config is not a valid {config_cls.__name__}: {exc}") from None
    # Forced, not taken from the file's wish: torch's own attention only.
    if attn in BUILTIN_ATTENTION:
        log.warning("%s: saved with attn_implementation %r; loading with 'sdpa'", what, attn)
    cfg._attn_implementation = attn if attn in SAFE_ATTENTION else ("sdpa" if attn in BUILTIN_ATTENTION else "eager")
    return cfg, model_cls


class _OverBudget(Exception):
    """Raised from a registration hook: the model being built outgrows the file."""


@contextlib.contextmanager
def _registration_budget(max_params: int, max_modules: int):
    """Abort a model's construction, on this thread, once it has registered more than
    ``max_params`` parameters or ``max_modules`` submodules.

    Building costs time per module even on the meta device (about 5 ms per Llama
    layer), so a config whose counts are backed only by cheap tensor names (one
    empty tensor per fake layer index) would otherwise buy seconds of work with a
    few bytes each. Every parameter a model registers is in its state_dict, and
    every state_dict entry must be in the file (a tensor or an alias), so a model
    that registers more than the file holds cannot load: stopping there bounds
    the work by the file's own size."""
    from torch.nn.modules import module as module_mod

    me = threading.get_ident()
    counts = {"params": 0, "modules": 0}

    def count(kind, limit):
        def hook(*_):
            if threading.get_ident() != me:  # another thread building its own model
                return None
            counts[kind] += 1
            if counts[kind] > limit:
                raise _OverBudget(f"more than {limit} {kind}")
            return None
        return hook

    handles = [
        module_mod.register_module_parameter_registration_hook(count("params", max_params)),
        module_mod.register_module_module_registration_hook(count("modules", max_modules)),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: Names of torch.nn.init's in-place initialisers and of the tensor fills they use: no-ops on
#: meta tensors (there are no values to set). By name: transformers wraps torch.nn.init's
#: functions in its own. Each returns the tensor it was given.
_INIT_FILLS = frozenset(
    [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    + ["uniform_", "normal_", "fill_", "zero_"]
)


class _SkipMetaFills(torch.overrides.TorchFunctionMode):
    """Used only for builds on the meta device. Skip weight initialisation on meta tensors: about half of a meta build's time goes to
    dispatching ``reset_parameters``' fills, which change nothing there. A mode is
    per thread, unlike patching ``torch.nn.init``, so models built on other threads
    meanwhile are initialised as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ones or func is torch.zeros:
            # Constant factories (norm weights) on meta hold no values either, and torch.ones
            # on meta dispatches through a slow decomposition: torch.empty gives the same tensor.
            device = kwargs.get("device")
            if device is None or torch.device(device).type == "meta":
                return torch.empty(*args, **kwargs)
        if getattr(func, "__name__", None) in _INIT_FILLS:
            # torch.nn.init passes its tensor by keyword through torch function handling.
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build(model_cls, cfg, device, what: str = "the file", file_tensors: int | None = None) -> nn.Module:
    """``model_cls(cfg)`` on ``device`` ("meta" costs no memory).

    Args:
        file_tensors: the number of tensors the file provides (stored ones and
            aliases); when given, construction stops as soon as the model has
            registered more parameters than ``PARAM_SLACK`` times that (plus
            ``BUDGET_BASE``), or more submodules than ``MODULES_PER_TENSOR``
            times that (plus ``BUDGET_BASE``): such a model cannot match the file.

    Raises:
        ValueError: the class's own code rejects the stored config (a value of the
            wrong type, say), or the model outgrows the file; the message names
            the class and the cause.
    """
    budget = contextlib.nullcontext()
    if file_tensors is not None:
        budget = _registration_budget(PARAM_SLACK * file_tensors + BUDGET_BASE,
                                      MODULES_PER_TENSOR * file_tensors + BUDGET_BASE)
    fills = _SkipMetaFills() if str(device) == "meta" else contextlib.nullcontext()
    try:
        with budget, torch.device(device), fills:
            return model_cls(cfg)
    except _OverBudget as exc:
        raise ValueError(
            f"{what}: the stored config builds a {model_cls.__name__} with {exc}, for the "
            f"{file_tensors} tensors in the file: its sizes are not the file's"
        ) from None
    except Exception as exc:
        raise ValueError(
            f"{what}: the stored config does not build a {model_cls.__name__}: {type(exc).__name__}: {exc}"
        ) from None


def extra_buffer_elements(model: nn.Module) -> int:
    """Elements of the buffers a model builds that are not in its state_dict (non-persistent)."""
    persistent = set(model.state_dict(keep_vars=True))
    return sum(b.numel() for n, b in model.named_buffers() if n not in persistent)
