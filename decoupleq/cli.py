"""Command line: ``decoupleq quantize | eval | info | models`` (also ``python -m decoupleq``).

    decoupleq quantize MODEL --bits 2 --group-size 64 --out DIR [--calib self|FILE|hf:NAME...] [--distill STEPS]
        [--resume] [--checkpoint-dir RUN | --no-checkpoint]   (also under torchrun: rank 0 saves)
    decoupleq eval DIR --text FILE [--max-windows 64 | --full] [--compare]
    decoupleq info DIR [--plot OUT.png]
    decoupleq models

MODEL is a packaged model name (``decoupleq models``), a local Hugging Face folder or a GGUF
file. A quantized folder ``DIR`` is a Hugging Face folder (``decoupleq.save``: config.json
with its ``quantization_config``, the safetensors shards; ``from_pretrained(DIR)`` reads it),
the tokenizer, and ``decoupleq.json`` (where the model came from, the settings, timings,
sizes and any evaluation results). Folders of earlier versions (``model.safetensors`` in
decoupleq's single-file format, no config.json) still load.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "decoupleq.json"

log = logging.getLogger("decoupleq.cli")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _group_size(text):
    value = int(text)
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (per-channel) or a positive integer, got {text}")
    return value


_NO_BOS_HELP = ("score plain slices of the token stream, as published GPTQ-style figures do, instead of "
                "starting each window with the BOS token the tokenizer adds (default; no change for "
                "tokenizers that add none)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import INDIVISIBLE_POLICIES, INITS, METHODS, ROUNDINGS, TUNE_TARGETS
    from .data import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
    from .evaluate import DEFAULT_MAX_WINDOWS, DEFAULT_SEQ_LEN as EVAL_SEQ_LEN

    p = argparse.ArgumentParser(prog="decoupleq", description="2-bit post-training weight quantization on a CPU.")
    p.add_argument("--version", action="version", version=f"decoupleq {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    # -q also works after the command; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and the results")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and save it to a folder",
                       description="Quantize MODEL's linear layers block by block and save the result to --out.")
    q.add_argument("model", help="packaged model name, local Hugging Face folder, .gguf file, "
                                 "or Hub id org/name[@revision] (from the local Hub cache when offline)")
    q.add_argument("--out", required=True, type=Path,
                   help="output folder: created, or an earlier quantized folder replaced as a whole")
    q.add_argument("--method", choices=METHODS, default="decoupleq")
    q.add_argument("--bits", type=int, default=2, help="code width, 2..8 (default 2)")
    q.add_argument("--group-size", type=_group_size, default=64,
                   help="inputs per scale/zero; -1 for per-channel (default 64)")
    q.add_argument("--indivisible", choices=INDIVISIBLE_POLICIES, default="short",
                   help="a layer whose inputs the group size does not divide: 'short' (default: a shorter "
                        "last group), 'per_channel', 'skip' (full precision) or 'error'")
    q.add_argument("--symmetric", action="store_true", help="zero fixed at 0")
    q.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="visit columns in natural order instead of by decreasing Hessian diagonal")
    q.add_argument("--iterations", type=_positive(int), default=4,
                   help="decoupleQ: one GPTQ pass plus ITERATIONS-1 alternations (default 4)")
    q.add_argument("--rounding", choices=ROUNDINGS, default="gptq", help="decoupleQ's integer step (default gptq)")
    q.add_argument("--damping", type=float, default=0.01, help="percdamp (default 0.01)")
    q.add_argument("--init", choices=INITS, default=None,
                   help="where scales and zeros start: minmax, shrink (decoupleQ's reference), neuqi, "
                        "neuqi_int (default: the method's, neuqi; minmax for uniquanf)")
    q.add_argument("--blockwise", dest="blockwise", action="store_true", default=None,
                   help="tune each block's float parts against its full-precision outputs (default for decoupleq)")
    q.add_argument("--no-blockwise", dest="blockwise", action="store_false")
    q.add_argument("--blockwise-lr", type=_positive(float), default=None)
    q.add_argument("--blockwise-epochs", type=_positive(int), default=None)
    q.add_argument("--blockwise-target", choices=TUNE_TARGETS, default=None,
                   help="fit each tuned block to the full-precision block on the quantized model's inputs "
                        "(quantized_inputs, default) or to the full-precision model's activations (fp_inputs)")
    q.add_argument("--calib", default="self",
                   help="calibration: 'self' (sampled from the model, default), a text file, or hf:NAME[:CONFIG[:SPLIT]]")
    q.add_argument("--num-samples", type=_positive(int), default=DEFAULT_NUM_SAMPLES,
                   help=f"calibration windows (default {DEFAULT_NUM_SAMPLES})")
    q.add_argument("--seq-len", type=_positive(int), default=DEFAULT_SEQ_LEN,
                   help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN})")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--skip", action="append", default=[],
                   help="leave layers matching this name pattern in full precision (repeatable; 're:' for a regex)")
    q.add_argument("--distill", type=_positive(int), default=None, metavar="STEPS",
                   help="after quantizing, train the scales and zeros for STEPS steps (one calibration window "
                        "each) on the MSE to the full-precision model's final hidden states (decoupleq.distill); "
                        "the full-precision teacher is MODEL loaded again after quantization")
    q.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="run folder where each finished block is written (default OUT.run next to --out; "
                        "removed once the output is saved)")
    q.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="write no run folder (an interrupted run then starts over)")
    q.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in the run folder from its first unfinished block "
                        "(same MODEL, calibration and settings; the output is that of an uninterrupted run)")
    q.add_argument("--shards", type=_positive(int), default=None, metavar="S",
                   help="S fixed virtual shards of the calibration batches and of each layer's rows "
                        "(ModelQuantConfig.shards): the output is then the same bytes under torchrun with "
                        "any number of ranks that divides the work, one process included")
    q.add_argument("--stream", action="store_true",
                   help="read the float model from disk one block at a time instead of loading it whole "
                        "(decoupleq.quantize_from_disk): MODEL's Hugging Face folder (for a GGUF, its converted "
                        "cache folder); same output; needs --calib FILE or hf:NAME")
    q.add_argument("--eval-text", type=Path, default=None,
                   help="also report perplexity before and after on this text file")
    q.add_argument("--eval-windows", type=_positive(int), default=DEFAULT_MAX_WINDOWS)
    q.add_argument("--eval-seq-len", type=_positive(int), default=EVAL_SEQ_LEN)
    q.add_argument("--no-window-bos", dest="window_bos", action="store_false",
                   help=_NO_BOS_HELP)

    e = sub.add_parser("eval", parents=[common], help="evaluate a quantized folder or any model on a text",
                       description="Perplexity (causal LMs) or embedding agreement (encoders) on a text.")
    e.add_argument("model", help="a folder written by 'decoupleq quantize', or any MODEL")
    e.add_argument("--text", required=True, type=Path, help="text file to evaluate on")
    e.add_argument("--seq-len", type=_positive(int), default=EVAL_SEQ_LEN, help=f"window length (default {EVAL_SEQ_LEN})")
    e.add_argument("--max-windows", type=_positive(int), default=DEFAULT_MAX_WINDOWS,
                   help=f"token budget: the first N windows (default {DEFAULT_MAX_WINDOWS})")
    e.add_argument("--full", action="store_true", help="every whole window of the text instead of the budget")
    e.add_argument("--no-window-bos", dest="window_bos", action="store_false", help=_NO_BOS_HELP)
    e.add_argument("--compare", action="store_true",
                   help="also compare with the full-precision model the folder was quantized from "
                        "(KL divergence and top-1 agreement; cosine similarity for encoders)")
    e.add_argument("--reference", default=None, help="compare with this MODEL instead")
    e.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")

    i = sub.add_parser("info", parents=[common], help="describe a quantized folder")
    i.add_argument("path", type=Path, help="a folder written by 'decoupleq quantize' (or its model.safetensors)")
    i.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                   help="also draw each layer's relative loss by block and layer type into this picture "
                        "(PNG, SVG, PDF... by suffix; needs matplotlib: the 'notebook' extra)")

    sub.add_parser("models", parents=[common], help="list the packaged models")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "models": cmd_models}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"decoupleq {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------
# Helpers shared by the commands and the examples
# ---------------------------------------------------------------------------


def state_dict_mb(model) -> float:
    """Bytes of a model's parameters and buffers in memory, tied tensors counted once, in MB."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total / 1e6


