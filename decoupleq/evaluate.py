"""How good is a quantized model: perplexity, agreement with the full-precision model, embeddings.

Every measurement runs on a fixed token budget by default so that numbers are cheap and
comparable between runs: the first ``max_windows=64`` non-overlapping windows of
``seq_len=512`` tokens (32,768 tokens). ``full=True`` uses every whole window of the text.
Every result carries its budget and prints it next to the number, because a perplexity
measured on 32k tokens is not the perplexity of the whole split.

Perplexity follows ALGORITHM 4.2: the text is tokenized as one stream, cut into
non-overlapping windows (the tail shorter than a window is dropped), each window is scored
on its own (no context carried over), and ``ppl = exp(mean over windows of the window's mean
next-token cross-entropy)``. Windows are equally long, so this is also the exp of the mean
over all predicted tokens.

BOS (``bos=``, default ``"auto"``): a model whose tokenizer starts every input with a
beginning-of-sequence token (Llama 2, Gemma: ``tokenizer("x")`` begins with ``bos_token_id``)
was trained to always see one, and without it the first positions of a window are out of
distribution (Gemma's perplexity is then far from meaningful). So each window is that BOS
followed by ``seq_len - 1`` tokens of the stream (tokenized without special tokens), and
every one of those ``seq_len - 1`` tokens is predicted, the first from the BOS alone.
``bos=False`` is the older layout that published GPTQ-style figures use: the stream as the
tokenizer encodes it (one BOS at the very start, if any) cut into windows of ``seq_len``
tokens, whose first token is context only. Both predict ``seq_len - 1`` tokens per window;
windows start at different places, so the numbers differ for BOS-adding tokenizers and are
identical for the others (GPT-2, SmolLM2), for which ``"auto"`` adds nothing.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_WINDOWS = 64
DEFAULT_MAX_SENTENCES = 256


@dataclass(frozen=True)
class Budget:
    """What a number was measured on.

    Attributes:
        windows: windows scored.
        seq_len: tokens per window.
        available: whole windows the text holds.
    """

    windows: int
    seq_len: int
    available: int
    bos: bool = False

    @property
    def tokens(self) -> int:
        return self.windows * self.seq_len

    @property
    def full(self) -> bool:
        return self.windows == self.available

    def __str__(self):
        what = f"{self.windows} x {self.seq_len} tokens" + (", BOS each" if self.bos else "")
        if self.full:
            return f"{what}, whole text"
        return f"{what}, first {self.windows} of {self.available} windows"


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``, with ``nll`` the mean next-token cross-entropy in nats."""

    ppl: float
    nll: float
    budget: Budget

    def __str__(self):
        return f"ppl {self.ppl:.3f} [{self.budget}]"

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, **_budget_dict(self.budget)}


@dataclass(frozen=True)
class FidelityResult:
    """Agreement of a model's next-token distributions with a reference model's.

    Attributes:
        kl: mean over positions of KL(reference || model), nats per token.
        top1: fraction of positions where both models' most likely next token is the same.
    """

    kl: float
    top1: float
    budget: Budget

    def __str__(self):
        return f"KL {self.kl:.4f} nats/token, top-1 agreement {100 * self.top1:.2f}% [{self.budget}]"

    def to_dict(self) -> dict:
        return {"kl": self.kl, "top1": self.top1, **_budget_dict(self.budget)}


@dataclass(frozen=True)
class EmbeddingResult:
    """Cosine similarity between a model's sentence embeddings and a reference model's."""

    cosine_mean: float
    cosine_min: float
    sentences: int

    def __str__(self):
        return f"embedding cosine mean {self.cosine_mean:.4f}, min {self.cosine_min:.4f} [{self.sentences} sentences]"

    def to_dict(self) -> dict:
        return asdict(self)


def _budget_dict(b: Budget) -> dict:
    return {"windows": b.windows, "seq_len": b.seq_len, "tokens": b.tokens, "available_windows": b.available,
            "full": b.full, "bos": b.bos}


