"""What several test modules share (tests/ is on sys.path): fast settings, comparisons, replica runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from vgim_dist.config import load_config
from vgim_dist.data.source import NoiseSource
from vgim_dist.tracking.server import free_port  # noqa: F401 - the one free-port helper, package and tests
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.stage import Stage

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds per run, with every mechanism of the smoke config (4 modules, BatchNorm, GRU).
# Tracking (on by default) has its own tests; the rest train without it.
FAST = ["data.crop=2560", "data.batch_size=4", "run.log_every=2", "run.threads=1", "tracking.enabled=false"]

# The GPU tier (`pytest -m gpu`, benchmarks/gpu_check.py): a CPU proof parametrized over where it runs. Each
# placement names its config overrides; the CUDA ones are marked `gpu` and skip where too few GPUs are visible
# (conftest.py). `gpu_check.py --dry-run` sets VGIM_GPU_DRY_RUN=1: the gpu tests then run their code on the CPU.
GPU_DRY_RUN = os.environ.get("VGIM_GPU_DRY_RUN") == "1"
PLACEMENTS = {
    "cpu": [],
    "cuda": ["run.device=cuda"],                                      # one process, or a whole GPU per stage
    "cuda-shared": ["run.device=cuda", "pipeline.gpus_per_stage=0.5"],  # two stages on one GPU: host-staged link
}
GPUS_NEEDED = {"cpu": 0, "cuda": 1, "cuda-shared": 1, "cuda-2": 2}


def placements(*names: str) -> list:
    """pytest params for ``names``; "cuda-2" is "cuda" with a GPU per stage on two GPUs (NCCL between them)."""
    return [name if name == "cpu" else pytest.param(name, id=name, marks=pytest.mark.gpu(gpus=GPUS_NEEDED[name]))
            for name in names]


def on(placement: str) -> list[str]:
    """The config overrides of a placement (none in a GPU dry run: the same test on the CPU)."""
    if GPU_DRY_RUN:
        return []
    return PLACEMENTS["cuda" if placement == "cuda-2" else placement]


def expected_link(placement: str) -> str:
    """The transport channel between two stages of this placement (vgim_dist/pipeline/transport.py)."""
    return "staged" if placement == "cuda-shared" and not GPU_DRY_RUN else "default"


# Replica runs: a batch of 5 splits unevenly over 2 replicas.
REPLICA_STEPS = 20
REPLICA_OVERRIDES = ["data.crop=2560", "data.batch_size=5", "pipeline.stages=[]", "optim.lr=1e-3"]


def cfg_for(run_dir, *extra):
    """The smoke config, FAST, in ``run_dir``."""
    return load_config("configs/smoke.yaml", [*FAST, f"run.dir={run_dir}", *extra])


def small_run(run_dir, *extra) -> str:
    """A 3-step smoke run in ``run_dir`` (4 modules: BatchNorm, Gaussian heads, a GRU; one stage),
    checkpoints at steps 2 and 3; its directory."""
    from vgim_dist.launch import train  # the trainer's imports only for the tests that train
    train(cfg_for(run_dir, "run.steps=3", "checkpoint.every=2", "pipeline.stages=[]", *extra))
    return str(run_dir)


def noise_corpus(root: Path, lengths: list[int], seed: int = 0) -> Path:
    """A folder corpus (`vgim data prepare --format folder`) of one WAV per length, in samples: tones in
    noise, two speakers."""
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(n)
        (root / f"spk{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(root / f"spk{i % 2}" / f"utt{i:02d}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
    return root


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    """``vgim train configs/smoke.yaml ARGS`` in a new process."""
    return subprocess.run([sys.executable, "-m", "vgim_dist", "train", "configs/smoke.yaml", *args],
                          capture_output=True, text=True, **kw)


def final_state(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a local run's latest checkpoint: weights, buffers, optimizer moments, RNG states."""
    ckpt = CheckpointManager(str(run_dir))
    d = Path(ckpt.step_dir(ckpt.latest()))
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_replicas(tmp_path: Path, world: int, overrides: list[str], steps: int, resume_at: int = 0) -> list[dict]:
    """``world`` processes of tests/replica_worker.py on one gloo group; what each saved."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = tmp_path / "state"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "replica_worker.py"), str(r), str(world), init,
                               str(out), str(steps), str(resume_at), *overrides], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [load_file(f"{out}.{r}") for r in range(world)]


def replica_reference(steps: int, overrides: list[str]):
    """One unreplicated stage 0 on whole batches: its state, the last step's metrics, every step's output."""
    torch.set_num_threads(1)
    cfg = load_config("configs/smoke.yaml", overrides)
    stage = Stage(cfg, 0)
    source = NoiseSource(cfg.data, cfg.seed)
    outputs = []
    for step in range(steps):
        y, metrics = stage.train_step(source.batch(step))
        outputs.append(y)
    state = {k: v for pos in range(len(stage.module_ids)) for part in stage.module_state(pos)[:2]
             for k, v in part.items()}
    return state, metrics, outputs
