"""Joining a Ray cluster, or starting a private Ray on this machine, for work outside the training pipeline
(the pipeline's own local Ray, with its torch setup, is ``pipeline/local.py``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import ray_constants

# Ray's own lines when it starts on this machine, which the caller says instead: its start line (colour codes
# that end up in log files) and its token-authentication warning (the token is this user's, and private).
_START_LINES = {"ray._private.worker": logging.WARNING,
                "ray._private.authentication.authentication_token_setup": logging.ERROR}


@contextmanager
def quiet_local_start() -> Iterator[None]:
    """Ray's start lines held back while a local Ray starts."""
    saved = {name: logging.getLogger(name).level for name in _START_LINES}
    for name, level in _START_LINES.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (default: RAY_ADDRESS, which a ``ray job submit`` driver has), else
    start a private Ray here with ``num_cpus`` CPUs (default all), never attaching to another Ray session by
    chance, every server bound to 127.0.0.1: Ray binds every interface unless it believes it runs on a
    single-machine platform, so it is told so while it starts. True when this call connected (the caller
    shuts down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return True
    saved_env, saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"     # read by Ray's processes as they start
    ray_constants.ENABLE_RAY_CLUSTER = False                        # read by this process at import
    try:
        with quiet_local_start():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env
    return True
