"""Every use of Ray's private API, in one place. These names move between Ray releases (this is written
against Ray 2.60); ``tests/test_ray_private.py`` fails, naming what moved, when an upgrade breaks one. Public
API is used instead wherever Ray has one: ``ray.train.ControllerError`` is public, re-exported here only so
that the runner catches the startup errors below from one import.

- The single-machine switch (``ray._private.ray_constants``): Ray binds every interface unless it believes
  it runs on a single-machine platform; `single_machine` tells it so while a local Ray starts.
- Ray Train's torch setup steps (``ray.train.torch.config``): a backend whose workers meet through a file
  instead of a TCP store reuses them (pipeline/local.py).
- The worker-group startup errors (``ray.train.v2._internal.exceptions``), which the controller wraps in a
  public ``ControllerError``: a group that found no room (re-plan) or failed while starting (start again).
- The loggers of Ray's start lines, which a local start holds back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ray._private import ray_constants
from ray.train import ControllerError
from ray.train.torch.config import (
    _set_torch_distributed_env_vars as set_torch_distributed_env_vars,
    _setup_torch_process_group as setup_torch_process_group,
    _TorchBackend as TorchBackend,
)
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

__all__ = ["ControllerError", "TorchBackend", "WorkerGroupStartupFailedError", "WorkerGroupStartupTimeoutError",
           "quiet_start", "set_torch_distributed_env_vars", "setup_torch_process_group", "single_machine"]

# Ray's own lines when it starts on this machine, which the caller says instead: its start line (colour codes
# that end up in log files) and its token-authentication warning (the token is this user's, and private).
START_LOGGERS = {"ray._private.worker": logging.WARNING,
                 "ray._private.authentication.authentication_token_setup": logging.ERROR}


@contextmanager
def single_machine() -> Iterator[None]:
    """Ray told it runs on a single-machine platform, so that a Ray started meanwhile binds 127.0.0.1 only:
    the variable its processes read as they start, and this process's copy, read when it imported Ray."""
    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved_env


@contextmanager
def quiet_start() -> Iterator[None]:
    """Ray's start lines held back while a local Ray starts."""
    saved = {name: logging.getLogger(name).level for name in START_LOGGERS}
    for name, level in START_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
