"""Quantize the all-MiniLM-L6-v2 sentence encoder and check its embeddings still agree.

    python examples/quantize_minilm.py                        # W4 g64 decoupleQ + block tuning
    python examples/quantize_minilm.py --bits 2 --group-size 32

An encoder has no perplexity: quality is the cosine similarity between the quantized and the
full-precision model's sentence embeddings (mean pooling, L2-normalized, as the model was
trained) on lines of the WikiText-2 test split. Calibration uses windows of the validation
split wrapped in [CLS] ... [SEP]. The text is read from ``../shared/data/wikitext-2/`` next to
the repository, or from ``--data`` / ``$DECOUPLEQ_DATA``.
"""
import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

import decoupleq
from decoupleq.cli import packed_mb, state_dict_mb
from decoupleq.data import calibration_data, find_data_dir
from decoupleq.evaluate import embedding_similarity, sentences_from_text
from decoupleq.zoo import embed, load_model

REPO = Path(__file__).resolve().parents[1]

PAIRS = [
    ("A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."),
    ("The cat sits on the mat.", "A kitten is lying on a rug.", "Interest rates were raised again."),
    ("He plays the guitar on stage.", "A musician performs a song.", "The recipe needs two eggs."),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=decoupleq.config.METHODS, default="decoupleq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="-1 for per-channel")
    p.add_argument("--no-blockwise", dest="blockwise", action="store_false")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sentences", type=int, default=256, help="test lines to compare embeddings on")
    p.add_argument("--data", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data is not None:
        os.environ["DECOUPLEQ_DATA"] = str(args.data)
    data = find_data_dir(REPO)
    if data is None or not (data / "wikitext-2" / "valid.txt").is_file():
        sys.exit("WikiText-2 not found: pass --data DIR (holding wikitext-2/) or set DECOUPLEQ_DATA")

    lm = load_model("minilm-l6")
    reference = load_model("minilm-l6").model  # a second full-precision copy to compare against
    fp_mb = state_dict_mb(lm.model)
    sentences = sentences_from_text(data / "wikitext-2" / "test.txt", max_sentences=args.sentences)

    t0 = time.perf_counter()
    calib = calibration_data(data / "wikitext-2" / "valid.txt", tokenizer=lm.tokenizer,
                             num_samples=args.num_samples, seq_len=args.seq_len)
    config = decoupleq.ModelQuantConfig(
        quant=decoupleq.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size),
        blockwise=args.blockwise)
    decoupleq.quantize(lm.model, calib, config)
    seconds = time.perf_counter() - t0

    label = (f"{args.method} W{args.bits} " + ("per-channel" if args.group_size == -1 else f"g{args.group_size}")
             + (" + block tuning" if args.blockwise else ""))
    print(f"{label}: {embedding_similarity(lm.model, reference, lm.tokenizer, sentences)}")
    print("similar / unrelated pair cosine, full precision -> quantized:")
    for a, b, c in PAIRS:
        fp = embed(reference, lm.tokenizer, [a, b, c])
        q = embed(lm.model, lm.tokenizer, [a, b, c])
        print(f"  {float(fp[0] @ fp[1]):.3f} -> {float(q[0] @ q[1]):.3f}   |   "
              f"{float(fp[0] @ fp[2]):.3f} -> {float(q[0] @ q[2]):.3f}   ({a!r})")
    print(f"quantization time: {seconds:.0f} s ({args.num_samples} x {args.seq_len} calibration tokens)")
    print(f"size: {fp_mb:.1f} MB float32 before; {packed_mb(lm.model):.1f} MB after with codes packed "
          f"at {args.bits} bits (the 30522 x 384 word embedding stays float32: 47 MB of it)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