def packed_mb(model) -> float:
    """What the model would weigh with every quantized layer's codes packed at its bit width
    (``bits * out * in / 8`` bytes) and its scale and zero in float16 (a BCQ layer: its packed
    words and its alpha and offset in float16); other tensors as they are."""
    from .bcq import bits_per_weight
    from .config import num_groups
    from .nn import QUANT_MODULES
    from .nn_bcq import BCQLinear

    quantized = set()
    total = 0.0
    for _, m in model.named_modules():
        if isinstance(m, QUANT_MODULES + (BCQLinear,)):
            info = m.quant_info()
            out, n = int(info["out_features"]), int(info["in_features"])
            g = num_groups(n, int(info["group_size"]))  # a short last group has its own scale
            if isinstance(m, BCQLinear):
                total += bits_per_weight(m.bits, n, m.group_size, param_bits=16) * out * n / 8
            else:
                zeros = 0 if info.get("symmetric") else out * g
                total += int(info["bits"]) * out * n / 8 + 2 * (out * g + zeros)
            for t in m.buffers(recurse=False):
                quantized.add(t.untyped_storage().data_ptr())
            for t in m.parameters(recurse=False):
                if t is not getattr(m, "bias", None):
                    quantized.add(t.untyped_storage().data_ptr())
    seen = set(quantized)
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total / 1e6


