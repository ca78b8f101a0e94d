"""Measuring what the planner needs: each module's training-step time on the device it will run on, at every
thread count a worker may use and at the full and half batch; the bytes it sends on; its peak memory.

A module is timed on its real input (the previous modules' output for a batch of the run's shape), with its
own optimizer, exactly the step a stage takes: forward, backward, optimizer. The median of ``steps`` steps
after ``warmup`` counts. Profiles are cached per (config, device, batch shape) under ``<run.dir>/plan/``.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import logging
import os
import statistics
import threading
import time

import torch

from vgim_dist.config import Config, to_dict
from vgim_dist.data.source import NoiseSource
from vgim_dist.plan.planner import ModuleProfile, Profile, Timing
from vgim_dist.progress import progress
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import write_bytes
from vgim_dist.train.stage import Stage

log = logging.getLogger(__name__)


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def profile_key(cfg: Config, device: torch.device) -> str:
    """What a profile depends on: the model, optimizer and precision, the device kind, the batch shape."""
    parts = {"model": to_dict(cfg.model), "optim": to_dict(cfg.optim), "stage": to_dict(cfg.stage),
             "precision": cfg.run.precision, "device": device_name(device),
             "batch": [cfg.data.batch_size, cfg.data.crop]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class RssPeak:
    """Peak resident memory of this process while in the block, sampled every ``interval`` seconds, minus
    the resident memory on entry (after handing freed heap memory back to the kernel)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> RssPeak:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


class CudaPeak:
    """Peak CUDA allocator memory while in the block, minus what was allocated on entry."""

    def __init__(self, device: torch.device):
        self.device, self.growth = device, 0

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.growth = torch.cuda.max_memory_allocated(self.device) - self.base


class _NoPeak:
    growth = 0

    def __enter__(self) -> _NoPeak:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _peak_memory(device: torch.device, measure: bool = True) -> CudaPeak | RssPeak | _NoPeak:
    if not measure:
        return _NoPeak()
    return CudaPeak(device) if device.type == "cuda" else RssPeak()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_config(cfg: Config) -> Config:
    """``cfg`` with one stage per module and no replicas, so that each module is built and timed on its own."""
    c = copy.deepcopy(cfg)
    c.pipeline.stages, c.pipeline.replicas = [[i] for i in range(len(cfg.model.modules))], []
    return c


def profile_modules(cfg: Config, device: torch.device | str = "cpu", threads: list[int] | None = None,
                    warmup: int = 1, steps: int = 3) -> Profile:
    """Measure every module of ``cfg`` at the run's batch shape on ``device``.

    CPU: at each thread count in ``threads`` (default 1 and every core of this host); GPU: one setting.
    Rows: the full batch and half of it (what a replica of a 2-replica stage holds); the planner
    interpolates between them.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    cores = host_cores()
    threads = threads or ([1] if device.type == "cuda" else sorted({1, cores}))
    mc = _module_config(cfg)
    n, B = len(cfg.model.modules), cfg.data.batch_size
    saved_threads = torch.get_num_threads()

    # Each module's input for a full batch: the previous modules' outputs after a training step. This pass
    # also warms up torch (thread pools, kernels), which must not count as any module's memory.
    torch.set_num_threads(max(threads))
    x = NoiseSource(cfg.data, cfg.seed).batch(0)
    inputs, out_bytes, param_bytes = [], [], []
    for i in range(n):
        inputs.append(x)
        stage = Stage(mc, i, device)
        y, _ = stage.train_step(x)
        out_bytes.append(y[0].numel() * y.element_size())
        param_bytes.append(sum(p.numel() * 4 for p in stage.modules.parameters() if p.requires_grad))
        x = y.detach().cpu()
        del stage, y

    timings: list[list[Timing]] = [[] for _ in range(n)]
    peak = [0] * n
    rows_options = sorted({B, max(1, B // 2)}, reverse=True)
    settings = [(h, i) for h in sorted(threads, reverse=True) for i in range(n)]
    for h, i in progress(settings, f"plan: measuring {n} modules at {', '.join(map(str, sorted(threads)))} threads",
                         unit="module", note=lambda hi: f"module {hi[1]} at {hi[0]} threads"):
        torch.set_num_threads(h)
        # Memory: the first (full-batch) warm-up of each module, from building it on, at most threads.
        with _peak_memory(device, measure=h == max(threads)) as mem:
            stage = Stage(mc, i, device)
            xi = inputs[i].to(device)
            for _ in range(max(warmup, 2)):  # Adam's state exists from the first step on
                stage.train_step(xi)
        peak[i] = max(peak[i], mem.growth)
        for rows in rows_options:
            xi = inputs[i][:rows].to(device)
            warm = 0 if rows == B else warmup        # the full batch has just warmed up
            times = []
            for k in range(warm + steps):
                _sync(device)
                t = time.perf_counter()
                stage.train_step(xi)
                _sync(device)
                if k >= warm:
                    times.append(time.perf_counter() - t)
            timings[i].append(Timing(h, rows, statistics.median(times)))
        del stage, xi
    torch.set_num_threads(saved_threads)

    mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else host_memory()
    return Profile(device.type, device_name(device), cores, mem, B, cfg.data.crop, cfg.run.precision,
                   [ModuleProfile(i, timings[i], out_bytes[i], param_bytes[i], peak[i]) for i in range(n)],
                   time.perf_counter() - t_start)


def cached_profile(cfg: Config, device: torch.device | str = "cpu", refresh: bool = False,
                   run_dir: RunDir | None = None, **kw) -> Profile:
    """The profile under ``<run.dir>/plan/profile-<key>.json``, measured and written there if missing."""
    device = torch.device(device)
    run_dir = run_dir or RunDir.of(cfg)
    fs, path = run_dir.fs, run_dir.profile(profile_key(cfg, device))
    if not refresh and fs.exists(path):
        try:
            prof = Profile.from_dict(json.loads(fs.cat_file(path)))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("plan: ignoring unreadable profile %s (%s); measuring again", path, e)
        else:
            if set(kw.get("threads") or []) <= set(prof.thread_counts):
                log.info("plan: profile from %s (measured in %.1f s)", path, prof.cost_s)
                return prof
    log.info("plan: profiling %d modules on %s at batch %d x %d", len(cfg.model.modules), device,
             cfg.data.batch_size, cfg.data.crop)
    prof = profile_modules(cfg, device, **kw)
    write_bytes(fs, path, json.dumps(prof.to_dict(), indent=1).encode())
    log.info("plan: profiling took %.1f s; cached in %s", prof.cost_s, path)
    return prof