def token_stream(data, tokenizer=None, *, special_tokens: bool = True):
    """The token ids to evaluate on, as a 1-D LongTensor.

    Args:
        data: a text (str), a text file (``os.PathLike``, or a str naming an existing file),
            or token ids (1-D tensor, array or list; used as they are).
        tokenizer: needed for text. The whole text is tokenized as one stream, with the
            tokenizer's usual special tokens (a BOS at the start for tokenizers that add one)
            unless ``special_tokens`` is False.
    """
    import numpy as np
    import torch

    if isinstance(data, str) and "\n" not in data and len(data) < 4096 and os.path.isfile(data):
        data = Path(data)
    if isinstance(data, os.PathLike):
        data = Path(data).read_text(encoding="utf-8", errors="replace")
    if isinstance(data, str):
        if tokenizer is None:
            raise ValueError("evaluating on text needs the model's tokenizer")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The backend encodes megabytes without the "longer than the model" warning.
        if backend is not None:
            ids = backend.encode(data, add_special_tokens=special_tokens).ids
        else:
            ids = tokenizer.encode(data, add_special_tokens=special_tokens)
        return torch.tensor(ids, dtype=torch.long)
    ids = torch.as_tensor(np.asarray(data) if isinstance(data, (list, tuple)) else data)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    return ids.long()


def eval_windows(ids, *, seq_len: int = DEFAULT_SEQ_LEN, max_windows: Optional[int] = DEFAULT_MAX_WINDOWS,
                 full: bool = False, bos_id: Optional[int] = None):
    """Non-overlapping windows from the start of a token stream.

    Args:
        ids: 1-D LongTensor (n,).
        seq_len: tokens per window (BOS included), >= 2.
        max_windows: keep at most this many (ignored when ``full``; None means all).
        full: keep every whole window.
        bos_id: when given, each window is ``[bos_id]`` + the next ``seq_len - 1`` tokens.

    Returns:
        (LongTensor (windows, seq_len), Budget).
    """
    import torch

    _int_at_least("seq_len", seq_len, 2)
    if max_windows is not None:
        _int_at_least("max_windows", max_windows, 1)
    body = seq_len - (bos_id is not None)
    available = ids.numel() // body
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len {seq_len}")
    n = available if (full or max_windows is None) else min(available, max_windows)
    windows = ids[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), int(bos_id), dtype=windows.dtype), windows], dim=1)
    return windows, Budget(windows=n, seq_len=seq_len, available=available, bos=bos_id is not None)


def window_bos(tokenizer, bos="auto") -> Optional[int]:
    """The token id each evaluation window starts with, or None for none.

    Args:
        tokenizer: the model's tokenizer, or None.
        bos: ``"auto"``: the tokenizer's ``bos_token_id`` when the tokenizer itself puts it
            in front of an ordinary input (``tokenizer.encode("a")[0] == bos_token_id``),
            else None; ``True``: ``bos_token_id`` (error if the tokenizer has none);
            ``False``: None (windows are plain slices of the stream).
    """
    if bos is False:
        return None
    if bos is not True and bos != "auto":
        raise ValueError(f"bos must be 'auto', True or False, got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is True:
        if bos_id is None:
            raise ValueError("bos=True needs a tokenizer with a bos_token_id")
        return int(bos_id)
    if bos_id is None:
        return None
    ids = tokenizer.encode("a")
    return int(bos_id) if len(ids) and ids[0] == bos_id else None


def _windows(data, tokenizer, seq_len, max_windows, full, bos):
    bos_id = window_bos(tokenizer, bos)
    ids = token_stream(data, tokenizer, special_tokens=bos_id is None)
    return eval_windows(ids, seq_len=seq_len, max_windows=max_windows, full=full, bos_id=bos_id)


def _logits(model, batch):
    out = model(input_ids=batch)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def perplexity(model, data, tokenizer=None, *, seq_len: int = DEFAULT_SEQ_LEN,
               max_windows: Optional[int] = DEFAULT_MAX_WINDOWS, full: bool = False,
               batch_size: int = 1, bos="auto") -> PerplexityResult:
    """Perplexity of a causal language model on a text (ALGORITHM 4.2).

    Args:
        model: returns ``logits`` (B, T, V) for ``input_ids`` (B, T).
        data: text, text file or token ids (see ``token_stream``).
        tokenizer: for text.
        seq_len: window length in tokens (default 512).
        max_windows: the budget (default 64 windows); ``full=True`` scores every whole window.
        batch_size: windows per forward pass (memory: ``batch_size * seq_len * vocab`` floats).
        bos: ``"auto"`` (default): each window starts with the BOS token when the tokenizer
            adds one; ``False``: the older plain slices of the stream (as published GPTQ-style
            figures); ``True``: always (see the module docstring and ``window_bos``).

    Returns:
        PerplexityResult; ``str()`` gives the number with its budget.
    """
    import torch
    import torch.nn.functional as F

    _int_at_least("batch_size", batch_size, 1)
    windows, budget = _windows(data, tokenizer, seq_len, max_windows, full, bos)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                batch = windows[i:i + batch_size]
                logits = _logits(model, batch)[:, :-1]
                target = batch[:, 1:]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                # Sum of per-window means, in float64 so 600 windows add up exactly enough.
                total += ce.view(len(batch), -1).double().mean(dim=1).sum().item()
    finally:
        model.train(was_training)
    nll = total / len(windows)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, budget=budget)


