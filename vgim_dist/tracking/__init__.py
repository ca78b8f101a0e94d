"""Experiment tracking in MLflow: `RunTracker` on the driver, `StageLogger` wherever a stage trains."""

from vgim_dist.tracking.logger import StageLogger, StageRef, stage_metrics
from vgim_dist.tracking.server import embedded_uri

__all__ = ["RunTracker", "StageLogger", "StageRef", "embedded_uri", "stage_metrics", "tracking_uri"]


def __getattr__(name: str):
    # The driver side imports torch: loaded when first used, so that `vgim ui` and `vgim --help` start fast.
    if name in ("RunTracker", "tracking_uri"):
        from vgim_dist.tracking import tracker  # noqa: PLC0415

        return getattr(tracker, name)
    raise AttributeError(name)
