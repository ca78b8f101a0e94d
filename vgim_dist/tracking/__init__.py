"""Experiment tracking in MLflow: `RunTracker` on the driver (``tracking.tracker``, which imports torch),
`StageLogger` wherever a stage trains. This package's top level stays light, so `vgim ui` starts fast."""

from vgim_dist.tracking.logger import StageLogger, StageRef, stage_metrics
from vgim_dist.tracking.server import embedded_uri

__all__ = ["StageLogger", "StageRef", "embedded_uri", "stage_metrics"]
