"""Loss curves of a run's metric rows, as matplotlib figures (no pyplot: no global backend state)."""

from __future__ import annotations

from typing import Any


def loss_figures(rows: list[dict]) -> dict[int, Any]:
    """One matplotlib figure per module: InfoNCE and total loss, and KL beside them when it is not all 0."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global backend state

    def curve(i: int, term: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[f"module.{i}.{term}"]) for r in rows if f"module.{i}.{term}" in r]
        return [s for s, _ in pts], [v for _, v in pts]

    modules = sorted({int(k.split(".")[1]) for r in rows for k in r if k.startswith("module.")})
    figures = {}
    for i in modules:
        kl = curve(i, "kl")
        fig = Figure(figsize=(9 if any(kl[1]) else 5, 3.5), layout="constrained")
        axes = fig.subplots(1, 2 if any(kl[1]) else 1, squeeze=False)[0]
        for term in ("nce", "loss"):
            axes[0].plot(*curve(i, term), label=term)
        axes[0].legend()
        if any(kl[1]):
            axes[1].plot(*kl, color="tab:green", label="kl")
            axes[1].legend()
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"module {i}")
        figures[i] = fig
    return figures
