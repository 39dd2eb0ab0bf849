"""Write the corpus of hostile decoupleq files in tests/data/hostile/ (run from the repository root:
``python tests/data/make_hostile.py``; the files are committed, tests/test_io_hostile.py loads each).

Every file starts from one good file: a 1-layer Llama (hidden 32, MLP 80, vocab 32, tied
embeddings) quantized with RTN at 2 bits, group 16. Each is then damaged one way. Most are
"re-signed" (their checksums recomputed after the edit, as a careful forger would), so that
the check behind the checksums is what refuses them; a few are left unsigned to show that
the checksums alone catch the edit. ``manifest.json`` maps each file to the regular
expression its ``ValueError`` must match, whether or not a model is passed to ``load``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "hostile")


def base_model(seed: int = 0):
    """The full-precision model the corpus was made from (also the skeleton the tests pass)."""
    import logging

    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=1, pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def good_file(path: str) -> None:
    import decoupleq
    from decoupleq.config import QuantConfig

    model = base_model()
    ids = torch.randint(2, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    decoupleq.quantize(model, ids, QuantConfig(bits=2, group_size=16, method="rtn"), blockwise=False, verbose=False)
    decoupleq.save(model, path)


def read(path):
    with safe_open(path, framework="pt") as f:
        raw = f.metadata()
    return json.loads(raw["decoupleq"]), load_file(path), raw


def write(path, meta, tensors, sign=True, old_digest=None):
    """Write tensors + metadata; ``sign`` recomputes the checksums and the document's digest,
    else the good file's digest is kept (now wrong)."""
    from decoupleq._io_schema import META_DIGEST_KEY, tensor_digest, text_digest

    if sign:
        meta["checksums"] = {k: tensor_digest(t) for k, t in tensors.items()}
    text = json.dumps(meta, sort_keys=True)
    save_file(tensors, path, metadata={"decoupleq": text, META_DIGEST_KEY: text_digest(text) if sign else old_digest})


L0 = "model.layers.0"
DOWN = f"{L0}.mlp.down_proj"  # in_features 80: one lane-word per row at 2 bits, two at 4
UP = f"{L0}.mlp.up_proj"


def _set_word(packed, row, col, value):
    """A copy of uint32 ``packed`` with one word OR-ed with ``value`` (in 32 columns at 2 bits,
    only bits 0-7 of each word hold codes)."""
    a = packed.numpy().copy()
    a[row, col] |= value
    return torch.from_numpy(a)