def check_out_folder(out) -> None:
    """``out`` may be created or replaced as a whole: it is absent, an empty folder, or a
    quantized folder (a folder with anything else in it is refused, not deleted).

    Raises:
        ValueError naming ``--out``.
    """
    from .hf_folder import check_replaceable

    check_replaceable(out, "--out", is_quantized_folder, "a quantized folder")


def save_folder(out, model, tokenizer, summary: dict) -> dict:
    """Write a quantized folder: ``model.safetensors`` (``decoupleq.save``), the tokenizer, and
    ``decoupleq.json`` (``summary`` plus ``file_mb``, the model file's size). Returns what was
    written to ``decoupleq.json``.

    The folder is written as a hidden temporary folder beside ``out`` and renamed into place
    whole, so ``out`` never holds a new model beside an old ``decoupleq.json``: an interrupted
    run leaves the previous folder (or none). A previous ``out`` must pass ``check_out_folder``.
    """
    from .hf_folder import folder_size, replace_folder, write_folder

    out = Path(out)
    check_out_folder(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        write_folder(model, tmp, tokenizer)
        done = dict(summary, file_mb=folder_size(tmp) / 1e6)
        (tmp / SUMMARY_FILE).write_text(json.dumps(done, indent=2, default=str) + "\n")
        return done

    return replace_folder(out, write)


def _bos(args):
    """``bos=`` of the evaluation functions: "auto" unless --no-window-bos."""
    return "auto" if args.window_bos else False


def is_quantized_folder(path) -> bool:
    """A folder written by ``decoupleq quantize``: a decoupleq Hugging Face folder, or (earlier
    versions) ``model.safetensors`` in the single-file format; either with ``decoupleq.json``."""
    from .hf_folder import is_decoupleq_folder

    p = Path(path)
    return ((p / MODEL_FILE).is_file() or is_decoupleq_folder(p)) and (p / SUMMARY_FILE).is_file()


def load_quantized(path):
    """(model, tokenizer, summary dict) of a folder written by ``decoupleq quantize``."""
    from transformers import AutoTokenizer

    from .io import load

    path = Path(path)
    if not is_quantized_folder(path):
        raise FileNotFoundError(f"{path} is not a quantized folder (no {MODEL_FILE} and {SUMMARY_FILE})")
    summary = json.loads((path / SUMMARY_FILE).read_text())
    model = load(str(path) if (path / "config.json").is_file() else str(path / MODEL_FILE))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer, summary


def load_any(spec):
    """(model, tokenizer, kind, summary or None) of a quantized folder or any MODEL."""
    if is_quantized_folder(spec):
        model, tokenizer, summary = load_quantized(spec)
        return model, tokenizer, summary.get("kind", "causal-lm"), summary
    from .zoo import load_model

    lm = load_model(spec)
    return lm.model, lm.tokenizer, lm.kind, None


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_models(args) -> int:
    from .zoo import PACKAGED_MODELS

    for m in PACKAGED_MODELS.values():
        try:
            where = str(m.locate())
        except (ImportError, FileNotFoundError):
            where = f"not installed: {m.install_hint()}"
        print(f"{m.name:14s} {m.kind:9s} {m.description}\n{'':25s}{where}")
    return 0


def cmd_quantize(args) -> int:
    import dataclasses

    from . import quantize
    from .config import BlockTuneConfig, ModelQuantConfig, QuantConfig
    from .data import calibration_data
    from .evaluate import perplexity
    from .zoo import CAUSAL_LM, load_model

    # Every setting is checked before the model is read.
    quant = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                        act_order=args.act_order, iterations=args.iterations, rounding=args.rounding,
                        damping=args.damping, init=args.init)
    blockwise = args.blockwise if args.blockwise is not None else args.method == "decoupleq"
    tune = BlockTuneConfig(enabled=blockwise)
    if args.blockwise_lr is not None:
        tune = dataclasses.replace(tune, lr=args.blockwise_lr)
    if args.blockwise_epochs is not None:
        tune = dataclasses.replace(tune, epochs=args.blockwise_epochs)
    if args.blockwise_target is not None:
        tune = dataclasses.replace(tune, target=args.blockwise_target)
    mcfg = ModelQuantConfig(quant=quant, blockwise=tune, skip=tuple(args.skip), indivisible=args.indivisible,
                            shards=args.shards, verbose=not args.quiet)
    if args.eval_text is not None and not args.eval_text.is_file():
        raise FileNotFoundError(f"--eval-text {args.eval_text} does not exist")
    check_out_folder(args.out)
    run_dir = None
    if args.checkpoint:
        run_dir = args.checkpoint_dir or args.out.with_name(args.out.name + ".run")
    elif args.resume:
        raise ValueError("--resume needs the run folder: drop --no-checkpoint")
    # Under torchrun every rank runs this command; rank 0 evaluates, prints and saves.
    from .distributed import current

    rank0 = current().rank == 0
    if args.stream:
        return _quantize_streamed(args, mcfg, run_dir)

    lm = load_model(args.model)
    if lm.note:
        print(f"note: {lm.name}: {lm.note}")
    # RTN without block tuning looks at no activation: build no calibration data at all
    # (sampling "self" text costs a minute on SmolLM2), unless --distill trains on it.
    needs_data = mcfg.needs_calibration or args.distill is not None
    if needs_data and args.calib == "self" and lm.kind != CAUSAL_LM:
        raise ValueError(f"{lm.name} is an encoder: it cannot generate its own calibration text; pass --calib FILE")
    fp_mb = state_dict_mb(lm.model)
    results = {}
    if args.eval_text is not None and lm.kind == CAUSAL_LM and rank0:
        r = perplexity(lm.model, args.eval_text, lm.tokenizer, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                       bos=_bos(args))
        print(f"before: {r}")
        results["fp"] = r.to_dict()

    t0 = time.perf_counter()
    calib = None
    if needs_data:
        calib = calibration_data(args.calib, model=lm.model, tokenizer=lm.tokenizer, num_samples=args.num_samples,
                                 seq_len=args.seq_len, seed=args.seed)
    else:
        log.info("RTN without block tuning is data-free: no calibration data is built (--calib ignored)")
    t_calib = time.perf_counter() - t0
    quantize(lm.model, calib, mcfg, checkpoint_dir=run_dir, resume=args.resume)
    seconds = time.perf_counter() - t0
    if not rank0:
        return 0
    distilled = None
    if args.distill is not None:
        from .distill import distill

        # Loaded again rather than copied before quantizing: no second model in memory while quantizing.
        distilled = distill(lm.model, load_model(args.model).model, calib, steps=args.distill, seed=args.seed,
                            verbose=not args.quiet).to_dict()
        print(f"distilled {args.distill} steps in {distilled['seconds']:.1f} s: "
              f"loss {distilled['loss_start']:.4g} -> {distilled['loss_end']:.4g}")

    if args.eval_text is not None and lm.kind == CAUSAL_LM:
        r = perplexity(lm.model, args.eval_text, lm.tokenizer, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                       bos=_bos(args))
        print(f"after:  {r}")
        results["quantized"] = r.to_dict()

    report = getattr(lm.model, "decoupleq_report", None)
    from .zoo import packaged_model

    pm = packaged_model(args.model) if not os.path.exists(args.model) else None
    summary = {
        # What --compare reloads as the full-precision reference: a packaged name, a Hub id
        # (resolved again through the Hub cache), or an absolute path.
        "model": pm.name if pm is not None else (lm.extra.get("hub_id") or str(Path(args.model).resolve())),
        "source": lm.source,
        "name": lm.name,
        "kind": lm.kind,
        "note": lm.note,
        "calibration": ({"source": str(args.calib), "num_samples": args.num_samples, "seq_len": args.seq_len,
                         "seed": args.seed, "seconds": t_calib} if needs_data else {"source": None}),
        "config": mcfg.to_dict(),
        "seconds": seconds,
        "distill": distilled,
        "layers": len(report.layers) if report is not None else None,
        "params": dict(getattr(report, "params", {}) or {}),
        "moe_fallbacks": [list(f) for f in getattr(report, "moe_fallbacks", []) or []],
        "skipped": list(getattr(report, "skipped", []) or []),
        "fp_mb": fp_mb,
        "packed_mb": packed_mb(lm.model),
        "eval": {"text": str(args.eval_text), **results} if results else {},
    }
    summary = save_folder(args.out, lm.model, lm.tokenizer, summary)
    print(f"quantized {summary['layers']} layers in {seconds:.1f} s (calibration data {t_calib:.1f} s)")
    if summary["params"]:
        from .moe import describe_counts

        for line in describe_counts(summary["params"]):
            print(f"  {line}")
        if summary["moe_fallbacks"]:
            print(f"  {len(summary['moe_fallbacks'])} expert layers saw too few routed tokens and took "
                  f"their block's pooled Hessian (listed in {SUMMARY_FILE})")
    stored = f"codes packed at {args.bits} bits" if args.bits <= 4 else f"{args.bits}-bit codes stored as int8"
    print(f"size: {fp_mb:.1f} MB in memory before; file {summary['file_mb']:.1f} MB "
          f"({stored}, scales and zeros float32), {summary['packed_mb']:.1f} MB with float16 scales and zeros")
    print(f"saved to {args.out}")
    if run_dir is not None:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # the output holds it all now
    return 0


