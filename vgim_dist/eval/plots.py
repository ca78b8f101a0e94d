"""PNG figures of an evaluation. Each function draws one figure from arrays and writes it to ``path``.

matplotlib's object API only (no pyplot): no global backend or figure state, safe in any process.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from vgim_dist.tracking.figures import loss_figures

DPI = 90


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def tsne(features: dict[int, torch.Tensor], labels: list[str], classes: list[str], path: Path, seed: int = 0,
         title: str = "") -> Path:
    """One t-SNE panel per module of time-averaged features (N, C), points coloured by class."""
    from sklearn.manifold import TSNE  # noqa: PLC0415 - slow import, only for this plot

    fig = Figure(figsize=(4.2 * len(features) + 1.2, 4), layout="constrained")
    axes = fig.subplots(1, len(features), squeeze=False)[0]
    y = np.array([classes.index(label) for label in labels])
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for ax, (m, x) in zip(axes, features.items()):
        perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < N
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.double().numpy())
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, s=9)
        ax.set_title(f"module {m}")
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(sc, ax=axes, ticks=range(len(classes)))
    cbar.ax.set_yticklabels(classes)
    fig.suptitle(title or "t-SNE of time-averaged features")
    return _save(fig, path)


def histograms(features: dict[int, torch.Tensor], path: Path, title: str = "") -> Path:
    """Per module (one row): all channels' values of (N, C) features pooled into one histogram against the
    N(0, 1) density, and each channel's mean and std, which the pooled histogram can hide."""
    fig = Figure(figsize=(10, 2.4 * len(features) + 0.5), layout="constrained")
    axes = fig.subplots(len(features), 2, squeeze=False, width_ratios=(1, 1.6))
    for (hist_ax, chan_ax), (m, x) in zip(axes, features.items()):
        v = x.flatten().numpy()
        lo, hi = min(-4.0, float(np.percentile(v, 0.5))), max(4.0, float(np.percentile(v, 99.5)))
        grid = np.linspace(lo, hi, 300)
        heights, _, _ = hist_ax.hist(v, bins=np.linspace(lo, hi, 61), density=True, color="tab:blue", alpha=0.7,
                                     label="features")
        top = 5 * 0.4  # five times N(0, 1)'s peak: collapsed features show as a clipped spike, the curve stays visible
        if heights.max() > top:
            hist_ax.set_ylim(0, top * 1.1)
            hist_ax.text(0.98, 0.95, f"peak {heights.max():.0f} (clipped)", transform=hist_ax.transAxes, ha="right",
                         va="top", fontsize=7)
        hist_ax.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), color="black", lw=1, label="N(0, 1)")
        hist_ax.set_title(f"module {m}: all {x.shape[1]} channels", fontsize=9)
        hist_ax.legend(fontsize=7, loc="upper left", frameon=False)
        mean, std = x.mean(dim=0).numpy(), x.std(dim=0).numpy()
        chan_ax.errorbar(np.arange(len(mean)), mean, yerr=std, fmt="o", ms=2, lw=0.8, capsize=0)
        for y in (-1, 0, 1):
            chan_ax.axhline(y, color="gray", lw=0.6, ls="-" if y == 0 else "--")
        chan_ax.set_title(f"module {m}: mean ± std per channel (N(0, 1): 0 ± 1)", fontsize=9)
        chan_ax.set_xlabel("channel", fontsize=8)
        for ax in (hist_ax, chan_ax):
            ax.tick_params(labelsize=7)
    fig.suptitle(title or "time-averaged test features vs N(0, 1)", fontsize=10)
    return _save(fig, path)


def weight_heatmaps(weights: dict[int, list[list[float]]], classes: list[str], path: Path, title: str = "") -> Path:
    """Probe weights as channel x class, one panel per module: which channel votes for which class (vowel)."""
    fig = Figure(figsize=(1.6 + 2.2 * len(weights), 1.6 + 0.1 * max(len(w[0]) for w in weights.values())),
                 layout="constrained")
    axes = fig.subplots(1, len(weights), squeeze=False)[0]
    for ax, (m, weight) in zip(axes, weights.items()):
        w = np.array(weight).T                                              # (C, classes)
        lim = np.abs(w).max() or 1.0
        im = ax.imshow(w, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylabel("channel", fontsize=8)
        ax.set_title(f"module {m}", fontsize=9)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title or "probe weights, channel x class", fontsize=9)
    return _save(fig, path)


def accuracy_by_module(table: dict[str, dict[int, tuple[float, float]]], path: Path, title: str,
                       chance: float | None = None, majority: float | None = None,
                       hatched: tuple[str, ...] = ()) -> Path:
    """Grouped bars: accuracy (mean, std) per module, one bar per run or group of runs (``hatched`` ones, such
    as step-0 baselines, drawn lighter). The legend sits outside the axes, so it never covers a bar."""
    modules = sorted({m for row in table.values() for m in row})
    fig = Figure(figsize=(3.5 + 0.35 * len(modules) * max(1, len(table)), 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    for j, (label, row) in enumerate(table.items()):
        xs = [modules.index(m) + j * width for m in row]
        style = {"hatch": "//", "alpha": 0.45} if label in hatched else {}
        ax.bar(xs, [v[0] for v in row.values()], width, yerr=[v[1] for v in row.values()], capsize=3, label=label,
               **style)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance (uniform)")
    if majority is not None and majority != chance:
        ax.axhline(majority, color="gray", ls=":", lw=1, label="majority class")
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(modules))], [f"module {m}" for m in modules])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def probe_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Probe accuracy against the training step (from step 0), one line per module."""
    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("probe accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def metric_by_value(curves: dict[str, list[tuple[str, float, float]]], path: Path, title: str, xlabel: str) -> Path:
    """Accuracy (mean ± std) against a swept key's values, in the sweep's order, one line per module."""
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for label, points in curves.items():
        ax.errorbar(range(len(points)), [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                    label=label)
    ticks = next(iter(curves.values()), [])
    ax.set_xticks(range(len(ticks)), [p[0] for p in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def few_label_curves(curves: dict[str, dict[str, tuple[float, float]]], path: Path, title: str) -> Path:
    """Accuracy against labelled examples per class (log2 axis), one line per run/module."""
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for label, curve in curves.items():
        ns = [int(n) for n in curve]
        ax.errorbar(ns, [v[0] for v in curve.values()], yerr=[v[1] for v in curve.values()], marker="o",
                    capsize=2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def spectrograms(pairs: list[tuple[str, np.ndarray, np.ndarray]], path: Path, sample_rate: int = 16000) -> Path:
    """Original (left) and reconstruction (right) log spectrograms, one row per clip."""
    fig = Figure(figsize=(8, 2.2 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (name, original, recon) in zip(axes, pairs):
        for ax, x, kind in zip(row, (original, recon), ("original", "reconstruction")):
            ax.specgram(x, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma", vmin=-140)
            ax.set_title(f"{name}: {kind}", fontsize=8)
            ax.tick_params(labelsize=7)
    return _save(fig, path)


def decoder_curve(curve: list[dict], path: Path, title: str) -> Path:
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["step"] for r in curve], [r["loss"] for r in curve])
    ax.set_yscale("log")
    ax.set_xlabel("decoder step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def training_curves(rows: list[dict], out_dir: Path) -> list[Path]:
    """The training run's per-module loss curves (rows of ``metrics.jsonl``), one PNG per module; the
    same figures the tracker logs to MLflow."""
    return [_save(fig, out_dir / f"loss-module-{i}.png") for i, fig in loss_figures(rows).items()]