def cases():
    """{file name: (edit(meta, tensors) -> optional raw bytes, sign, regex of the error)}."""
    def layer(name):
        return lambda m, t: m["layers"][name]

    def hf(key, value):
        def edit(m, t):
            m["model"]["hf_config"][key] = value
        return edit

    c = {}
    c["missing_tensor"] = (lambda m, t: t.pop(f"{UP}.scale"), True, r"up_proj\.scale.*is missing")
    c["extra_tensor"] = (lambda m, t: t.update({f"{L0}.extra.weight": torch.zeros(3)}), True,
                         r"does not match the model.*unexpected \['model\.layers\.0\.extra\.weight'\]")
    c["misshaped_norm"] = (lambda m, t: t.update({f"{L0}.input_layernorm.weight": torch.ones(33)}), True,
                           r"input_layernorm\.weight.*shape \(33,\).*\(32,\)")
    c["packed_as_int32"] = (lambda m, t: t.update({f"{UP}.packed": t[f"{UP}.packed"].view(torch.int32)}), True,
                            r"up_proj\.packed.*dtype I32.*needs U32")
    c["scale_as_float16"] = (lambda m, t: t.update({f"{UP}.scale": t[f"{UP}.scale"].half()}), True,
                             r"up_proj\.scale.*dtype F16.*needs F32")
    c["norm_as_int"] = (lambda m, t: t.update({f"{L0}.input_layernorm.weight": torch.ones(32, dtype=torch.int32)}),
                        True, r"input_layernorm\.weight.*dtype I32.*needs F32")
    c["layer_without_type"] = (lambda m, t: layer(UP)(m, t).pop("type"), True, r"up_proj.*'type' must be")
    c["bits_as_string"] = (lambda m, t: layer(UP)(m, t).update(bits="2"), True, r"up_proj.*'bits' must be an integer")
    c["symmetric_as_string"] = (lambda m, t: layer(UP)(m, t).update(symmetric="false"), True,
                                r"up_proj.*'symmetric' must be true or false")
    c["group_size_zero"] = (lambda m, t: layer(UP)(m, t).update(group_size=0), True, r"up_proj.*'group_size'")
    c["bias_dtype_attribute"] = (lambda m, t: layer(UP)(m, t).update(bias=True, bias_dtype="load"), True,
                                 r"up_proj.*'bias_dtype' must be one of")
    c["bits_changed_unsigned"] = (lambda m, t: layer(UP)(m, t).update(bits=4), False,
                                  r"metadata does not match its checksum")
    c["bits_changed_signed"] = (lambda m, t: layer(DOWN)(m, t).update(bits=4), True,
                                r"down_proj\.packed.*\(32, 8\).*needs \(32, 16\)")
    c["codes_storage_vs_bits"] = (lambda m, t: layer(UP)(m, t).update(bits=6), True, r"up_proj.*6-bit codes stored as")
    c["layer_not_in_model"] = (
        lambda m, t: (m["layers"].update({f"{L0}.mlp.ghost": m["layers"][UP]}),
                      t.update({f"{L0}.mlp.ghost.{k}": t[f"{UP}.{k}"].clone() for k in ("packed", "scale", "zero")})),
        True, r"ghost.*not a module of the model")
    c["odd_layer_name"] = (lambda m, t: m["layers"].update({"model..x": m["layers"][UP]}), True,
                           r"'model\.\.x' is not a dotted")
    c["alias_to_nothing"] = (lambda m, t: m["aliases"].update({"lm_head.weight": "model.nothing"}), True,
                             r"alias 'lm_head\.weight' points to missing tensor")
    c["alias_into_layer"] = (lambda m, t: m["aliases"].update({"lm_head.weight": f"{UP}.scale"}), True,
                             r"alias 'lm_head\.weight' -> 'model\.layers\.0\.mlp\.up_proj\.scale' involves a quantized")
    c["nan_scale"] = (lambda m, t: t[f"{UP}.scale"].__setitem__((3, 1), float("nan")), True, r"up_proj.*scale holds NaN")
    c["packed_padding_bits"] = (lambda m, t: t.update({f"{UP}.packed": _set_word(t[f"{UP}.packed"], 0, 7, 0xFFFF0000)}),
                                True,
                                r"up_proj.*bits set outside 2-bit fields")
    c["tensor_bit_flipped"] = (None, False, r"model\.embed_tokens\.weight.*does not match its checksum")
    c["digest_missing"] = (None, False, r"metadata does not match its checksum")
    c["checksums_missing"] = (lambda m, t: m.pop("checksums"), None, r"'checksums' is missing")
    c["future_version"] = (lambda m, t: m.update(format_version=99), True, r"format_version 99")
    c["deep_nesting"] = (lambda m, t: m["model"]["hf_config"].update(x=None), "deep", r"nested too deeply")
    c["vocab_2_pow_33"] = (hf("vocab_size", 2**33), True, r"vocab_size = 8589934592 exceeds every tensor dimension")
    c["layers_100000"] = (hf("num_hidden_layers", 100000), True,
                          r"num_hidden_layers = 100000 but the file's tensors hold at most 1")
    c["layers_100000_with_bait"] = (
        lambda m, t: (hf("num_hidden_layers", 100000)(m, t), t.update({"model.layers.99999.bait": torch.zeros(1)})),
        True, r"num_hidden_layers = 100000 but the file's tensors hold at most 2")
    c["hidden_size_lie"] = (hf("hidden_size", 16), True, r"down_proj.*file has \(out, in\) = \(32, 80\) but the model has \(16, 80\)")
    c["class_not_allowed"] = (lambda m, t: m["model"].update({"class": "Trainer"}), True,
                              r"model class 'Trainer' is not one of transformers' model classes")
    c["config_class_swapped"] = (lambda m, t: m["model"].update(hf_config_class="BertConfig"), True,
                                 r"hf_config_class 'BertConfig' is not LlamaConfig")
    c["model_type_unknown"] = (hf("model_type", "evil"), True, r"model_type 'evil' is not a model type")
    c["attn_hub_kernel"] = (lambda m, t: m["model"].update(attn_implementation="kernels-community/flash-attn"), True,
                            r"attn_implementation 'kernels-community/flash-attn' is refused")
    c["attn_in_config"] = (hf("_attn_implementation", "kernels-community/flash-attn"), True,
                           r"_attn_implementation = 'kernels-community/flash-attn' is refused")
    c["auto_map"] = (hf("auto_map", {"AutoModelForCausalLM": "evil--modeling.Evil"}), True,
                     r"auto_map selects code to run")
    c["trust_remote_code"] = (hf("trust_remote_code", True), True, r"trust_remote_code selects code to run")
    c["use_kernels"] = (hf("use_kernels", True), True, r"use_kernels selects code to run")
    c["kernel_config"] = (hf("kernel_config", {"RMSNorm": "kernels-community/liger_kernels:LigerRMSNorm"}), True,
                          r"kernel_config selects code to run")
    c["quantization_config"] = (hf("quantization_config", {"quant_method": "bitsandbytes"}), True,
                                r"quantization_config selects code to run")
    c["class_of_other_type"] = (lambda m, t: m["model"].update({"class": "BertModel"}), True,
                                r"model class 'BertModel' is not one of transformers' model classes for 'llama'")
    c["layers_not_object"] = (lambda m, t: m.update(layers=list(m["layers"])), True,
                              r"metadata field 'layers' is missing or not an object")
    c["truncated"] = (None, False, r"truncated or corrupt")
    c["metadata_not_json"] = (None, False, r"not valid JSON")
    return c