def _quantize_streamed(args, mcfg, run_dir) -> int:
    """``quantize --stream``: the float model stays on disk (``decoupleq.stream``); the
    output folder is the one ``quantize`` without ``--stream`` writes from the same data."""
    from transformers import AutoTokenizer

    from .data import calibration_data
    from .distributed import current
    from .evaluate import perplexity
    from .hf_folder import weight_files
    from .stream import quantize_from_disk
    from .zoo import model_folder

    if current().active:
        raise ValueError("--stream runs in one process; drop it under torchrun")
    if args.distill is not None:
        raise ValueError("--distill needs the full-precision model in memory as its teacher: drop --stream")
    needs_data = mcfg.needs_calibration
    if needs_data and args.calib == "self":
        raise ValueError("--stream needs --calib FILE or hf:NAME: sampling 'self' calibration text runs "
                         "the whole model")
    folder = model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    t0 = time.perf_counter()
    calib = None
    if needs_data:
        calib = calibration_data(args.calib, tokenizer=tokenizer, num_samples=args.num_samples,
                                 seq_len=args.seq_len, seed=args.seed)
    t_calib = time.perf_counter() - t0
    model = quantize_from_disk(folder, calib, mcfg, out=None, checkpoint_dir=run_dir, resume=args.resume)
    fp_mb = sum(f.stat().st_size for f in weight_files(folder, str(folder))) / 1e6
    seconds = time.perf_counter() - t0
    results = {}
    if args.eval_text is not None:
        r = perplexity(model, args.eval_text, tokenizer, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                       bos=_bos(args))
        print(f"after:  {r}")
        results["quantized"] = r.to_dict()
    report = model.decoupleq_report
    summary = {
        "model": str(Path(args.model).resolve()) if os.path.exists(args.model) else args.model,
        "source": str(folder),
        "name": Path(folder).name,
        "kind": "causal-lm",
        "note": "",
        "streamed": True,
        "calibration": ({"source": str(args.calib), "num_samples": args.num_samples, "seq_len": args.seq_len,
                         "seed": args.seed, "seconds": t_calib} if needs_data else {"source": None}),
        "config": mcfg.to_dict(),
        "seconds": seconds,
        "distill": None,
        "layers": len(report.layers),
        "params": dict(report.params),
        "moe_fallbacks": [],
        "skipped": list(report.skipped),
        "fp_mb": fp_mb,
        "packed_mb": packed_mb(model),
        "eval": {"text": str(args.eval_text), **results} if results else {},
    }
    summary = save_folder(args.out, model, tokenizer, summary)
    print(f"quantized {summary['layers']} layers in {seconds:.1f} s streamed from {folder} "
          f"(calibration data {t_calib:.1f} s)")
    print(f"saved to {args.out}")
    if run_dir is not None:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import compare_logits, embedding_similarity, perplexity, sentences_from_text
    from .zoo import CAUSAL_LM

    if not args.text.is_file():
        raise FileNotFoundError(f"--text {args.text} does not exist")
    model, tokenizer, kind, summary = load_any(args.model)
    ref_spec = args.reference
    if args.compare and ref_spec is None:
        if summary is None:
            raise ValueError("--compare needs a quantized folder (it compares with the model it came from); "
                             "otherwise pass --reference MODEL")
        ref_spec = summary.get("model") or summary["source"]
    if summary and summary.get("note"):
        print(f"note: {summary.get('name')}: {summary['note']}")
    out = {"model": str(args.model), "text": str(args.text)}
    max_windows = None if args.full else args.max_windows
    if kind == CAUSAL_LM:
        r = perplexity(model, args.text, tokenizer, seq_len=args.seq_len, max_windows=max_windows, full=args.full,
                       bos=_bos(args))
        print(r)
        out["perplexity"] = r.to_dict()
        if ref_spec is not None:
            ref, _, _, _ = load_any(ref_spec)
            f = compare_logits(model, ref, args.text, tokenizer, seq_len=args.seq_len, max_windows=max_windows,
                               full=args.full, bos=_bos(args))
            print(f"vs {ref_spec}: {f}")
            out["fidelity"] = {"reference": str(ref_spec), **f.to_dict()}
    else:
        if ref_spec is None:
            raise ValueError("an encoder has no perplexity: pass --compare or --reference MODEL "
                             "to measure embedding agreement")
        ref, _, _, _ = load_any(ref_spec)
        sentences = sentences_from_text(args.text, max_sentences=args.max_windows * 4 if not args.full else 10**9)
        e = embedding_similarity(model, ref, tokenizer, sentences)
        print(f"vs {ref_spec}: {e}")
        out["embedding"] = {"reference": str(ref_spec), **e.to_dict()}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _stored_bits(info: dict) -> tuple:
    """(weights, bits per weight as stored in the file) of one layer description: codes or
    indices with their layout padding, plus every float32 scale/zero or alpha/offset."""
    from .bcq import bits_per_weight
    from .config import num_groups
    from .packing import row_words

    out, n, bits = int(info["out_features"]), int(info["in_features"]), int(info["bits"])
    gs = int(info["group_size"])
    G = num_groups(n, gs)  # ceil(n / gs): a short last group stores a whole scale and zero
    if info.get("type") == "bcq_linear":
        return out * n, bits_per_weight(bits, n, gs)
    code_bits = 32 * row_words(bits, n) if info.get("codes", "int8") != "int8" else 8 * n
    return out * n, (code_bits + 2 * 32 * G) / n


