"""The console line of a worker-group restart: which stage failed, which attempt starts, from which step."""

from __future__ import annotations

from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from vgim_dist.config import load_config
from vgim_dist.pipeline.restarts import restart_line, train_log_level

CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:2181: Connection reset by peer")


def _cfg(*more: str):
    return load_config("configs/smoke.yaml", ["run.runner=pipeline", "pipeline.stages=[[0], [1, 2, 3]]", *more])


def test_the_line_names_the_stage_that_died_not_the_neighbour_whose_link_closed():
    died = WorkerHealthCheckFailedError("health check failed", ActorDiedError())
    assert restart_line(_cfg(), {0: CLOSED, 1: died}, 1, 20, "/s/logs/train") == (
        "pipeline: stage 1 (rank 1) failed (ActorDiedError); attempt 2 of 4, resuming from step 20 "
        "(Ray's traceback: /s/logs/train)")
    # Ray's health check has not found it yet, but its process is gone: still stage 1.
    assert restart_line(_cfg(), {0: CLOSED}, 1, 20, "", dead=[1]) == (
        "pipeline: stage 1 (rank 1) failed (worker process died); attempt 2 of 4, resuming from step 20")
    # A fault the training function raised wins over the closed links it left behind.
    assert restart_line(_cfg(), {0: CLOSED, 1: OSError("no space left on device")}, 2, 10, "") == (
        "pipeline: stage 1 (rank 1) failed (OSError: no space left on device); attempt 3 of 4, resuming from step 10")


def test_the_last_allowed_failure_says_so_and_replicas_are_named():
    cfg = _cfg("pipeline.replicas=[2, 1]", "pipeline.max_failures=1")
    assert restart_line(cfg, {1: CLOSED}, 2, 20, "") == (
        "pipeline: stage 0 replica 1 (rank 1) failed (RuntimeError: [gloo/transport/tcp/pair.cc:538] Read error "
        "[127.0.0.1]:2181: Connection reset by peer); no restarts left (pipeline.max_failures = 1)")
    assert restart_line(_cfg("pipeline.max_failures=-1"), {0: CLOSED}, 7, 30, "").endswith(
        "attempt 8, resuming from step 30")


def test_ray_train_console_level_is_above_its_failure_records(monkeypatch):
    monkeypatch.delenv("VGIM_RAY_TRAIN_LOG_LEVEL", raising=False)
    assert train_log_level().log_level == "CRITICAL"
    monkeypatch.setenv("VGIM_RAY_TRAIN_LOG_LEVEL", "info")
    assert train_log_level().log_level == "INFO"
