"""Per-layer pictures of a quantization run: relative loss by block and layer type.

``quantize`` attaches a report (``model.decoupleq_report``) whose layers carry a relative loss
``(w^ - w) H (w^ - w)^T / w H w^T`` (0 = exact, 1 = as bad as zero weights). Saved models keep
the same figures, so ``decoupleq info --plot FILE.png`` draws the picture from a file. The
picture has one line per layer type (``q_proj``, ``down_proj``, ...) over the block index: in
a healthy run the lines are smooth, and a layer type or block that sticks out is where to spend
bits or calibration data.

matplotlib is needed only here (``pip install matplotlib``); the rest of the package never
imports it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerLoss:
    """One layer's place in the model and its relative loss."""

    block: int  # the block index found in the name, -1 when the name has none
    kind: str  # what the layer is inside its block: "self_attn.q_proj", "mlp.down_proj", ...
    rel_loss: float


def layer_losses(layers) -> list:
    """Sort a run's layers into (block, kind, relative loss).

    Args:
        layers: the report's ``LayerReport`` list, or an iterable of ``(name, rel_loss)`` pairs
            (what a saved model stores).

    Returns:
        A list of ``LayerLoss``, without layers whose loss is NaN (data-free RTN has none).
    """
    out = []
    for item in layers:
        name, rel = (item.name, item.rel_loss) if hasattr(item, "rel_loss") else item
        rel = float(rel)
        if not math.isfinite(rel):
            continue
        # The block index is the last integer component of the dotted name
        # ("model.layers.12.mlp.down_proj" -> 12); what follows it names the layer's kind.
        found = list(_BLOCK_INDEX.finditer(f".{name}."))
        if found:
            last = found[-1]
            block, kind = int(last.group(1)), f".{name}."[last.end():].strip(".")
        else:
            block, kind = -1, name
        out.append(LayerLoss(block, kind or name, rel))
    return out


def plot_layer_losses(layers, path=None, *, title: str | None = None, ax=None):
    """Draw relative loss (log scale) against block index, one line per layer kind.

    Args:
        layers: as for ``layer_losses``.
        path: where to write the picture (PNG, SVG, ... by suffix); None to only return it.
        title: the figure's title.
        ax: an existing matplotlib Axes to draw into (a new figure otherwise).

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: ``layers`` holds no finite relative loss (nothing to draw).
        ImportError: matplotlib is not installed.
    """
    points = layer_losses(layers)
    if not points:
        raise ValueError("layers: no layer has a finite relative loss to plot "
                         "(data-free RTN records none; quantize with calibration data)")
    try:
        # The Figure class, not pyplot: no global backend state is touched, so this works the
        # same headless (the CLI) and in a notebook (display(fig) shows it inline).
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e

    if ax is None:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    kinds = sorted({p.kind for p in points}, key=lambda k: _first_seen(points, k))
    for kind in kinds:
        mine = sorted((p.block, p.rel_loss) for p in points if p.kind == kind)
        xs, ys = zip(*mine)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=kind)
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)  # blocks are whole numbers
    ax.set_xlabel("block")
    ax.set_ylabel("relative layer loss")
    ax.set_title(title or "relative loss by block and layer type")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), dpi=120)
    return fig


def _first_seen(points, kind) -> int:
    """Keep layer kinds in model order (q before k before ... down) rather than alphabetical."""
    return next(i for i, p in enumerate(points) if p.kind == kind)