def _layer_kind_lines(layers: dict) -> list:
    """One line per layer kind (uniform, BCQ): count, bits, group sizes, true bits per weight."""
    kinds = {}
    for info in layers.values():
        kinds.setdefault("bcq" if info.get("type") == "bcq_linear" else "uniform", []).append(info)
    lines = []
    for kind, infos in sorted(kinds.items()):
        sized = [_stored_bits(i) for i in infos]
        weights = sum(w for w, _ in sized)
        bpw = sum(w * b for w, b in sized) / max(weights, 1)
        what = "indices + alpha/offset" if kind == "bcq" else "codes + scale/zero"
        lines.append(f"  {kind:8s} {len(infos)} layers, bits {sorted({int(i['bits']) for i in infos})}, "
                     f"group sizes {sorted({int(i['group_size']) for i in infos})}: "
                     f"{bpw:.3f} bits per weight as stored ({what}, float32)")
    return lines


def _file_counts(files, layers: dict) -> dict:
    """Weights quantized vs parameters kept, from the files' tensor headers (no tensor read)."""
    from safetensors import safe_open

    from .moe import file_parameter_counts

    shapes, dtypes = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                shapes[k], dtypes[k] = tuple(s.get_shape()), s.get_dtype()
    return file_parameter_counts(layers, shapes, dtypes)


