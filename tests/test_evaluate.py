"""Perplexity, logit fidelity and embedding agreement, checked against direct torch computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from decoupleq import evaluate
from zoo_helpers import read, text_slice, tiny_bert, tiny_llama, train_tokenizer

VOCAB = 53


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (131,), generator=torch.Generator().manual_seed(7))


def _direct_ppl(model, ids, seq_len, n):
    """ALGORITHM 4.2 written out: exp of the mean over windows of each window's mean CE."""
    ces = []
    with torch.no_grad():
        for k in range(n):
            w = ids[k * seq_len:(k + 1) * seq_len]
            logits = model(input_ids=w[None]).logits[0]
            ces.append(F.cross_entropy(logits[:-1], w[1:]).item())
    return math.exp(sum(ces) / n)


@pytest.mark.parametrize("seq_len,max_windows,expect_windows", [(16, None, 8), (16, 3, 3), (33, 64, 3), (131, 1, 1)])
def test_perplexity_matches_direct_cross_entropy(llama, stream, seq_len, max_windows, expect_windows):
    r = evaluate.perplexity(llama, stream, seq_len=seq_len, max_windows=max_windows)
    assert r.budget.windows == expect_windows
    assert r.budget.available == len(stream) // seq_len
    assert r.ppl == pytest.approx(_direct_ppl(llama, stream, seq_len, expect_windows), rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)


def test_perplexity_batching_and_full(llama, stream):
    a = evaluate.perplexity(llama, stream, seq_len=16, max_windows=2, full=True)
    b = evaluate.perplexity(llama, stream, seq_len=16, max_windows=None, batch_size=3)
    assert a.budget.windows == b.budget.windows == 8 and a.budget.full
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)


