"""Calibration data: token windows from text, token ids, a Hugging Face dataset, or the model itself.

Every source ends as a ``torch.LongTensor`` of shape ``(num_samples, seq_len)``, the form
``decoupleq.quantize`` takes.

Defaults are sized for a CPU: ``num_samples=32`` windows of ``seq_len=256`` tokens
(8,192 tokens). The reference scripts use 128 x 2048 tokens of C4 (ALGORITHM 4.2), 32 times
more; more tokens give a better Hessian estimate at a proportional cost in forward passes.

Sources (``calibration_data``):

- ``"self"``: sequences sampled from the full-precision model itself (the first token uniform
  over the ordinary vocabulary, then the model's own next-token distribution). This needs
  no dataset at all, which makes it the offline default. Causal language models only.
- a text file path, or a list of strings: the text is tokenized as one stream and
  ``num_samples`` windows start at seeded random offsets.
- token ids: 1-D (windows are drawn from it) or 2-D (already windows, returned as they are).
- ``"hf:NAME[:CONFIG[:SPLIT]]"``: a Hugging Face dataset (needs the ``datasets`` package and a
  reachable hub or a local cache); its ``text`` column is joined with blank lines.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 256
SELF = "self"


def find_data_dir(start=None) -> Optional[Path]:
    """The project's shared text folder, or None when it cannot be found.

    Looks at ``$DECOUPLEQ_DATA`` first, then ``../shared/data`` beside the current folder, the
    given ``start`` folder and the source checkout this module was imported from.
    """
    env = os.environ.get("DECOUPLEQ_DATA")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    roots = [Path.cwd(), Path(__file__).resolve().parents[1]]
    if start is not None:
        roots.insert(0, Path(start).resolve())
    for root in roots:
        for cand in (root / ".." / "shared" / "data", root / "shared" / "data"):
            if cand.is_dir():
                return cand.resolve()
    return None


def read_text(path) -> str:
    """The whole text file at ``path`` as str (UTF-8; undecodable bytes replaced)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def tokenize(tokenizer, text: str):
    """Token ids of ``text`` as one stream, without special tokens.

    Uses the fast backend directly when there is one: it is quicker on megabytes of text and
    does not warn that the stream is longer than the model's context.

    Returns:
        torch.LongTensor (n_tokens,).
    """
    import torch

    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def _special_wrap(tokenizer, special_tokens):
    """(prefix ids, suffix ids) every window is wrapped in."""
    if tokenizer is None:
        return [], []
    if special_tokens is None:
        # Encoders (BERT-likes) always see [CLS] ... [SEP]; causal LMs are calibrated on raw
        # slices of the token stream as in the reference scripts.
        special_tokens = (getattr(tokenizer, "cls_token_id", None) is not None
                          and getattr(tokenizer, "sep_token_id", None) is not None)
    if not special_tokens:
        return [], []
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        return ([bos] if bos is not None else []), []
    return [cls_id], [sep_id]