def _check_plot_arg(plot) -> None:
    """``--plot``'s folder exists and matplotlib is importable: checked before anything is read."""
    if plot is None:
        return
    if plot.is_dir():
        raise ValueError(f"--plot {plot} is a folder; give a file name such as losses.png")
    if not plot.absolute().parent.is_dir():
        raise ValueError(f"--plot {plot}: directory {plot.absolute().parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or the 'notebook' extra: "
                          "pip install 'decoupleq[notebook]')") from None


def _loss_line(stored) -> str:
    """The line on the stored per-layer relative losses (``decoupleq.layer_losses``)."""
    import statistics

    if stored is None:
        return "losses:    none stored (written before decoupleq kept per-layer losses)"
    finite = {k: v for k, v in stored.items() if v is not None}
    if not finite:
        return f"losses:    none for its {len(stored)} layers (data-free RTN weighs no error by a Hessian)"
    worst = max(finite, key=finite.get)
    return (f"losses:    relative loss of {len(finite)} layers: median {statistics.median(finite.values()):.4g}, "
            f"largest {finite[worst]:.4g} ({worst})")


def _plot(stored, layers: dict, out: Path, path: Path) -> None:
    """Draw ``stored`` (``{layer: relative loss or None}``) into ``out``, layers in the order
    of ``layers`` (the plot keeps the layer kinds in the order it first meets them)."""
    from .plot import plot_layer_losses

    if stored is None:
        raise ValueError(f"--plot: {path} stores no per-layer losses (it was written before decoupleq kept "
                         "them); quantize the model again to draw them")
    if all(v is None for v in stored.values()):
        raise ValueError(f"--plot: no layer of {path} has a relative loss (data-free RTN weighs no error by a "
                         "Hessian); quantize with calibration data to draw them")
    pairs = [(name, math.nan if stored[name] is None else stored[name]) for name in layers if name in stored]
    plot_layer_losses(pairs, out, title=f"relative loss by block and layer type: {path.name}")
    print(f"plot:      {out}")


