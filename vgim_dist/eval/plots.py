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


def histograms(x: torch.Tensor, path: Path, channels: int = 16, title: str = "") -> Path:
    """Histograms of the first ``channels`` channels of (N, C) features against the N(0, 1) density."""
    n = min(channels, x.shape[1])
    cols = 4
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    grid = np.linspace(-4, 4, 200)
    normal = np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)
    for c, ax in enumerate(axes):
        if c >= n:
            ax.set_axis_off()
            continue
        ax.hist(x[:, c].numpy(), bins=30, density=True, color="tab:blue", alpha=0.7)
        ax.plot(grid, normal, color="black", lw=1)
        ax.set_title(f"channel {c}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "time-averaged features per channel vs N(0, 1)")
    return _save(fig, path)


def weight_heatmap(weight: list[list[float]], classes: list[str], path: Path, title: str = "") -> Path:
    """A probe's weights as channel x class: which channel votes for which class (e.g. vowel)."""
    w = np.array(weight).T                                                  # (C, classes)
    fig = Figure(figsize=(1.2 + 0.6 * len(classes), 1.5 + 0.12 * len(w)), layout="constrained")
    ax = fig.subplots()
    lim = np.abs(w).max() or 1.0
    im = ax.imshow(w, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylabel("channel")
    fig.colorbar(im, ax=ax)
    ax.set_title(title or "probe weights")
    return _save(fig, path)


def accuracy_by_module(table: dict[str, dict[int, tuple[float, float]]], path: Path, title: str,
                       chance: float | None = None) -> Path:
    """Grouped bars: accuracy (mean, std) per module, one bar per run or group of runs."""
    modules = sorted({m for row in table.values() for m in row})
    fig = Figure(figsize=(1.5 + 1.3 * len(modules) * max(1, len(table)) / 2, 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    for j, (label, row) in enumerate(table.items()):
        xs = [modules.index(m) + j * width for m in row]
        ax.bar(xs, [v[0] for v in row.values()], width, yerr=[v[1] for v in row.values()], capsize=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(modules))], [f"module {m}" for m in modules])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
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
    ax.legend(fontsize=7)
    ax.set_title(title)
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