class UniformLM(torch.nn.Module):
    """A real (if useless) language model: every next token equally likely."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return (torch.zeros(*input_ids.shape, self.vocab),)


def test_uniform_model_has_perplexity_vocab():
    r = evaluate.perplexity(UniformLM(29), torch.arange(100) % 29, seq_len=10)
    assert r.ppl == pytest.approx(29.0, rel=1e-6)


def test_budget_is_printed_next_to_the_number(llama, stream):
    r = evaluate.perplexity(llama, stream, seq_len=16, max_windows=3)
    text = str(r)
    assert f"{r.ppl:.3f}" in text and "3 x 16 tokens" in text and "first 3 of 8 windows" in text
    full = evaluate.perplexity(llama, stream, seq_len=16, full=True)
    assert "whole text" in str(full)
    d = r.to_dict()
    assert d["tokens"] == 48 and d["windows"] == 3 and d["full"] is False


def test_compare_logits_against_direct_kl(llama, stream):
    other = tiny_llama(vocab_size=VOCAB, seed=1)
    same = evaluate.compare_logits(llama, llama, stream, seq_len=16, max_windows=2)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1 == 1.0
    r = evaluate.compare_logits(other, llama, stream, seq_len=16, max_windows=2)
    with torch.no_grad():
        w = stream[:32].view(2, 16)
        lp = F.log_softmax(llama(input_ids=w).logits, -1)
        lq = F.log_softmax(other(input_ids=w).logits, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="sum").item() / 32
    top1 = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    assert r.kl == pytest.approx(kl, rel=1e-5) and r.kl > 0
    assert r.top1 == pytest.approx(top1)
    assert "2 x 16 tokens" in str(r)


def test_perplexity_on_real_text(tmp_path):
    text = read("wikitext-2/valid.txt", limit=120_000)
    tok = train_tokenizer(text, vocab_size=280)
    model = tiny_llama(vocab_size=len(tok), seed=3)
    path = text_slice("wikitext-2/test.txt", tmp_path / "test.txt", chars=60_000)
    by_path = evaluate.perplexity(model, path, tok, seq_len=64, max_windows=4)
    by_str_path = evaluate.perplexity(model, str(path), tok, seq_len=64, max_windows=4)
    ids = evaluate.token_stream(path.read_text(encoding="utf-8"), tok)
    assert by_path.ppl == pytest.approx(_direct_ppl(model, ids, 64, 4), rel=1e-6)
    assert by_str_path.ppl == by_path.ppl
    # An untrained model is near-uniform: perplexity close to the vocabulary size.
    assert 0.5 * len(tok) < by_path.ppl < 2 * len(tok)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(seq_len=1), ValueError, "seq_len"),
    (dict(seq_len=200), ValueError, "fewer than one window"),
    (dict(max_windows=0), ValueError, "max_windows"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_bad_arguments(llama, stream, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        evaluate.perplexity(llama, stream, **kwargs)


def test_bad_data(llama):
    with pytest.raises(TypeError, match="integers"):
        evaluate.perplexity(llama, torch.rand(40), seq_len=8)
    with pytest.raises(ValueError, match="1-D"):
        evaluate.perplexity(llama, torch.zeros(4, 8, dtype=torch.long), seq_len=8)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate.perplexity(llama, "some words", seq_len=8)


def test_sentences_skip_headings_and_short_lines():
    text = " = Title = \n\nshort\n A long enough sentence about nothing . \n = = Sub = = \n Another sentence of length . \n"
    assert evaluate.sentences_from_text(text, min_chars=10) == [
        "A long enough sentence about nothing .", "Another sentence of length ."]
    assert len(evaluate.sentences_from_text(read("wikitext-2/test.txt", limit=50_000), max_sentences=7)) == 7
    with pytest.raises(ValueError, match="no line"):
        evaluate.sentences_from_text("tiny\n")


def test_embedding_similarity():
    text = read("wikitext-2/valid.txt", limit=60_000)
    tok = train_tokenizer(text, vocab_size=260, encoder=True)
    sentences = evaluate.sentences_from_text(text, max_sentences=9)
    bert = tiny_bert(len(tok), seed=0)
    same = evaluate.embedding_similarity(bert, bert, tok, sentences, max_length=48, batch_size=4)
    assert same.cosine_mean == pytest.approx(1.0, abs=1e-6) and same.sentences == 9
    noisy = tiny_bert(len(tok), seed=0)
    with torch.no_grad():
        for p in noisy.encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    r = evaluate.embedding_similarity(noisy, bert, tok, sentences, max_length=48)
    assert r.cosine_min <= r.cosine_mean < 1.0
    # Direct: mean-pool over the mask, normalise, dot.
    batch = tok(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        def pooled(m):
            h = m(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        cos = (pooled(noisy) * pooled(bert)).sum(-1)
    assert r.cosine_mean == pytest.approx(cos.mean().item(), abs=1e-5)
    assert "9 sentences" in str(r)


# ---------------------------------------------------------------------------
# A BOS at the start of every window, for tokenizers that add one
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_pair():
    """(tokenizer that adds no BOS, one that puts BOS in front of every input), same vocabulary."""
    from tokenizers import processors

    text = read("wikitext-2/valid.txt", limit=30_000)
    plain, adds = train_tokenizer(text, vocab_size=200), train_tokenizer(text, vocab_size=200)
    bos = adds.bos_token_id
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{adds.bos_token} $A", special_tokens=[(adds.bos_token, bos)])
    assert adds.encode("a")[0] == bos and plain.encode("a")[0] != bos
    return plain, adds


def test_window_bos_follows_what_the_tokenizer_adds(bos_pair):
    plain, adds = bos_pair
    assert evaluate.window_bos(adds) == adds.bos_token_id
    assert evaluate.window_bos(plain) is None
    assert evaluate.window_bos(adds, False) is None
    assert evaluate.window_bos(plain, True) == plain.bos_token_id
    assert evaluate.window_bos(None) is None
    with pytest.raises(ValueError, match="bos_token_id"):
        evaluate.window_bos(None, True)
    with pytest.raises(ValueError, match="bos must be"):
        evaluate.window_bos(adds, "yes")


def test_bos_windows_score_every_text_token_after_a_bos(bos_pair):
    plain, adds = bos_pair
    text = read("wikitext-2/test.txt", limit=8_000)
    model = tiny_llama(vocab_size=len(adds), seed=3)
    seq_len, n = 24, 5
    r = evaluate.perplexity(model, text, adds, seq_len=seq_len, max_windows=n)
    assert r.budget.bos and r.budget.windows == n and "BOS each" in str(r) and r.to_dict()["bos"] is True
    # Written out: the stream without special tokens, in runs of seq_len - 1, each after a BOS.
    body = torch.tensor(adds(text, add_special_tokens=False).input_ids)
    assert r.budget.available == len(body) // (seq_len - 1)
    ces = []
    with torch.no_grad():
        for k in range(n):
            w = torch.cat([torch.tensor([adds.bos_token_id]), body[k * (seq_len - 1):(k + 1) * (seq_len - 1)]])
            logits = model(input_ids=w[None]).logits[0]
            ces.append(F.cross_entropy(logits[:-1], w[1:]).item())
    assert r.ppl == pytest.approx(math.exp(sum(ces) / n), rel=1e-6)

    # bos=False: the older layout, the tokenizer's stream (its one BOS first) cut every seq_len.
    old = evaluate.perplexity(model, text, adds, seq_len=seq_len, max_windows=n, bos=False)
    stream = torch.tensor(adds(text).input_ids)
    assert stream[0] == adds.bos_token_id and not old.budget.bos
    assert old.ppl == pytest.approx(_direct_ppl(model, stream, seq_len, n), rel=1e-6)
    f = evaluate.compare_logits(model, model, text, adds, seq_len=seq_len, max_windows=n)
    assert f.budget.bos and f.kl == pytest.approx(0.0, abs=1e-7) and f.top1 == 1.0

    # A tokenizer that adds no BOS: "auto" changes nothing.
    a = evaluate.perplexity(model, text, plain, seq_len=seq_len, max_windows=n)
    b = evaluate.perplexity(model, text, plain, seq_len=seq_len, max_windows=n, bos=False)
    assert not a.budget.bos and a.ppl == b.ppl
