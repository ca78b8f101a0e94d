"""Ray started on this machine for one run, reachable from this machine only.

Three things would otherwise listen beyond localhost or be readable by other users (Ray 2.60, torch 2.11):

- Ray replaces a node address of 127.0.0.1 with the machine's outward one, and its servers (GCS, raylet, every
  worker and the driver, the dashboard agent, the runtime-env agent, the metrics exporter) then listen on every
  interface; unless Ray believes it runs on a single-machine platform (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0):
  then the node is 127.0.0.1 and each of them binds there.
- Ray Train's torch setup starts a TCP store on rank 0, which always listens on every interface: the workers
  meet through a file (torch's FileStore) instead, and gloo (NCCL on GPUs) uses the loopback interface.
- Ray writes its token file ``~/.ray/auth_token`` world-readable (0644) on the first local start with token
  authentication: it is created first, private (0600).

Each start also ends what an earlier local run killed outright left (its Ray, its rendezvous folder), and marks
its own Ray so that the next start can do the same (``leftovers.py``).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
from ray.train.torch import TorchConfig

from vgim_dist.pipeline import leftovers
from vgim_dist.ray_private import (
    TorchBackend,
    set_torch_distributed_env_vars,
    setup_torch_process_group,
    single_machine,
)

log = logging.getLogger(__name__)


@contextmanager
def local_only_ray() -> Iterator[FileStoreTorchConfig]:
    """Settings under which ``ray.init()`` starts a loopback-only Ray; yields the torch setup for its workers.
    Ray's processes inherit the environment when they start, so it only needs to hold until ``ray.init``
    returns; this process's copy of Ray's setting is restored on exit as well."""
    private_auth_token()
    leftovers.reap()    # the Ray and folder of a local run whose driver was killed outright
    loopback = loopback_interface()
    store = tempfile.TemporaryDirectory(prefix=leftovers.PREFIX)
    settings = {"GLOO_SOCKET_IFNAME": loopback, "NCCL_SOCKET_IFNAME": loopback, **leftovers.claim(store.name)}
    saved_env = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        with single_machine():
            yield FileStoreTorchConfig(store=store.name)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.cleanup()


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    raise RuntimeError("no network interface holds 127.0.0.1; cannot keep the local Ray on loopback")


def private_auth_token() -> None:
    """Ray's token file (``~/.ray/auth_token``, or RAY_AUTH_TOKEN_PATH) readable by its owner only: created
    before Ray would create it, or narrowed if it exists with wider permissions."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users; made it private (0600)", path)
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))   # what Ray itself generates: 256 random bits, hex


@dataclass
class FileStoreTorchConfig(TorchConfig):
    """Ray Train's torch setup with the workers meeting through a file under ``store`` (all on this machine)
    instead of a TCP store on rank 0."""

    store: str = ""

    @property
    def backend_cls(self):
        return _FileStoreBackend


class _FileStoreBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: FileStoreTorchConfig) -> None:
        # A new file per worker group: a group restarted after a failure must not meet in the old one's.
        url = f"file://{backend_config.store}/{uuid.uuid4().hex}"
        worker_group.execute(set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])
