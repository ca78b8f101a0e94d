"""Shared fixtures: a real S3 endpoint over HTTP (moto's server) and small synthetic speech corpora."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from vgim_dist.data.synth import synth_deboer, synth_librispeech

from helpers import GPU_DRY_RUN, free_port

pytest_plugins = ["mlflow_fixtures"]  # the MLflow server fixture (tests/ is on sys.path)

# One authentication mode for every Ray this test process joins. A Python process keeps the token state of the
# first Ray it used with token authentication, and a later join of a cluster without it then fails (its actors
# are cancelled before they start). In-process runs here start local Rays and join test clusters started
# without tokens, so the suite uses none; the token path, the default, runs in `vgim` subprocesses whose
# environment drops this setting (tests/test_readme.py: a private token file, a loopback-only Ray).
os.environ["RAY_AUTH_MODE"] = "disabled"

# DeepSpeed JIT-compiles a C++ op on first use: cache it in the repository's ignored build folder.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions"))


# Deterministic cuBLAS (run.deterministic) needs this before the first cuBLAS call, also in this process, where
# reference runs train.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (`gpu(gpus=N)`: N GPUs) skip where fewer CUDA devices are visible. In a GPU dry run
    (VGIM_GPU_DRY_RUN=1) they run on the CPU, except those that need two GPUs (their CPU run is the `cpu` one)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is None:
            continue
        need = mark.kwargs.get("gpus", 1)
        if GPU_DRY_RUN and need > 1:
            item.add_marker(pytest.mark.skip(reason=f"GPU dry run: needs {need} GPUs, the same code runs as `cpu`"))
        elif not GPU_DRY_RUN and visible < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), {visible} visible"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1, with dummy AWS credentials set for the whole session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {url}") from None
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def librispeech_dir(tmp_path_factory) -> Path:
    """3 espeak-ng speakers x 6 sentences in the LibriSpeech layout, with CPC-style split files."""
    root = tmp_path_factory.mktemp("librispeech")
    synth_librispeech(root, speakers=3, utterances=6, seed=0)
    return root


@pytest.fixture(scope="session")
def deboer_dir(tmp_path_factory) -> Path:
    """12 words x 2 takes, one voice, in the de Boer layout."""
    root = tmp_path_factory.mktemp("deboer")
    synth_deboer(root, words=12, voices_n=1, takes=2, seed=0)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A 1.4 MB tmpfs: room for the run files and one smoke checkpoint (about 0.95 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
