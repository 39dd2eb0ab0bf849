"""GGUF files of architectures outside zoo's own table: converted once through transformers'
GGUF loader, cached as a float Hugging Face folder, read from the cache afterwards."""
import os
from pathlib import Path

import pytest
import torch
import transformers

from decoupleq import zoo
from decoupleq.evaluate import perplexity, window_bos
from gguf_helpers import tiny_gemma3, write_gemma3_gguf
from zoo_helpers import read, train_tokenizer

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Gemma3ForCausalLM"),
                                reason=f"transformers {transformers.__version__} has no Gemma 3")


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    """(path of a float32 Gemma 3 GGUF, the model written into it)."""
    tok = train_tokenizer(read("tinyshakespeare/input.txt", limit=50_000), vocab_size=270)
    model = tiny_gemma3(len(tok), seed=3)
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_gemma3_gguf(path, model, tok)
    return path, model


def _spoil_keeping_size_and_mtime(path):
    """Overwrite the file with zeros of the same size and give it back its mtime: the cache key
    (path, size, mtime) still matches, but any attempt to parse it fails."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_converted_once_then_served_from_the_cache(gemma_gguf, tmp_path):
    path, source = gemma_gguf
    work = tmp_path / path.name
    work.write_bytes(path.read_bytes())
    cache = tmp_path / "cache"
    env = dict(os.environ)

    first = zoo.load_model(work, cache_dir=cache)
    assert type(first.model).__name__ == "Gemma3ForCausalLM" and first.kind == zoo.CAUSAL_LM
    entry = first.extra["cached_at"]
    assert os.path.isfile(os.path.join(entry, "model.safetensors"))
    assert os.path.isfile(os.path.join(entry, "config.json"))

    # The cached weights are exactly what transformers' own GGUF loader makes of the file,
    # and (up to the float32 rounding of llama.cpp's "1 + w" norm storage) the model written.
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(work.parent), gguf_file=work.name).eval()
    got = first.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got[k]), k
    for k, v in source.state_dict().items():
        assert torch.allclose(v, got[k], rtol=0, atol=1e-6), k
    ids = torch.tensor([[0, 5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, ref(ids).logits)

    # A second load never parses the GGUF again: the file is now unreadable, yet it loads.
    _spoil_keeping_size_and_mtime(work)
    with pytest.raises(Exception):
        zoo.load_model(work, cache=False)  # proof that parsing the spoiled file fails
    second = zoo.load_model(work, cache_dir=cache)
    assert second.extra["cached_at"] == entry
    assert all(torch.equal(v, got[k]) for k, v in second.model.state_dict().items())
    assert dict(os.environ) == env


def test_gemma_windows_start_with_bos(gemma_gguf, tmp_path):
    # The GGUF says add_bos_token: evaluation windows get that BOS, and bos=False gives the
    # older plain slices of the stream (different windows, so a different number).
    path, _ = gemma_gguf
    lm = zoo.load_model(path, cache_dir=tmp_path)
    bos = lm.tokenizer.bos_token_id
    assert window_bos(lm.tokenizer) == bos is not None
    text = read("tinyshakespeare/input.txt", limit=20_000)
    with_bos = perplexity(lm.model, text, lm.tokenizer, seq_len=64, max_windows=4)
    plain = perplexity(lm.model, text, lm.tokenizer, seq_len=64, max_windows=4, bos=False)
    assert with_bos.budget.bos and not plain.budget.bos
    assert with_bos.ppl != plain.ppl


def test_one_cache_entry_per_file_contents(gemma_gguf, tmp_path):
    # The same GGUF at two paths (as when each virtual environment installs its own copy of a
    # packaged model) is converted once: the cache entry is named by the file's contents.
    path, _ = gemma_gguf
    cache = tmp_path / "cache"
    first_copy, second_copy = tmp_path / "a" / path.name, tmp_path / "b" / path.name
    for copy in (first_copy, second_copy):
        copy.parent.mkdir()
        copy.write_bytes(path.read_bytes())
    first = zoo.load_model(first_copy, cache_dir=cache)
    second = zoo.load_model(second_copy, cache_dir=cache)
    assert second.extra["cached_at"] == first.extra["cached_at"]
    entries = [p for p in (cache / "gguf").iterdir() if (p / "config.json").is_file()]
    assert entries == [Path(first.extra["cached_at"])]
    # Other contents get their own entry.
    with open(second_copy, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert zoo._gguf_cache_entry(second_copy, cache) != Path(first.extra["cached_at"])
