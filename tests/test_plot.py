"""The per-layer picture: names sorted into block and layer kind, a real PNG written."""
import math

import pytest

from decoupleq.plot import LayerLoss, layer_losses, plot_layer_losses


def test_names_are_sorted_into_block_and_kind():
    got = layer_losses([("model.layers.0.self_attn.q_proj", 0.1),
                        ("model.layers.12.mlp.down_proj", 0.3),
                        ("transformer.h.3.attn.c_attn", 0.2),
                        ("lm_head", 0.05),
                        ("model.layers.1.mlp.up_proj", math.nan)])
    assert got == [LayerLoss(0, "self_attn.q_proj", 0.1), LayerLoss(12, "mlp.down_proj", 0.3),
                   LayerLoss(3, "attn.c_attn", 0.2), LayerLoss(-1, "lm_head", 0.05)]


def test_picture_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    layers = [(f"model.layers.{b}.{k}", 0.01 * (b + 1) * (i + 1))
              for b in range(4) for i, k in enumerate(["self_attn.q_proj", "mlp.down_proj"])]
    path = tmp_path / "losses.png"
    fig = plot_layer_losses(layers, path, title="four blocks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["self_attn.q_proj", "mlp.down_proj"]
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert ax.get_yscale() == "log" and ax.get_title() == "four blocks"


def test_nothing_to_draw_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="layers: no layer has a finite relative loss"):
        plot_layer_losses([("model.layers.0.mlp.up_proj", math.nan)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
