# %% [markdown]
# # decoupleq: a short tour
#
# A notebook-style tour (run it top to bottom with `python examples/walkthrough.py`, or cell
# by cell in an editor that understands `# %%`). It quantizes SmolLM2-135M with no dataset at
# all, looks inside a quantized layer, saves and reloads the model, and measures what was
# lost. Everything runs on a CPU; the settings are small so the whole tour takes minutes.

# %%
import logging
import tempfile
from pathlib import Path

import torch

import decoupleq
from decoupleq.data import calibration_data, find_data_dir
from decoupleq.evaluate import compare_logits, perplexity
from decoupleq.zoo import list_models, load_model

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
print("packaged models:", list_models())

# %% [markdown]
# ## 1. Load a model
# `load_model` takes a packaged name, a Hugging Face folder or a GGUF file. SmolLM2 ships as a
# 4-bit GGUF; it is dequantized to float32 once and cached as a normal HF folder.

# %%
lm = load_model("smollm2-135m")
model, tokenizer = lm
reference = load_model("smollm2-135m").model  # an untouched copy to compare with later
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
print("note:", lm.note)

# %% [markdown]
# ## 2. Calibration data without a dataset
# `"self"` samples text from the full-precision model itself. Any text file, list of strings
# or token ids works too. Here: 8 sequences of 128 tokens, to keep the tour quick (the
# defaults are 32 x 256).

# %%
calib = calibration_data("self", model=model, tokenizer=tokenizer, num_samples=8, seq_len=128, seed=0)
print(calib.shape)
print(repr(tokenizer.decode(calib[0, :40])))

# %% [markdown]
# ## 3. Quantize
# One config dataclass, one verb, in place. 4 bits in groups of 128 with GPTQ is the cheap,
# robust end of the spectrum; `examples/quantize_smollm2.py` does the 2-bit decoupleQ run.

# %%
config = decoupleq.ModelQuantConfig(quant=decoupleq.QuantConfig(method="gptq", bits=4, group_size=64),
                                    blockwise=False)
decoupleq.quantize(model, calib, config)
report = model.decoupleq_report
print(f"{len(report.layers)} layers in {report.seconds:.0f} s")
worst = max(report.layers, key=lambda r: r.rel_loss)
print(f"worst layer: {worst.name}, relative loss {worst.rel_loss:.4f}")

# %% [markdown]
# ## 4. Inside a quantized layer
# Each linear layer became a `QuantLinear`: codes in the signed 4-bit range, packed into 32-bit
# words (`layer.codes` unpacks them to int8), and one float
# scale and zero per output row and group of 64 inputs. The weight it computes with is
# `codes * scale + zero`.

# %%
layer = model.model.layers[0].mlp.down_proj
print(layer)
print("codes", tuple(layer.codes.shape), layer.codes.dtype, int(layer.codes.min()), "..", int(layer.codes.max()))
print("scale", tuple(layer.scale.shape), "zero", tuple(layer.zero.shape))
W_hat = layer.codes.reshape(layer.codes.shape[0], -1, 64).float() * layer.scale[..., None] + layer.zero[..., None]
W_fp = reference.model.layers[0].mlp.down_proj.weight
print("relative weight error:", float((W_hat.reshape(W_fp.shape) - W_fp).norm() / W_fp.norm()))

# %% [markdown]
# ## 5. What did it cost?
# Perplexity on the start of WikiText-2 test (when the shared data is there), and the
# agreement of next-token predictions with the full-precision model, on a small fixed budget
# that is printed next to each number.

# %%
data = find_data_dir(Path(__file__).resolve().parents[1] if "__file__" in globals() else None)
if data is not None:
    test = data / "wikitext-2" / "test.txt"
    print("full precision:", perplexity(reference, test, tokenizer, max_windows=4))
    print("quantized:     ", perplexity(model, test, tokenizer, max_windows=4))
    print("fidelity:      ", compare_logits(model, reference, test, tokenizer, max_windows=4))
else:
    print("no WikiText-2 here (set DECOUPLEQ_DATA); comparing on self-generated text instead")
    print("fidelity:", compare_logits(model, reference, calib.flatten(), seq_len=128, max_windows=4))

# %% [markdown]
# ## 6. Save, reload, use
# One safetensors file with the codes, float parts and the model's config; `decoupleq.load`
# rebuilds the model without the original weights.

# %%
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.safetensors"
    decoupleq.save(model, path)
    print(f"saved {path.stat().st_size / 1e6:.0f} MB")
    again = decoupleq.load(path)
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    out = again.generate(ids, max_new_tokens=12, do_sample=False)
print(repr(tokenizer.decode(out[0])))
