"""The report's figures as a reader sees them: no text drawn over other text, no legend over a bar, and
feature histograms that show the data (one row per module, not a grid of mostly empty panels)."""

from __future__ import annotations

import itertools

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vgim_dist.eval import plots


@pytest.fixture
def drawn(monkeypatch) -> list[tuple[Figure, list]]:
    """Every figure the plot functions save, drawn once more on Agg, with the text boxes actually drawn."""
    figures: list[tuple[Figure, list]] = []
    save = plots._save

    def keep(fig, path):
        out = save(fig, path)
        renderer = FigureCanvasAgg(fig).get_renderer()
        texts, draw_text = [], renderer.draw_text

        def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
            if mtext is not None and s.strip():
                texts.append((s, mtext.get_window_extent(renderer)))
            return draw_text(gc, x, y, s, prop, angle, ismath, mtext)

        renderer.draw_text = record
        fig.draw(renderer)
        figures.append((fig, texts))
        return out

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _overlapping_text(texts: list) -> list[tuple[str, str]]:
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(texts, 2)
            if min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 1 and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 1]


def test_vowel_weight_titles_do_not_overlap(drawn, tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {m: torch.randn(3, 32, generator=g).tolist() for m in range(4)}
    plots.weight_heatmaps(weights, ["a", "i", "u"], tmp_path / "w.png",
                          "probe-vowels-standardized.syllables: channel x vowel")
    fig, texts = drawn[0]
    assert sum(t.startswith("module") for t, _ in texts) == 4
    assert not _overlapping_text(texts), _overlapping_text(texts)


def test_bar_chart_legend_covers_no_bar(drawn, tmp_path):
    table = {g: {m: (0.95 - 0.1 * m, 0.02) for m in range(4)} for g in ("V-GIM", "V-GIM step 0", "GIM", "GIM step 0")}
    plots.accuracy_by_module(table, tmp_path / "b.png", "probe-syllables", chance=1 / 9, majority=0.13,
                             hatched=("V-GIM step 0", "GIM step 0"))
    fig, texts = drawn[0]
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(r)
    bars = [p.get_window_extent(r) for p in ax.patches]
    assert len(bars) == 16 and not any(legend.overlaps(b) for b in bars)
    assert not _overlapping_text(texts), _overlapping_text(texts)


def test_histograms_one_row_per_module_with_visible_data(drawn, tmp_path):
    g = torch.Generator().manual_seed(0)
    features = {0: torch.randn(200, 64, generator=g), 1: 0.001 * torch.randn(200, 64, generator=g) + 0.3}
    plots.histograms(features, tmp_path / "h.png")
    fig, texts = drawn[0]
    assert len(fig.axes) == 4  # two panels per module, whatever the channel count
    for hist_ax, chan_ax in zip(fig.axes[::2], fig.axes[1::2]):
        lo, hi = hist_ax.get_ylim()
        visible = [p for p in hist_ax.patches if p.get_height() > 0]
        assert visible and all(lo <= min(p.get_height(), hi) for p in visible)
        assert len(chan_ax.lines[0].get_xdata()) == 64  # one point per channel
    assert not _overlapping_text(texts), _overlapping_text(texts)
