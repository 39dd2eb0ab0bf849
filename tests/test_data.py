"""Calibration data: windows of real text, token ids, and sequences sampled from a model."""
import importlib.util

import numpy as np
import pytest
import torch

from decoupleq import data
from zoo_helpers import read, text_slice, tiny_llama, train_tokenizer


@pytest.fixture(scope="module")
def shakespeare():
    return read("tinyshakespeare/input.txt", limit=200_000)


@pytest.fixture(scope="module")
def tok(shakespeare):
    return train_tokenizer(shakespeare)


@pytest.fixture(scope="module")
def enc_tok(shakespeare):
    return train_tokenizer(shakespeare, encoder=True)


def _is_slice(window, stream):
    """True when ``window`` occurs as a contiguous run of ``stream``."""
    runs = stream.unfold(0, len(window), 1)
    return bool((runs == window).all(dim=1).any())


@pytest.mark.parametrize("num_samples,seq_len", [(1, 1), (7, 31), (33, 127)])
def test_random_windows_are_contiguous_slices(num_samples, seq_len):
    ids = torch.arange(1000)
    w = data.random_windows(ids, num_samples=num_samples, seq_len=seq_len, seed=3)
    assert w.shape == (num_samples, seq_len) and w.dtype == torch.long
    # Slices of arange are runs of consecutive integers inside the stream.
    assert torch.equal(w - w[:, :1], torch.arange(seq_len).expand(num_samples, -1))
    assert int(w.min()) >= 0 and int(w.max()) <= 999


def test_random_windows_seeded():
    ids = torch.arange(5000)
    a = data.random_windows(ids, num_samples=8, seq_len=16, seed=1)
    b = data.random_windows(ids, num_samples=8, seq_len=16, seed=1)
    c = data.random_windows(ids, num_samples=8, seq_len=16, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_windows_exact_length_stream_and_wrap():
    ids = torch.arange(10, 20)
    w = data.random_windows(ids, num_samples=3, seq_len=12, prefix=[1], suffix=[2])
    # Ten body tokens fit only at offset 0.
    expect = torch.cat([torch.tensor([1]), ids, torch.tensor([2])])
    assert torch.equal(w, expect.expand(3, -1))


def test_text_file_windows_come_from_the_text(tok, tmp_path):
    path = text_slice("wikitext-2/valid.txt", tmp_path / "valid.txt", chars=100_000)
    w = data.calibration_data(path, tokenizer=tok, num_samples=5, seq_len=64, seed=0)
    assert w.shape == (5, 64)
    stream = data.tokenize(tok, data.read_text(path))
    for row in w:
        assert _is_slice(row, stream)
    # The same seed draws the same offsets from the same stream.
    assert torch.equal(w, data.random_windows(stream, num_samples=5, seq_len=64, seed=0))


def test_list_of_strings_joins_with_blank_lines(tok, shakespeare):
    parts = shakespeare[:20000].split("\n\n")[:40]
    a = data.calibration_data(parts, tokenizer=tok, num_samples=4, seq_len=32, seed=5)
    b = data.random_windows(data.tokenize(tok, "\n\n".join(parts)), num_samples=4, seq_len=32, seed=5)
    assert torch.equal(a, b)


def test_encoder_windows_wrapped_in_cls_sep(enc_tok, shakespeare):
    w = data.calibration_data([shakespeare[:30000]], tokenizer=enc_tok, num_samples=6, seq_len=20)
    assert (w[:, 0] == enc_tok.cls_token_id).all()
    assert (w[:, -1] == enc_tok.sep_token_id).all()
    inner = w[:, 1:-1]
    assert not (inner == enc_tok.cls_token_id).any()
    no_wrap = data.calibration_data([shakespeare[:30000]], tokenizer=enc_tok, num_samples=6, seq_len=20,
                                    special_tokens=False)
    assert not (no_wrap[:, 0] == enc_tok.cls_token_id).all()


def test_token_ids_sources():
    one_d = np.arange(300, dtype=np.int32)
    w = data.calibration_data(one_d, num_samples=4, seq_len=7, seed=0)
    assert w.shape == (4, 7) and w.dtype == torch.long
    two_d = torch.arange(12).view(3, 4)
    out = data.calibration_data(two_d, num_samples=99, seq_len=99)
    assert torch.equal(out, two_d)
    out[0, 0] = 100  # the caller's tensor is not shared
    assert int(two_d[0, 0]) == 0
    assert torch.equal(data.calibration_data([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 4]]))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(source=torch.arange(5), seq_len=6), ValueError, "5 tokens"),
    (dict(source=torch.arange(50), num_samples=0), ValueError, "num_samples"),
    (dict(source=torch.arange(50), seq_len=True), TypeError, "seq_len"),
    (dict(source=torch.rand(50)), TypeError, "integers"),
    (dict(source=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError, "1-D"),
    (dict(source="self"), ValueError, "needs the model"),
    (dict(source="/no/such/file.txt"), FileNotFoundError, "'self'"),
    (dict(source=3.5), TypeError, "unsupported"),
    (dict(source=torch.arange(50), seq_len=2, special_tokens=True), ValueError, None),
])
def test_bad_sources_are_named(kwargs, exc, words, enc_tok):
    if kwargs.get("special_tokens"):
        kwargs["tokenizer"] = enc_tok
    with pytest.raises(exc) as err:
        data.calibration_data(**kwargs)
    if words:
        assert words in str(err.value)


def test_text_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        data.calibration_data(["some text"])


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_without_datasets_names_the_install(tok):
    with pytest.raises(ImportError, match="pip install datasets"):
        data.calibration_data("hf:wikitext:wikitext-2-raw-v1:train", tokenizer=tok)


def test_hf_spec_is_checked_when_datasets_present(tok):
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="NAME"):
        data.calibration_data("hf:a:b:c:d", tokenizer=tok)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab_size=97, seed=1)


def test_self_generated_shape_range_seed(llama, tok):
    rng_before = torch.get_rng_state()
    a = data.calibration_data("self", model=llama, num_samples=5, seq_len=9, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert a.shape == (5, 9) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 97
    b = data.self_generated(llama, num_samples=5, seq_len=9, seed=4)
    assert torch.equal(a, b)
    c = data.self_generated(llama, num_samples=5, seq_len=9, seed=5)
    assert not torch.equal(a, c)


def test_self_generated_greedy_follows_the_model(llama):
    # top_k=1 makes sampling greedy: every next token must be the argmax of a full,
    # cache-free forward pass over the sequence so far.
    seqs = data.self_generated(llama, num_samples=3, seq_len=12, seed=0, top_k=1)
    with torch.no_grad():
        logits = llama(input_ids=seqs).logits
    assert torch.equal(logits[:, :-1].argmax(-1), seqs[:, 1:])


def test_self_generated_skips_special_first_tokens(tok):
    model = tiny_llama(vocab_size=len(tok), seed=2)
    seqs = data.self_generated(model, tok, num_samples=64, seq_len=2, seed=0)
    assert not torch.isin(seqs[:, 0], torch.tensor(tok.all_special_ids)).any()


def test_self_generated_rejects_bad_settings(llama):
    with pytest.raises(ValueError, match="temperature"):
        data.self_generated(llama, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        data.self_generated(llama, top_k=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        data.self_generated(torch.nn.Linear(2, 2))


def test_find_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DECOUPLEQ_DATA", str(tmp_path))
    assert data.find_data_dir() == tmp_path
    monkeypatch.setenv("DECOUPLEQ_DATA", str(tmp_path / "missing"))
    assert data.find_data_dir() is None
