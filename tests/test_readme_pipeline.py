"""The README's pipeline command, verbatim, from a fresh working directory: relative run.dir and data.uri end up
where the user asked, and the Ray it starts on this machine listens on 127.0.0.1 only, with a private token."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from vgim_dist.config import load_config
from vgim_dist.train.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def readme_command(needle: str) -> str:
    """The README's command line containing ``needle``."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith(".venv/bin/vgim ") and needle in line]
    assert len(lines) == 1, lines
    return lines[0]


@dataclass
class Listening:
    """Sockets that processes of a live run accept connections or datagrams on: (process name, address, port)."""

    sockets: set[tuple[str, str, int]] = field(default_factory=set)

    def sample(self, root: int, marker: str) -> None:
        """The process tree under ``root`` and every process whose command line names ``marker``."""
        procs = []
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if marker in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        for p in procs:
            try:
                name = p.name()
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.type.name == "SOCK_DGRAM" and c.laddr):
                        self.sockets.add((name, c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def beyond_loopback(self) -> list[tuple[str, str, int]]:
        def loopback(ip: str) -> bool:
            a = ipaddress.ip_address(ip.split("%")[0])
            return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)
        return sorted(s for s in self.sockets if not loopback(s[1]))


@dataclass
class ReadmeRun:
    work: Path
    home: Path
    proc: subprocess.CompletedProcess
    listening: Listening


@pytest.fixture(scope="module")
def readme_run(librispeech_dir):
    """The README's data and pipeline commands from a new working directory holding ``.venv`` and a
    ``configs/vgim.yaml`` (the shipped one, narrowed to a CPU run of seconds; its run.dir and data.uri are the
    shipped relative paths). Ray starts embedded; HOME and Ray's temporary folder are the test's own."""
    work = Path(tempfile.mkdtemp(prefix="vgim-readme-"))   # short: Ray's socket paths live under it
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (work / "configs").mkdir()
    tree = yaml.safe_load((ROOT / "configs/vgim.yaml").read_text())
    assert not Path(tree["run"]["dir"]).is_absolute() and not Path(tree["data"]["uri"]).is_absolute()
    tree["run"].update(steps=4, device="cpu", log_every=2)
    tree["data"].update(crop=2560, batch_size=4)
    tree["model"]["channels"] = 32
    tree["model"]["modules"][-1]["autoregressor"] = 32
    tree["checkpoint"] = {"every": 2}
    (work / "configs/vgim.yaml").write_text(yaml.safe_dump(tree))

    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR", "VGIM_CACHE"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(work / "r"), RAY_USAGE_STATS_ENABLED="0")
    prepare = readme_command("data prepare").replace("/data/LibriSpeech/train-clean-100", str(librispeech_dir))
    done = subprocess.run(["bash", "-c", prepare], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    listening = Listening()
    proc = subprocess.Popen(["bash", "-c", readme_command("run.runner=pipeline")], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.3):
            listening.sample(proc.pid, str(work / "r"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=540)
    stop.set()
    sampler.join()
    yield ReadmeRun(work, home, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), listening)
    shutil.rmtree(work, ignore_errors=True)


def test_relative_paths_end_where_the_user_asked(readme_run):
    run = readme_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run_dir = run.work / "runs/vgim"
    assert json.loads(run.proc.stdout.strip().splitlines()[-1]) == {"run_dir": str(run_dir), "steps": 4}
    assert CheckpointManager(str(run_dir)).steps() == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["step"] == 4 and summary["threads"] == 1
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert sorted(p.name for p in (run_dir / "workers").iterdir()) == ["stage-0.json", "stage-1.json"]
    # config.yaml records what every process used: absolute paths, the thread count.
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.run.dir == str(run_dir) and cfg.data.uri == str(run.work / "data/librispeech-shards")
    assert cfg.run.threads == 1
    # Nothing went to Ray's session folder.
    assert not [p for p in (run.work / "r").rglob("*") if p.name in ("checkpoints", "metrics.jsonl")]


def test_embedded_ray_listens_on_loopback_only(readme_run):
    run = readme_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    names = {name for name, _, _ in run.listening.sockets}
    # The sample saw the run's servers, not an empty list: the GCS, the raylet and a training worker.
    assert {"gcs_server", "raylet"} <= names and any("RayTrainWorker" in n for n in names), names
    assert run.listening.beyond_loopback() == []


def test_ray_token_is_private(readme_run):
    token = readme_run.home / ".ray" / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert token.stat().st_mode & 0o777 == 0o600
