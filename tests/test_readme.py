"""The README's "Running a real experiment" section, run as a user runs it: every command in order, verbatim
but for the one substitution the README documents for a laptop (the GPU-scale configs swapped for their
``-laptop`` variants), with ``vgim`` on the PATH, from a new folder that holds only a copy of ``configs/``.
Relative run.dir and data.uri end up where the user asked, and the Ray the pipeline starts on this machine
listens on 127.0.0.1 only, with a private token."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from vgim_dist.config import load_config
from vgim_dist.train.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
LAPTOP = {"configs/vgim.yaml": "configs/vgim-laptop.yaml", "configs/gim.yaml": "configs/gim-laptop.yaml"}


def readme_section() -> list[str]:
    """The commands of the README's real-experiment section, in order, with the laptop substitution."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running a real experiment"):]
    opening = section.index("```bash\n") + len("```bash\n")
    block = section[opening:section.index("\n```", opening)]
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for large, small in LAPTOP.items():
        assert large.split("/")[1].removesuffix(".yaml") + "-laptop.yaml" in section   # the README says so
        commands = [c.replace(large, small) for c in commands]
    return commands


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
    done: dict[str, subprocess.CompletedProcess]     # command -> what it printed and returned, in order
    listening: Listening                              # sockets of the pipeline run's processes
    ui_page: str                                      # what `vgim ui`'s address served

    def find(self, needle: str) -> subprocess.CompletedProcess:
        found = [p for c, p in self.done.items() if needle in c]
        assert len(found) == 1, (needle, list(self.done))
        return found[0]


def _ui(command: str, work: Path, env: dict) -> tuple[subprocess.CompletedProcess, str]:
    """``vgim ui`` serves until Ctrl-C: wait for its address, fetch it, then press Ctrl-C."""
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    page = ""
    match = re.search(r"MLflow UI at (http://127\.0\.0\.1:\d+)(\S*)", line)
    if match:
        with urllib.request.urlopen(match.group(1) + "/", timeout=60) as r:
            page = r.read().decode()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err), page


@pytest.fixture(scope="module")
def readme_run():
    work = Path(tempfile.mkdtemp(prefix="vgim-readme-"))   # short: Ray's socket paths live under it
    shutil.copytree(ROOT / "configs", work / "configs")
    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR", "VGIM_CACHE", "MLFLOW_TRACKING"))}
    # What `source .venv/bin/activate` does: vgim on the PATH.
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", VIRTUAL_ENV=str(Path(sys.executable).parents[1]),
               HOME=str(home), RAY_TMPDIR=str(work / "r"), RAY_USAGE_STATS_ENABLED="0")
    done, listening, ui_page = {}, Listening(), ""
    for command in readme_section():
        if command.startswith("vgim ui "):
            done[command], ui_page = _ui(command, work, env)
            continue
        proc = subprocess.Popen(["bash", "-c", command], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        stop = threading.Event()
        sampler = None
        if "run.runner=pipeline" in command:
            def sample(proc=proc, stop=stop) -> None:
                while not stop.wait(0.3):
                    listening.sample(proc.pid, str(work / "r"))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        t = time.monotonic()
        out, err = proc.communicate(timeout=600)
        stop.set()
        if sampler:
            sampler.join()
        done[command] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        print(f"{time.monotonic() - t:6.1f} s  {command}", file=sys.stderr)
        if proc.returncode:
            break   # the rest depends on it; test_every_command_runs_in_order names it
    yield ReadmeRun(work, home, done, listening, ui_page)
    shutil.rmtree(work, ignore_errors=True)


def test_every_command_runs_in_order(readme_run):
    commands = readme_section()
    assert len(commands) >= 12
    for command in commands:
        assert command in readme_run.done, f"not reached: {command}"
        proc = readme_run.done[command]
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


def test_the_corpus_has_both_splits_and_training_speaks_at_once(readme_run):
    prepared = json.loads(readme_run.find("data prepare").stdout.strip().splitlines()[-1])
    assert set(prepared["utterances"]) == {"train", "test"}, prepared
    first = next(p for c, p in readme_run.done.items() if "runs/vgim-1" in c and "train" in c and "--resume" not in c)
    lines = first.stderr.splitlines()
    assert any(re.match(r"step 1/100 took [\d.]+ s", line) for line in lines), first.stderr[-2000:]


def test_relative_paths_end_where_the_user_asked(readme_run):
    run = readme_run
    for name, steps in (("vgim-1", [50, 100]), ("vgim-2", [50, 100]), ("gim-1", [50, 100])):
        run_dir = run.work / "runs" / name
        assert CheckpointManager(str(run_dir)).steps() == steps, name
        cfg = load_config(run_dir / "config.yaml")   # what every process used: absolute paths
        assert cfg.run.dir == str(run_dir) and cfg.data.uri == str(run.work / "data/librispeech-shards")
    pipeline = run.work / "runs/vgim-2"
    assert sorted(p.name for p in (pipeline / "workers").iterdir()) == ["stage-0.json", "stage-1.json"]
    assert load_config(pipeline / "config.yaml").run.runner == "pipeline"
    # Nothing went to Ray's session folder.
    assert not [p for p in (run.work / "r").rglob("*") if p.name in ("checkpoints", "metrics.jsonl")]


def test_evaluations_land_in_the_run_and_the_ui_serves_them(readme_run):
    run = readme_run
    probe = json.loads(run.find("eval probe").stdout.strip().splitlines()[-1])
    assert probe["task"] == "speakers" and set(probe["accuracy"]) == {"0", "1", "2", "3"}
    decoder = json.loads(run.find("eval decoder").stdout.strip().splitlines()[-1])
    assert decoder["module"] == 2 and decoder["test_loss"] > 0
    report = run.find("vgim report").stdout.strip().splitlines()[-1]
    assert Path(report.split()[-1]).suffix == ".html" or report.endswith(".html"), report
    assert "MLflow UI at http://127.0.0.1:" in run.find("vgim ui").stdout and "<html" in run.ui_page.lower()


def test_embedded_ray_listens_on_loopback_only(readme_run):
    run = readme_run
    names = {name for name, _, _ in run.listening.sockets}
    # The sample saw the run's servers, not an empty list: the GCS, the raylet and a training worker.
    assert {"gcs_server", "raylet"} <= names and any("RayTrainWorker" in n for n in names), names
    assert run.listening.beyond_loopback() == []


def test_ray_token_is_private(readme_run):
    token = readme_run.home / ".ray" / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert token.stat().st_mode & 0o777 == 0o600