def compare_logits(model, reference, data, tokenizer=None, *, seq_len: int = DEFAULT_SEQ_LEN,
                   max_windows: Optional[int] = DEFAULT_MAX_WINDOWS, full: bool = False,
                   bos="auto") -> FidelityResult:
    """KL divergence and top-1 agreement of ``model``'s next-token distributions with ``reference``'s.

    Every position of every window counts (the last one too: both models predict a next
    token there). KL(reference || model) is the expected extra code length, in nats, of
    coding the reference's predictions with the model's.

    Args:
        model: the model under test (e.g. quantized).
        reference: the full-precision model; same vocabulary.
        data, tokenizer, seq_len, max_windows, full, bos: as in ``perplexity``.

    Returns:
        FidelityResult.
    """
    import torch
    import torch.nn.functional as F

    windows, budget = _windows(data, tokenizer, seq_len, max_windows, full, bos)
    flags = (model.training, reference.training)
    model.eval()
    reference.eval()
    kl_sum = 0.0
    agree = 0
    count = 0
    try:
        with torch.no_grad():
            for w in windows:
                batch = w[None]
                lq = F.log_softmax(_logits(model, batch)[0], dim=-1)
                lp = F.log_softmax(_logits(reference, batch)[0], dim=-1)
                if lq.shape != lp.shape:
                    raise ValueError(f"model and reference disagree on the vocabulary: {tuple(lq.shape)} vs {tuple(lp.shape)}")
                kl_sum += (lp.exp() * (lp - lq)).sum(dim=-1).double().sum().item()
                agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
                count += lp.shape[0]
    finally:
        model.train(flags[0])
        reference.train(flags[1])
    return FidelityResult(kl=kl_sum / count, top1=agree / count, budget=budget)


def sentences_from_text(data, *, max_sentences: int = DEFAULT_MAX_SENTENCES, min_chars: int = 20) -> list:
    """The first ``max_sentences`` lines of a text (or text file) with at least ``min_chars``
    characters, stripped; WikiText section headings (`` = Title = ``) are left out."""
    if isinstance(data, os.PathLike) or (isinstance(data, str) and "\n" not in data and os.path.isfile(data)):
        data = Path(data).read_text(encoding="utf-8", errors="replace")
    _int_at_least("max_sentences", max_sentences, 1)
    out = []
    for line in data.splitlines():
        s = line.strip()
        if len(s) < min_chars or (s.startswith("=") and s.endswith("=")):
            continue
        out.append(s)
        if len(out) == max_sentences:
            break
    if not out:
        raise ValueError(f"the text has no line of at least {min_chars} characters")
    return out


def embedding_similarity(model, reference, tokenizer, sentences, *, max_length: int = 256,
                         batch_size: int = 32) -> EmbeddingResult:
    """Cosine similarity of an encoder's sentence embeddings with a reference encoder's.

    Embeddings are mean-pooled over the attention mask and L2-normalized (``zoo.embed``).

    Args:
        model, reference: encoders returning ``last_hidden_state``.
        tokenizer: shared tokenizer.
        sentences: list of str (see ``sentences_from_text``).

    Returns:
        EmbeddingResult with the mean and the minimum over sentences.
    """
    from .zoo import embed

    a = embed(model, tokenizer, sentences, max_length=max_length, batch_size=batch_size)
    b = embed(reference, tokenizer, sentences, max_length=max_length, batch_size=batch_size)
    cos = (a * b).sum(dim=-1).double()
    return EmbeddingResult(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(), sentences=len(sentences))


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