def random_windows(ids, *, num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                   seed: int = 0, prefix: Sequence[int] = (), suffix: Sequence[int] = ()):
    """``num_samples`` windows of a token stream, at seeded random offsets.

    Each window is ``prefix + ids[o : o + seq_len - len(prefix) - len(suffix)] + suffix`` with
    ``o`` uniform over the valid offsets (windows may overlap; the same seed gives the same
    windows).

    Args:
        ids: 1-D integer tensor or sequence, the token stream.
        num_samples: windows to draw, >= 1.
        seq_len: tokens per window including prefix and suffix.
        seed: seed of the offsets.
        prefix, suffix: token ids put around each window (e.g. [CLS] and [SEP]).

    Returns:
        torch.LongTensor (num_samples, seq_len).
    """
    import numpy as np
    import torch

    _positive_int("num_samples", num_samples)
    _positive_int("seq_len", seq_len)
    ids = torch.as_tensor(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room inside {len(prefix)}+{len(suffix)} special tokens")
    if ids.numel() < body:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {body}")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, ids.numel() - body + 1, size=num_samples)
    head = torch.tensor(list(prefix), dtype=torch.long)
    tail = torch.tensor(list(suffix), dtype=torch.long)
    rows = [torch.cat([head, ids[o:o + body].long(), tail]) for o in offsets.tolist()]
    return torch.stack(rows)


def from_text(text, tokenizer, *, num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
              seed: int = 0, special_tokens: Optional[bool] = None):
    """Random windows of a text (str) or of several texts (list of str, joined by blank lines).

    ``special_tokens`` wraps each window in the tokenizer's [CLS]/[SEP] (default: only for
    tokenizers that have both, i.e. encoders).

    Returns:
        torch.LongTensor (num_samples, seq_len).
    """
    if isinstance(text, (list, tuple)):
        if not all(isinstance(t, str) for t in text):
            raise TypeError("a list of texts must hold only str")
        text = "\n\n".join(text)
    if not isinstance(text, str):
        raise TypeError(f"text must be str or a list of str, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError("calibrating on text needs the model's tokenizer")
    prefix, suffix = _special_wrap(tokenizer, special_tokens)
    ids = tokenize(tokenizer, text)
    return random_windows(ids, num_samples=num_samples, seq_len=seq_len, seed=seed, prefix=prefix, suffix=suffix)


def from_hf_dataset(spec: str, tokenizer, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, column: str = "text",
                    special_tokens: Optional[bool] = None):
    """Random windows of a Hugging Face dataset, ``spec = "NAME[:CONFIG[:SPLIT]]"`` (split default ``train``).

    Raises:
        ImportError: ``datasets`` is not installed (``pip install datasets``).
        RuntimeError: the dataset could not be loaded (no network and no local cache).
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "calibration from a Hugging Face dataset needs the datasets package: pip install datasets "
            "(or calibrate on a text file, or with 'self')"
        ) from exc
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"dataset spec must be NAME[:CONFIG[:SPLIT]], got {spec!r}")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        raise RuntimeError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): {exc}. "
            "Offline, calibrate on a text file or with 'self'"
        ) from exc
    if column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {ds.column_names}")
    return from_text(list(ds[column]), tokenizer, num_samples=num_samples, seq_len=seq_len,
                     seed=seed, special_tokens=special_tokens)


def self_generated(model, tokenizer=None, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                   seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, temperature: float = 1.0,
                   top_k: int = 0, batch_size: int = 32):
    """Token sequences sampled from a causal language model itself (data-free calibration).

    Each sequence starts from one token drawn uniformly from the vocabulary (special tokens
    excluded when ``tokenizer`` is given), then continues with ``model.generate`` sampling the
    model's next-token distribution at ``temperature`` (and among the ``top_k`` most likely
    tokens if > 0). Every other sampling setting of the model's own generation config (top-p,
    repetition penalty, ...) is switched off so the text follows the model's plain
    distribution, and the end-of-sequence token does not stop a row (``eos_token_id=None``):
    it may be sampled like any other token and the model goes on after it, so every row runs
    to ``seq_len`` tokens. Activations on such text follow the model's own
    statistics, which is what the layer Hessians need; no dataset has to be at hand.

    Cost: ``ceil(num_samples / batch_size) * seq_len`` forward passes of ``batch_size`` tokens.
    On a CPU each pass streams every weight from memory once whatever the batch, so one
    large batch is far quicker than many small ones; the key/value cache costs
    ``4 * 2 * layers * batch_size * seq_len * kv_width`` bytes (about 380 MB for SmolLM2-135M
    at 32 x 256).

    Args:
        model: a causal LM with ``generate`` (a transformers ``GenerationMixin``) and
            ``config.vocab_size``.
        tokenizer: optional, only to leave special tokens out of the first position.
        num_samples, seq_len: output shape.
        seed: seeds the first tokens (a private ``torch.Generator``) and the sampling (inside
            ``torch.random.fork_rng``); the caller's global RNG state is left as it was.
        temperature: > 0.
        top_k: 0 samples the full distribution.
        batch_size: sequences generated together (default 32).

    Returns:
        torch.LongTensor (num_samples, seq_len).
    """
    import torch

    _positive_int("num_samples", num_samples)
    _positive_int("seq_len", seq_len)
    _positive_int("batch_size", batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError("model has no config.vocab_size: self-generated calibration needs a causal LM")
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"model ({type(model).__name__}) has no generate(): self-generated calibration "
                         "needs a transformers causal LM")
    allowed = torch.ones(vocab, dtype=torch.bool)
    if tokenizer is not None:
        for i in getattr(tokenizer, "all_special_ids", []) or []:
            if 0 <= i < vocab:
                allowed[i] = False
    candidates = allowed.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    settings = _sampling_settings(model, seq_len, temperature, top_k)
    was_training = model.training
    model.eval()
    out = []
    try:
        # generate() samples from the global RNG: seed a forked copy so the caller's
        # state is untouched and the same seed gives the same text.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, num_samples, batch_size):
                b = min(batch_size, num_samples - start)
                first = candidates[torch.randint(len(candidates), (b,), generator=gen)][:, None]
                if seq_len == 1:
                    out.append(first)
                    continue
                seqs = model.generate(input_ids=first, attention_mask=torch.ones_like(first), **settings)
                seqs = seqs.sequences if hasattr(seqs, "sequences") else seqs
                if seqs.shape != (b, seq_len):
                    raise RuntimeError(f"generate returned shape {tuple(seqs.shape)}, expected {(b, seq_len)}")
                out.append(seqs.long())
                logger.info("self-generated %d/%d calibration sequences", start + b, num_samples)
    finally:
        model.train(was_training)
    return torch.cat(out)


def _sampling_settings(model, seq_len: int, temperature: float, top_k: int) -> dict:
    """Keyword arguments of ``generate`` for plain ancestral sampling of ``seq_len - 1`` tokens.

    A model's own generation config may carry top-p, repetition penalties and the like,
    which would bend the calibration text away from the model's distribution: each is
    reset here to its neutral value.
    """
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    return dict(
        do_sample=True,
        max_new_tokens=seq_len - 1,
        # No stop token: rows of one batch stay equally long and unpadded, and the
        # end-of-sequence token keeps its probability (min_new_tokens would zero it).
        eos_token_id=None,
        temperature=float(temperature),
        top_k=top_k,
        top_p=1.0,
        typical_p=1.0,
        min_p=None,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad if pad is not None else 0,  # never used: no row finishes early
    )


def calibration_data(source=SELF, *, model=None, tokenizer=None, num_samples: int = DEFAULT_NUM_SAMPLES,
                     seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, special_tokens: Optional[bool] = None):
    """Calibration windows from any supported source (see the module docstring).

    Args:
        source: ``"self"`` (default), ``"hf:NAME[:CONFIG[:SPLIT]]"``, a text file path
            (str or ``os.PathLike``), a list of str, or token ids (1-D or 2-D tensor / array / list).
        model: needed for ``"self"``.
        tokenizer: needed for text sources; optional for ``"self"``.
        num_samples: windows (default 32).
        seq_len: tokens per window (default 256).
        seed: seed for offsets or sampling (default 0).
        special_tokens: wrap text windows in [CLS]/[SEP]; default only for encoder tokenizers.

    Returns:
        torch.LongTensor (num_samples, seq_len); for 2-D token ids, the ids themselves.
    """
    import numpy as np
    import torch

    _positive_int("num_samples", num_samples)
    _positive_int("seq_len", seq_len)
    if isinstance(source, str) and source == SELF:
        if model is None:
            raise ValueError("calibration source 'self' needs the model")
        return self_generated(model, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed)
    if isinstance(source, str) and source.startswith("hf:"):
        return from_hf_dataset(source[3:], tokenizer, num_samples=num_samples, seq_len=seq_len,
                               seed=seed, special_tokens=special_tokens)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"calibration source {str(source)!r} is not a file; use a text file, 'self' or 'hf:NAME[:CONFIG[:SPLIT]]'"
            )
        return from_text(read_text(path), tokenizer, num_samples=num_samples, seq_len=seq_len,
                         seed=seed, special_tokens=special_tokens)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source):
        return from_text(list(source), tokenizer, num_samples=num_samples, seq_len=seq_len,
                         seed=seed, special_tokens=special_tokens)
    if isinstance(source, (torch.Tensor, np.ndarray, list, tuple)):
        ids = torch.as_tensor(np.asarray(source) if isinstance(source, (list, tuple)) else source)
        if ids.numel() == 0:
            raise ValueError("calibration token ids are empty")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"calibration token ids must be integers, got {ids.dtype}")
        if ids.ndim == 2:
            return ids.long().clone()
        prefix, suffix = _special_wrap(tokenizer, special_tokens)
        return random_windows(ids, num_samples=num_samples, seq_len=seq_len, seed=seed, prefix=prefix, suffix=suffix)
    raise TypeError(
        f"unsupported calibration source of type {type(source).__name__}: "
        "use 'self', a text file, a list of str, token ids or 'hf:NAME[:CONFIG[:SPLIT]]'"
    )


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
