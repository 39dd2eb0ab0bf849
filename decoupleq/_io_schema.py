"""What a decoupleq file's metadata may hold: checked field by field before it is used.

A file is data from anywhere. Every value ``load`` reads from the JSON
document is checked here for its type and range (a bool is a JSON bool, not a
string; sizes are positive and bounded; names are dotted identifiers), so a
tampered file fails with a ``ValueError`` naming the layer and the key, never
with a ``KeyError``, a ``RecursionError`` or an attribute looked up by a name
the file chose. Also here: the per-tensor and metadata checksums (format
version 3).
"""
from __future__ import annotations

import hashlib
import json
import re

import torch

#: Deepest nesting of JSON the metadata may have (a real file nests about 6 deep).
MAX_JSON_DEPTH = 64
#: Largest in_features / out_features / channel count a layer may claim.
MAX_DIM = 1 << 31
#: Layer and tensor names: dotted identifiers, as ``named_modules`` gives them.
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
MAX_NAME_LEN = 1000
#: bias dtypes a quantized layer may have (by name; never looked up as an arbitrary attribute).
BIAS_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: safetensors dtype names of torch dtypes (those ``save`` can write).
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
}
FLOAT_ST = ("F64", "F32", "F16", "BF16")


def json_depth(obj, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, without recursion (stops counting past ``limit``)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > depth:
            depth = d
            if depth > limit:
                return depth
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return depth


def parse_json(text: str, what: str):
    """``json.loads`` that turns every failure (including nesting too deep to parse) into ValueError."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


def check_name(name, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or not _NAME.match(name):
        raise ValueError(f"{what} {name!r} is not a dotted module/tensor name")
    return name


def _int(info: dict, key: str, where: str, low: int = 1, high: int = MAX_DIM) -> int:
    if key not in info:
        raise ValueError(f"{where}: key {key!r} is missing")
    v = info[key]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{where}: {key!r} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _bool(info: dict, key: str, where: str) -> bool:
    if key not in info:
        raise ValueError(f"{where}: key {key!r} is missing")
    v = info[key]
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key!r} must be true or false, got {v!r}")
    return v


def _pair(info: dict, key: str, where: str, low: int) -> list:
    v = info.get(key)
    if (not isinstance(v, list) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or not low <= x <= 1 << 16 for x in v)):
        raise ValueError(f"{where}: {key!r} must be a list of 2 integers >= {low}, got {v!r}")
    return v


def check_layer(name: str, info, version: int) -> dict:
    """Check one quantized layer's description (``quant_info()`` as saved); returns it.

    Raises:
        ValueError naming the layer and the key at fault.
    """
    from .nn import ORIGINS, PACKED_BITS
    from .packing import FORMAT as PACKED_FORMAT

    where = f"layer {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: description must be an object, got {type(info).__name__}")
    kind = info.get("type")
    if kind == "bcq_linear":
        return _check_bcq_layer(where, info, version)
    if kind not in ("linear", "conv2d"):
        raise ValueError(f"{where}: 'type' must be 'linear', 'conv2d' or 'bcq_linear', got {kind!r}")
    bits, n, out = _check_common(where, info, 2, 8)
    _bool(info, "symmetric", where)
    codes = info.get("codes", "int8") if version >= 2 else "int8"
    if codes not in ("int8", PACKED_FORMAT):
        raise ValueError(f"{where}: codes stored as {codes!r}: this decoupleq reads 'int8' and {PACKED_FORMAT!r}")
    if version >= 2 and (codes == PACKED_FORMAT) != (bits in PACKED_BITS):
        raise ValueError(
            f"{where}: {bits}-bit codes stored as {codes!r}; this format stores 2-4 bits as "
            f"{PACKED_FORMAT!r} and 5-8 bits as 'int8'"
        )
    if kind == "linear":
        origin = info.get("origin", "linear")
        if origin not in ORIGINS:
            raise ValueError(f"{where}: 'origin' must be one of {ORIGINS}, got {origin!r}")
    else:
        cin, cout = _int(info, "in_channels", where), _int(info, "out_channels", where)
        kh, kw = _pair(info, "kernel_size", where, 1)
        _pair(info, "stride", where, 1)
        _pair(info, "dilation", where, 1)
        padding = info.get("padding")
        if not (padding in ("same", "valid") or (isinstance(padding, list) and len(padding) == 2)):
            raise ValueError(f"{where}: 'padding' must be 'same', 'valid' or 2 integers, got {padding!r}")
        if isinstance(padding, list):
            _pair(info, "padding", where, 0)
        if info.get("padding_mode") not in PADDING_MODES:
            raise ValueError(f"{where}: 'padding_mode' must be one of {PADDING_MODES}, got {info.get('padding_mode')!r}")
        if (cout, cin * kh * kw) != (out, n):
            raise ValueError(
                f"{where}: (out_features, in_features) = {(out, n)} but channels and kernel give {(cout, cin * kh * kw)}"
            )
    return info


def _check_common(where: str, info: dict, low_bits: int, high_bits: int):
    """bits, in/out features, group size, bias and its dtype, method: what every layer kind has."""
    bits = _int(info, "bits", where, low_bits, high_bits)
    n = _int(info, "in_features", where)
    out = _int(info, "out_features", where)
    if n * out > 1 << 40:
        raise ValueError(f"{where}: {out} x {n} weights is past any real layer")
    gs = info.get("group_size")
    # A uniform layer's last group may be shorter (G = ceil(n / g)); the
    # stored layout is the same, so older files (all dividing) still load.
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or 1 <= gs <= n):
        raise ValueError(f"{where}: 'group_size' must be -1 or in 1..in_features {n}, got {gs!r}")
    has_bias = _bool(info, "bias", where)
    bias_dtype = info.get("bias_dtype")
    if has_bias and bias_dtype not in BIAS_DTYPES:
        raise ValueError(f"{where}: 'bias_dtype' must be one of {sorted(BIAS_DTYPES)}, got {bias_dtype!r}")
    if not has_bias and bias_dtype is not None:
        raise ValueError(f"{where}: 'bias_dtype' is {bias_dtype!r} but the layer has no bias")
    method = info.get("method")
    if method is not None and (not isinstance(method, str) or len(method) > 64):
        raise ValueError(f"{where}: 'method' must be a short string, got {method!r}")
    return bits, n, out


def _check_bcq_layer(where: str, info: dict, version: int) -> dict:
    """A BCQ layer (``BCQLinear.quant_info()``): format version 3 or later, its layout's name."""
    from .bcq import FORMAT as BCQ_FORMAT
    from .bcq import MAX_BITS
    from .nn import ORIGINS

    if version < 3:
        raise ValueError(f"{where}: BCQ layers need format_version >= 3, the file has {version}")
    bits, n, out = _check_common(where, info, 1, MAX_BITS)
    gs = info["group_size"]
    if gs != -1 and n % gs:  # BCQ layers have no short last group
        raise ValueError(f"{where}: a BCQ layer's 'group_size' must be -1 or a divisor of in_features {n}, got {gs}")
    if info.get("codes") != BCQ_FORMAT:
        raise ValueError(f"{where}: BCQ indices stored as {info.get('codes')!r}: this decoupleq reads {BCQ_FORMAT!r}")
    origin = info.get("origin", "linear")
    if origin not in ORIGINS:
        raise ValueError(f"{where}: 'origin' must be one of {ORIGINS}, got {origin!r}")
    return info


def check_metadata(meta: dict, version: int, what: str) -> None:
    """The document's top-level fields, each layer's description and the aliases.

    Raises:
        ValueError naming the field (and layer) at fault.
    """
    for k in ("layers", "aliases", "model"):
        if not isinstance(meta.get(k), dict):
            raise ValueError(f"{what}: metadata field {k!r} is missing or not an object")
    q = meta.get("quantization")
    if q is not None and not isinstance(q, dict):
        raise ValueError(f"{what}: metadata field 'quantization' must be an object or null")
    for name, info in meta["layers"].items():
        check_name(name, f"{what}: quantized layer")
        check_layer(name, info, version)
    for dup, kept in meta["aliases"].items():
        check_name(dup, f"{what}: alias")
        check_name(kept, f"{what}: alias target of {dup!r}")
    desc = meta["model"]
    for k in ("class", "module"):
        if k in desc and not isinstance(desc[k], str):
            raise ValueError(f"{what}: model {k!r} must be a string, got {desc[k]!r}")
    if "hf_config" in desc and not isinstance(desc["hf_config"], dict):
        raise ValueError(f"{what}: model 'hf_config' must be an object")
    if meta.get("layer_losses") is not None:  # optional: files of earlier versions have none
        from .layer_losses import check_stored

        check_stored(meta["layer_losses"], what, meta["layers"])


# ---------------------------------------------------------------------------
# Checksums (format version 3)
# ---------------------------------------------------------------------------

#: Key of the safetensors metadata entry holding the SHA-256 of the decoupleq JSON document.
META_DIGEST_KEY = "decoupleq_sha256"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (little-endian, C order), as hex.

    The dtype and shape are hashed with the bytes, so a header edit that keeps
    the byte count (a shape (a, b) read as (b, a), int8 read as uint8) also fails.
    """
    h = hashlib.sha256()
    h.update(f"{ST_DTYPES.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
    t = t.detach()
    if t.numel():
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_tensors(tensors: dict, checksums, what: str) -> None:
    """Every tensor of the file has its recorded digest, and every recorded digest has its tensor.

    Raises:
        ValueError naming the first tensor whose bytes, dtype or shape differ.
    """
    if not isinstance(checksums, dict):
        raise ValueError(f"{what}: metadata field 'checksums' is missing or not an object")
    extra = sorted(set(tensors) - set(checksums))
    gone = sorted(set(checksums) - set(tensors))
    if extra or gone:
        raise ValueError(f"{what}: tensors without a checksum {extra[:5]}, checksums without a tensor {gone[:5]}")
    for key in sorted(tensors):
        if tensor_digest(tensors[key]) != checksums[key]:
            raise ValueError(
                f"{what}: tensor {key!r} does not match its checksum: the file is corrupt or was edited "
                "(load(..., verify=False) skips this check)"
            )