def make(out: str = OUT) -> dict:
    os.makedirs(out, exist_ok=True)
    good = os.path.join(out, "_good.tmp")
    good_file(good)
    manifest = {}
    for name, (edit, sign, regex) in cases().items():
        meta, tensors, raw = read(good)
        path = os.path.join(out, f"{name}.safetensors")
        if name == "tensor_bit_flipped":
            data = bytearray(open(good, "rb").read())
            # A bit in the first stored tensor's bytes (the embedding, stored first by name order).
            hlen = int.from_bytes(data[:8], "little")
            with safe_open(good, framework="pt") as f:
                first = min(f.keys())
            assert first == "model.embed_tokens.weight", first
            data[8 + hlen + 5] ^= 0x10
            open(path, "wb").write(bytes(data))
        elif name == "digest_missing":
            save_file(tensors, path, metadata={"decoupleq": raw["decoupleq"]})
        elif name == "truncated":
            data = open(good, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
        elif name == "metadata_not_json":
            save_file(tensors, path, metadata={"decoupleq": raw["decoupleq"][:-7]})
        elif sign == "deep":
            edit(meta, tensors)
            write(path, meta, tensors)
            # Replace the placeholder by a list nested 5000 deep, then sign the text as it is.
            from decoupleq._io_schema import META_DIGEST_KEY, text_digest

            text = json.dumps(meta, sort_keys=True).replace('"x": null', '"x": ' + "[" * 5000 + "]" * 5000)
            save_file(tensors, path, metadata={"decoupleq": text, META_DIGEST_KEY: text_digest(text)})
        elif sign is None:  # a version-3 document without checksums, its digest right
            from decoupleq._io_schema import META_DIGEST_KEY, text_digest

            edit(meta, tensors)
            text = json.dumps(meta, sort_keys=True)
            save_file(tensors, path, metadata={"decoupleq": text, META_DIGEST_KEY: text_digest(text)})
        else:
            edit(meta, tensors)
            write(path, meta, tensors, sign=sign, old_digest=raw.get("decoupleq_sha256"))
        manifest[f"{name}.safetensors"] = regex
    os.unlink(good)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


if __name__ == "__main__":
    m = make(sys.argv[1] if len(sys.argv) > 1 else OUT)
    print(f"wrote {len(m)} files")
