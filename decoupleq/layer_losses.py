"""Per-layer relative losses of a quantization run, kept with the model and in saved files.

``quantize`` records each quantized layer's relative loss (``LayerReport.rel_loss``:
``(w^ - w) H (w^ - w)^T / w H w^T``) on the model as ``model.decoupleq_layer_losses``,
``{layer name: float}``, merged over successive ``quantize`` calls (a model quantized in
several passes keeps every pass's figures; a layer quantized again takes the newer one).
``save`` / ``save_pretrained`` store the figures of the layers that are quantized when
saving (a Hugging Face folder: ``quantization_config["layer_losses"]``; a single file: the
metadata document's ``layer_losses``), both covered by the file's checksums, and ``load`` /
``from_pretrained`` put them back on the model, so ``decoupleq info --plot`` can draw a saved
model's picture. They describe the quantization run: training the float parts afterwards
(``decoupleq.sft``, ``decoupleq.distill``) does not change them.

Stored form: a JSON object ``{layer name: number or null}``; null is a layer without a
figure (data-free RTN has no Hessian to weigh its error by: NaN in memory). Files written
before these figures existed have no such key and load as before, with no figures.
"""
from __future__ import annotations

import math

#: The model attribute holding ``{layer name: relative loss}`` (NaN: none).
ATTR = "decoupleq_layer_losses"
#: A stored mapping with more entries than this is past any real model.
MAX_LAYERS = 1 << 20


def record(model, layer_reports) -> None:
    """Merge the ``LayerReport`` list of one ``quantize`` run into ``model``'s figures."""
    losses = dict(getattr(model, ATTR, None) or {})
    for r in layer_reports:
        losses[r.name] = float(r.rel_loss)
    setattr(model, ATTR, losses)


def to_store(model, names) -> dict | None:
    """The JSON form of ``model``'s figures for the quantized layers ``names`` (in that order).

    Returns:
        ``{name: float or None}`` for each name that has a figure (None where it is NaN), or
        None when the model has no figure for any of them (nothing is stored then, and the
        file is what an earlier decoupleq wrote).
    """
    losses = getattr(model, ATTR, None)
    if not isinstance(losses, dict):
        return None
    out = {}
    for name in names:
        if name in losses:
            v = float(losses[name])
            out[name] = v if math.isfinite(v) else None
    return out or None


def check_stored(obj, what: str, layers) -> dict:
    """Check a stored mapping (data from a file) against the file's quantized ``layers``
    (a mapping or list of names); returns it.

    Raises:
        ValueError naming ``what`` and the entry at fault: not an object, too many entries,
        a name that is not a quantized layer of the file, a value that is neither a finite
        number nor null.
    """
    if not isinstance(obj, dict) or len(obj) > MAX_LAYERS:
        raise ValueError(f"{what}: 'layer_losses' must be an object of at most {MAX_LAYERS} layer names")
    unknown = sorted(set(obj) - set(layers))
    if unknown:
        raise ValueError(f"{what}: 'layer_losses' names layers that are not quantized: {unknown[:5]}")
    for name, v in obj.items():
        if not _is_figure(v):
            raise ValueError(f"{what}: 'layer_losses' of layer {name!r} must be a finite number or null, got {v!r}")
    return obj


def _is_figure(v) -> bool:
    """null, a finite float, or an integer of a float's range (compared, never converted:
    ``math.isfinite(10**400)`` would raise OverflowError)."""
    if v is None:
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 1000) < v < 1 << 1000


def from_store(stored) -> dict | None:
    """The in-memory form (``{name: float}``, NaN for null) of a checked stored mapping, or None."""
    if stored is None:
        return None
    return {name: float("nan") if v is None else float(v) for name, v in stored.items()}


def restore(model, stored) -> None:
    """Put a file's checked figures on a loaded model (a file without them: none)."""
    losses = from_store(stored)
    if losses is None:
        if hasattr(model, ATTR):
            delattr(model, ATTR)
        return
    setattr(model, ATTR, losses)
