"""Joining a Ray cluster, or starting a private Ray on this machine, for work outside the training pipeline
(the pipeline's own local Ray, with its torch setup, is ``pipeline/local.py``)."""

from __future__ import annotations

import os

import ray

from vgim_dist.ray_private import quiet_start as quiet_local_start, single_machine

__all__ = ["connect", "quiet_local_start"]


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
    with single_machine(), quiet_local_start():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True
