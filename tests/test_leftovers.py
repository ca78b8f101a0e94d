"""A local run whose driver is killed outright: the next local start ends its Ray and removes its folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vgim_dist.pipeline import leftovers

ROOT = Path(__file__).parents[1]
DRIVER = """
import ray, sys, time
from vgim_dist.pipeline.local import local_only_ray
with local_only_ray() as torch_config:
    ray.init(address="local", num_cpus=1)
    print(torch_config.store, flush=True)
    time.sleep(600)
"""
START_AGAIN = "from vgim_dist.pipeline.local import local_only_ray\nwith local_only_ray():\n    pass\n"


def test_only_folders_of_gone_drivers_are_reaped(tmp_path):
    live, gone, unowned = (tmp_path / f"{leftovers.PREFIX}{n}" for n in ("live", "gone", "unowned"))
    for d in (live, gone, unowned):
        d.mkdir()
    leftovers.claim(str(live))                                      # this process: alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (gone / leftovers.OWNER).write_text(json.dumps({"pid": dead.pid, "started": time.time() - 5}))
    assert leftovers.reap(str(tmp_path)) == [str(gone)]
    assert live.exists() and unowned.exists() and not gone.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_drivers_ray_is_ended_at_the_next_start():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        store = driver.stdout.readline().strip()
        assert store and Path(store, leftovers.OWNER).exists(), "the driver did not start Ray"
        before = leftovers.session_processes(store)
        names = " ".join(p.name() for p in before)
        assert "gcs_server" in names and "raylet" in names, names
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(1)
    orphans = leftovers.session_processes(store)
    assert orphans, "nothing of the killed run's Ray outlived its driver: the test shows nothing"
    # The next local start, at once: the killed run's Ray is ended, its folder removed.
    subprocess.run([sys.executable, "-c", START_AGAIN], cwd=ROOT, env=env, check=True, timeout=120)
    assert not Path(store).exists()
    left = [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left and not leftovers.session_processes(store), [p.cmdline()[:2] for p in left]
