"""What a local pipeline run killed outright (SIGKILL, a lost terminal) leaves behind, found and removed at the
next local start.

A driver that dies without running its exit code leaves the Ray it started: the dashboard, its agents and the
runtime-env agent go on for minutes, holding loopback ports, and the workers' rendezvous folder
(``<tmp>/vgim-torch-store-*``) stays. So every local start marks its Ray: the folder holds ``owner.json`` (the
driver's pid and start time), and every process of that Ray carries the folder's path in its environment
(``VGIM_RAY_OWNER``, set while Ray starts; Ray's processes inherit it, and its workers inherit it from the
raylet). The next local start looks at each such folder of this user: one whose driver is gone has its
processes (this user's, carrying that exact path; never another user's Ray, nor a Ray of a run still alive)
terminated, then killed after a grace period, and the folder removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
PREFIX = "vgim-torch-store-"
OWNER = "owner.json"
ENV = "VGIM_RAY_OWNER"
GRACE_S = 5.0


def claim(folder: str) -> dict[str, str]:
    """Record this process as the owner of ``folder``; the environment Ray's processes must start with."""
    me = psutil.Process()
    Path(folder, OWNER).write_text(json.dumps({"pid": me.pid, "started": me.create_time(), "folder": folder}))
    return {ENV: folder}


def owner_alive(folder: Path) -> bool | None:
    """Whether the driver that made ``folder`` still runs; None when the folder holds no owner record."""
    try:
        owner = json.loads((folder / OWNER).read_text())
        proc = psutil.Process(owner["pid"])
        return abs(proc.create_time() - owner["started"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except psutil.Error:   # gone (or, after a reboot, another process under its pid)
        return False


def session_processes(folder: str) -> list[psutil.Process]:
    """This user's live processes started with ``VGIM_RAY_OWNER=<folder>``: the Ray of that run."""
    found, uid = [], os.getuid()
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != uid or proc.pid == os.getpid():
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(ENV) == folder:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap(tmp: str | None = None) -> list[str]:
    """End the Ray of every local run of this user whose driver is gone and remove its folder; the folders."""
    cleaned = []
    for folder in sorted(Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        try:
            if not folder.is_dir() or folder.stat().st_uid != os.getuid() or owner_alive(folder) is not False:
                continue
        except OSError:
            continue
        procs, who = session_processes(str(folder)), _when(folder)
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=GRACE_S)
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("Ray: ended %d processes of an earlier local run whose driver is gone (%s), removed %s",
                    len(procs), who, folder)
        cleaned.append(str(folder))
    return cleaned


def _when(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER).read_text())
        return f"pid {owner['pid']}, started {time.strftime('%H:%M:%S', time.localtime(owner['started']))}"
    except (OSError, ValueError, KeyError):
        return "unknown driver"