def cmd_info(args) -> int:
    from .io import read_metadata
    from .moe import describe_counts

    from .hf_folder import folder_layers, folder_size, is_decoupleq_folder, weight_files

    _check_plot_arg(args.plot)
    path = args.path
    folder = path if path.is_dir() else path.parent
    summary_path = folder / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if path.is_dir() and is_decoupleq_folder(path):
        qcfg, layers = folder_layers(path)
        meta = {"quantization": qcfg.settings or {}, "layer_losses": qcfg.layer_losses}
        cls = json.loads((path / "config.json").read_text())["architectures"][0]
        files = weight_files(path, str(path))
        print(f"folder:    {path} ({folder_size(path) / 1e6:.1f} MB of weights), Hugging Face layout, "
              f"quant_method decoupleq, format v{qcfg.format_version}")
    else:
        file = path / MODEL_FILE if path.is_dir() else path
        meta = read_metadata(str(file))
        files = [file]
        layers = meta.get("layers", {})
        cls = meta["model"].get("class")
        print(f"file:      {file} ({file.stat().st_size / 1e6:.1f} MB), format {meta['format']} "
              f"v{meta['format_version']}, written by decoupleq {meta.get('library_version')}")
    q = (meta.get("quantization") or {}).get("quant", {})
    print(f"model:     {cls}" + (f" from {summary['source']}" if summary.get("source") else ""))
    if q:
        print(f"settings:  {q.get('method')} W{q.get('bits')} group {q.get('group_size')}"
              f"{' symmetric' if q.get('symmetric') else ''}, act-order {q.get('act_order')}, "
              f"iterations {q.get('iterations')}, block tuning "
              f"{(meta['quantization'].get('blockwise') or {}).get('enabled')}")
    bits = sorted({int(v.get("bits", 0)) for v in layers.values()})
    groups = sorted({int(v.get("group_size", 0)) for v in layers.values()})
    print(f"layers:    {len(layers)} quantized (bits {bits}, group sizes {groups})")
    for line in _layer_kind_lines(layers):
        print(line)
    for k, line in enumerate(describe_counts(_file_counts(files, layers))):
        print(f"{'weights:' if k == 0 else '':10s} {line}")
    if summary.get("moe_fallbacks"):
        print(f"           {len(summary['moe_fallbacks'])} expert layers took their block's pooled Hessian "
              "(too few routed tokens)")
    if summary:
        cal = summary.get("calibration", {})
        if cal.get("source") is None:
            print("calib:     none (data-free)")
        else:
            print(f"calib:     {cal.get('source')} ({cal.get('num_samples')} x {cal.get('seq_len')} tokens, "
                  f"seed {cal.get('seed')})")
        print(f"time:      {summary.get('seconds', 0):.1f} s")
        print(f"size:      {summary.get('fp_mb', 0):.1f} MB full precision, {summary.get('packed_mb', 0):.1f} MB packed")
        for k, v in (summary.get("eval") or {}).items():
            if isinstance(v, dict) and "ppl" in v:
                print(f"ppl {k:9s} {v['ppl']:.3f} [{v['windows']} x {v['seq_len']} tokens of {summary['eval'].get('text')}]")
        if summary.get("note"):
            print(f"note:      {summary['note']}")
    print(_loss_line(meta.get("layer_losses")))
    if args.plot is not None:
        _plot(meta.get("layer_losses"), layers, args.plot, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
