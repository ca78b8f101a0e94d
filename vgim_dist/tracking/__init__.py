"""Experiment tracking in MLflow: `RunTracker` on the driver, `StageLogger` wherever a stage trains."""

from vgim_dist.tracking.logger import StageLogger, StageRef, stage_metrics
from vgim_dist.tracking.tracker import RunTracker, embedded_uri, tracking_uri

__all__ = ["RunTracker", "StageLogger", "StageRef", "embedded_uri", "stage_metrics", "tracking_uri"]
