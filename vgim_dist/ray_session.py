"""Joining a Ray cluster, or starting Ray on this machine: the one place the project calls ``ray.init``."""

from __future__ import annotations

import os

import ray


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (default: RAY_ADDRESS, which a ``ray job submit`` driver has), else
    start a private Ray on this machine that listens on 127.0.0.1 only (``num_cpus``: its CPUs, default all).
    Never attaches to another Ray session by chance. True when this call connected (the caller shuts down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus)
    return True
