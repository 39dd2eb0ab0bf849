"""Shared pieces of the model-level tests: the real text folder, tiny models and tokenizers.

Tiny models are built from a config (no download); tokenizers are trained in a fraction of a
second on real text with the ``tokenizers`` library, so the tests exercise real tokenization.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The shared text folder (``$DECOUPLEQ_DATA`` or ``../shared/data`` from the repo root); skips if absent."""
    env = os.environ.get("DECOUPLEQ_DATA")
    cands = [Path(env)] if env else [REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                                     Path.cwd().parent.parent / "shared" / "data"]
    for c in cands:
        if (c / "wikitext-2" / "test.txt").is_file():
            return c
    pytest.skip(f"real text not found: set DECOUPLEQ_DATA or put the shared data at {cands[0]}")


def read(rel: str, limit: int = None) -> str:
    text = (data_dir() / rel).read_text(encoding="utf-8")
    return text if limit is None else text[:limit]


def text_slice(rel: str, dest: Path, chars: int = 40_000) -> Path:
    """The first ``chars`` characters of a shared text file, written to ``dest`` (tests stay fast
    with a small tokenizer: tokenizing a whole 1 MB split takes seconds each time)."""
    dest.write_text(read(rel, limit=chars), encoding="utf-8")
    return dest


def train_tokenizer(text: str, vocab_size: int = 300, encoder: bool = False):
    """A byte-level BPE tokenizer trained on ``text``; with ``encoder`` it has [CLS]/[SEP]/[PAD]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] if encoder else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    if encoder:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                    ("[SEP]", tok.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", unk_token="[UNK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def saved_tiny_llama(folder, text_chars: int, vocab_size: int, seed: int, hidden: int):
    """A tiny Llama and a tokenizer trained on wikitext-2's first ``text_chars`` characters,
    saved together into ``folder`` (``save_pretrained``), as a model from the Hub would be.

    Returns:
        the float model (eval mode).
    """
    tok = train_tokenizer(read("wikitext-2/valid.txt", limit=text_chars), vocab_size=vocab_size)
    model = tiny_llama(vocab_size=len(tok), seed=seed, hidden=hidden)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def tiny_bert(vocab_size: int, seed: int = 0, hidden: int = 32):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256)
    return BertModel(cfg, add_pooling_layer=False).eval()
