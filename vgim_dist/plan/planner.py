"""Stages for the hardware: choose the contiguous split of the modules into stages, the replicas of each stage
and the threads of each worker that give the most windows per second, from measured module times.

Pure arithmetic: a `Profile` (what `vgim_dist.plan.profile` measured) in, `Plan`s out; no torch, no Ray.
``plan(profile, workers, gpus)`` is the whole interface; ``estimate`` prices one given layout and ``rank``
lists every layout best first. ``docs/performance.md`` ("Planning") states the model and its constants.

The model, per worker of stage s (r_s replicas, h threads each, rows_s = ceil(B / r_s) rows):

    t_s = sum of its modules' measured step times at (h threads, rows_s rows)
        + all-reduce (r_s > 1: gradients and the gathered negative pool, ring-style)
        + its links (activation bytes in and out over the link's channel)

and the pipeline's step time is the slowest stage's t_s, unless the workers share hardware:

- CPU (C cores; each worker asks for h cores, a replicated stage for r_s * h at once): the step takes at
  least the work of all workers divided by C, and two stages of which one must hold several cores at once
  (threads or replicas advance in lockstep) while the other holds the rest cannot overlap, so their times
  add. With every core taken by Ray workers (the pipeline runner), Ray's own processes take ``ray_cores`` of
  the C cores, and a stage whose g = r_s * h threads advance together (a worker's threads meet at a barrier
  in every operator, its replicas at every collective) runs only while all g hold a core: (1 - ray_cores /
  C)^g of the time. A lone one-thread worker loses nothing measurable. The reference runner (``ray=False``)
  runs without Ray.
- GPU (G devices, W workers): with W <= G each worker has its own device; with more, ceil(W / G) workers
  share a device in rank order, time-sliced, so a device's load is the sum of its workers' times.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Timing:
    """Seconds for one training step (forward, backward, optimizer) of a module, median after warm-up."""

    threads: int
    rows: int
    seconds: float


@dataclass
class ModuleProfile:
    module: int
    timings: list[Timing]
    out_bytes_per_row: int      # the activation it sends on, bytes per batch row
    param_bytes: int            # its gradients, bytes (what a replica group all-reduces per step)
    peak_bytes: int             # memory a training step needs at the full batch: parameters, optimizer state,
                                # activations (CUDA allocator peak on GPU, RSS growth on CPU)

    def seconds(self, threads: int, rows: int) -> float:
        """Step time at ``threads`` and ``rows``: affine in rows through the measured points."""
        pts = sorted((t.rows, t.seconds) for t in self.timings if t.threads == threads)
        if not pts:
            raise KeyError(f"module {self.module}: no timing at {threads} threads")
        if len(pts) == 1:
            return pts[0][1] * rows / pts[0][0]
        lo, hi = pts[0], pts[-1]
        for a, b in itertools.pairwise(pts):
            if rows <= b[0]:
                lo, hi = a, b
                break
        slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
        # never below a proportional share of the smallest measurement (fixed costs do not vanish)
        return max(lo[1] + slope * (rows - lo[0]), pts[0][1] * rows / pts[0][0] if rows < pts[0][0] else 0.0)


@dataclass
class Profile:
    """Module times on one kind of device, for one config and batch shape."""

    device: str                 # "cpu" or "cuda"
    device_name: str
    cores: int                  # CPU cores of the host (threads a worker can use)
    memory_bytes: int           # host memory on CPU, one device's memory on GPU
    batch: int
    crop: int
    precision: str
    modules: list[ModuleProfile]
    cost_s: float = 0.0         # what profiling took

    @property
    def thread_counts(self) -> list[int]:
        return sorted({t.threads for m in self.modules for t in m.timings})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        mods = [ModuleProfile(m["module"], [Timing(**t) for t in m["timings"]], m["out_bytes_per_row"],
                              m["param_bytes"], m["peak_bytes"]) for m in d["modules"]]
        return cls(**{**d, "modules": mods})


@dataclass(frozen=True)
class CostModel:
    """Constants of the model that are not measured per run (bytes per second per direction)."""

    host_link: float = 1.0e9        # gloo over loopback TCP (CPU workers), also their all-reduce
    nccl_link: float = 2.0e10       # NCCL between two GPUs of a node (PCIe-class; NVLink is faster)
    staged_link: float = 5.0e9      # device -> host -> gloo -> host -> device, two ranks on one GPU
    latency_s: float = 2.0e-4       # per collective call or message
    collectives_per_module: int = 12  # a replicated module's calls: batch split, BatchNorm statistics, gathers
    ray_cores: float = 0.2          # cores Ray's own processes (raylet, GCS, dashboard) take while workers run


@dataclass
class StageEstimate:
    modules: list[int]
    replicas: int
    step_s: float               # per worker: compute + all-reduce + links
    compute_s: float
    allreduce_s: float
    link_s: float
    memory_bytes: int           # per worker


@dataclass
class Plan:
    stages: list[StageEstimate]
    threads: int                # torch threads per worker
    gpus_per_worker: float      # 0 on CPU; 1 = a device each; < 1 = workers share a device
    step_s: float               # predicted seconds per training step of the whole pipeline
    bottleneck: str             # "stage 1", "cores (all workers)", "stages 0+1 share cores", "GPU 0 (stages 0, 1)"
    link_bytes: list[int]       # bytes per step on the link after each stage but the last
    links: list[str] = field(default_factory=list)   # channel of each link: gloo, nccl, staged
    batch: int = 0

    @property
    def workers(self) -> int:
        return sum(s.replicas for s in self.stages)

    @property
    def windows_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def layout(self) -> tuple:
        return tuple(tuple(s.modules) for s in self.stages), tuple(s.replicas for s in self.stages), self.threads

    def overrides(self) -> list[str]:
        """The config values that run this plan (``--set`` form)."""
        out = [f"pipeline.stages={[s.modules for s in self.stages]}",
               f"pipeline.replicas={[s.replicas for s in self.stages]}", f"run.threads={self.threads}"]
        if self.gpus_per_worker:
            out.append(f"pipeline.gpus_per_stage={self.gpus_per_worker}")
        return out

    def describe(self) -> str:
        reps = [s.replicas for s in self.stages]
        what = f"{[s.modules for s in self.stages]}" + (f" replicas {reps}" if max(reps) > 1 else "")
        return f"{what}, {self.threads} thread{'s' * (self.threads > 1)} per worker"

    def to_dict(self) -> dict:
        return {**asdict(self), "workers": self.workers, "windows_per_s": self.windows_per_s}


# --------------------------------------------------------------------------------------------- search


def splits(n: int, max_stages: int) -> list[list[list[int]]]:
    """Every split of modules 0..n-1 into at most ``max_stages`` contiguous non-empty stages."""
    out = []
    for cuts in itertools.product((False, True), repeat=n - 1):
        if sum(cuts) + 1 > max_stages:
            continue
        stages, cur = [], [0]
        for i, cut in enumerate(cuts, start=1):
            if cut:
                stages.append(cur)
                cur = []
            cur.append(i)
        out.append([*stages, cur])
    return out


def replica_counts(stages: int, workers: int, batch: int) -> list[list[int]]:
    """Replica counts per stage within ``workers`` in all, where neighbours have equal counts or one side 1
    (the pipeline's fan-out/gather rule) and no replica gets an empty share of the batch."""
    out = []

    def grow(prefix: list[int], left: int) -> None:
        if len(prefix) == stages:
            out.append(prefix)
            return
        for r in range(1, min(left - (stages - len(prefix) - 1), batch) + 1):
            if prefix and 1 not in (prefix[-1], r) and prefix[-1] != r:
                continue
            grow([*prefix, r], left - r)

    grow([], workers)
    return out


def estimate(profile: Profile, stages: list[list[int]], replicas: list[int] | None = None, threads: int = 1,
             gpus: int = 0, cost: CostModel = CostModel(), ray: bool = True) -> Plan | None:
    """The predicted step time of one layout; None when it does not fit (memory, or replicas sharing a GPU).
    ``ray``: the layout runs as Ray workers (the pipeline runner); False: in this process (the reference)."""
    replicas = replicas or [1] * len(stages)
    mods = {m.module: m for m in profile.modules}
    B, W = profile.batch, sum(replicas)
    first = [sum(replicas[:s]) for s in range(len(stages))]

    # Which device each worker's rank lands on (GPU only), hence each link's channel.
    per_device = math.ceil(W / gpus) if gpus else 0
    device = [r // per_device for r in range(W)] if gpus else [0] * W
    if gpus:
        for s, r in enumerate(replicas):
            if len({device[first[s] + k] for k in range(r)}) < r:
                return None                      # NCCL cannot join two ranks of one device in a group
    links, link_bytes = [], []
    for s in range(len(stages) - 1):
        link_bytes.append(mods[stages[s][-1]].out_bytes_per_row * B)
        if not gpus:
            links.append("gloo")
        else:
            ends = {device[first[s] + k] for k in range(replicas[s])} | \
                   {device[first[s + 1] + k] for k in range(replicas[s + 1])}
            links.append("staged" if len(ends) == 1 else "nccl")
    bandwidth = {"gloo": cost.host_link, "nccl": cost.nccl_link, "staged": cost.staged_link}

    est = []
    for s, (ms, r) in enumerate(zip(stages, replicas)):
        rows = math.ceil(B / r)
        compute = sum(mods[i].seconds(threads, rows) for i in ms)
        allreduce = 0.0
        if r > 1:
            bw = cost.nccl_link if gpus else cost.host_link
            moved = sum(mods[i].param_bytes + mods[i].out_bytes_per_row * B for i in ms)
            allreduce = 2 * (r - 1) / r * moved / bw + len(ms) * cost.collectives_per_module * cost.latency_s
        link = 0.0
        if s > 0:
            link += link_bytes[s - 1] / r / bandwidth[links[s - 1]] + 3 * cost.latency_s
        if s < len(stages) - 1:
            link += link_bytes[s] / r / bandwidth[links[s]] + 3 * cost.latency_s
        memory = sum(int(mods[i].peak_bytes * rows / B) for i in ms)
        est.append(StageEstimate(list(ms), r, compute + allreduce + link, compute, allreduce, link, memory))

    step = max(e.step_s for e in est)
    bottleneck = f"stage {max(range(len(est)), key=lambda s: est[s].step_s)}"
    if gpus:
        load: dict[int, list[int]] = {}
        for s, r in enumerate(replicas):
            for k in range(r):
                load.setdefault(device[first[s] + k], []).append(s)
        for d, on in load.items():
            if sum(est[s].memory_bytes for s in on) > profile.memory_bytes:
                return None
            busy = sum(est[s].step_s for s in on)
            if len(on) > 1 and busy > step:
                step, bottleneck = busy, f"GPU {d} (stages {', '.join(map(str, sorted(set(on))))})"
        gpw = 1.0 if W <= gpus else math.floor(gpus / W * 1000) / 1000
    else:
        if sum(e.memory_bytes * e.replicas for e in est) > profile.memory_bytes:
            return None
        step, bottleneck = _share_cores(est, threads, profile.cores, cost, step, bottleneck, ray)
        gpw = 0.0
    return Plan(est, threads, gpw, step, bottleneck, link_bytes, links, B)


def _share_cores(est: list[StageEstimate], threads: int, cores: int, cost: CostModel, step: float,
                 bottleneck: str, ray: bool = True) -> tuple[float, str]:
    """CPU workers on ``cores`` cores: the step time once the stages compete for them."""
    gang = [e.replicas * threads for e in est]              # cores a stage needs at once
    if ray and sum(gang) >= cores:                           # Ray's processes share the cores
        # A stage whose g threads advance together (a worker's threads meet at every operator's barrier, its
        # replicas at every collective) runs only while all g hold a core. A lone one-thread worker that Ray
        # preempts catches up while the stage beside it waits on their link.
        for e, g in zip(est, gang):
            if g > 1:
                e.step_s /= (1 - cost.ray_cores / cores) ** g
        s = max(range(len(est)), key=lambda s: est[s].step_s)
        if est[s].step_s > step:
            step, bottleneck = est[s].step_s, f"stage {s}"
    for e, g in zip(est, gang):                              # a gang larger than the machine time-slices
        if g > cores:
            e.step_s *= g / cores
            if e.step_s > step:
                step, bottleneck = e.step_s, f"stage {est.index(e)} ({g} threads on {cores} cores)"
    work = sum(e.step_s * g for e, g in zip(est, gang)) / cores
    if work > step * 1.0001:
        step, bottleneck = work, f"cores (all {sum(gang)} threads on {cores})"
    # Stages that cannot run side by side: one needs several cores at once and the other holds the rest.
    n = len(est)
    for size in range(2, n + 1):
        for group in itertools.combinations(range(n), size):
            if all(gang[a] + gang[b] > cores and max(gang[a], gang[b]) > 1
                   for a, b in itertools.combinations(group, 2)):
                serial = sum(est[s].step_s for s in group)
                if serial > step * 1.0001:
                    step, bottleneck = serial, f"stages {'+'.join(map(str, group))} share cores"
    return step, bottleneck


def rank(profile: Profile, workers: int, gpus: int = 0, cost: CostModel = CostModel(),
         stages: list[list[int]] | None = None, replicas: list[int] | None = None, threads: int | None = None,
         replicate: bool = True, tolerance: float = 0.02, ray: bool = True) -> list[Plan]:
    """Every layout within ``workers`` workers (and ``gpus`` GPUs), fastest first. ``stages``, ``replicas``,
    ``threads`` pin that part of the layout; ``replicate=False`` keeps one worker per stage.

    A layout within ``tolerance`` of the fastest that needs fewer workers (then fewer stages) goes first: the
    model is not that exact, and the smaller layout leaves hardware free."""
    if workers < 1:
        raise ValueError(f"workers: need at least 1, got {workers}")
    n = len(profile.modules)
    plans = []
    thread_options = [threads] if threads else profile.thread_counts
    for split in [stages] if stages else splits(n, workers):
        if replicas:
            options = [replicas]
        elif replicate:
            options = replica_counts(len(split), workers, profile.batch)
        else:
            options = [[1] * len(split)]
        for reps in options:
            if sum(reps) > workers or len(reps) != len(split):
                continue
            for h in thread_options:
                p = estimate(profile, split, reps, h, gpus, cost, ray)
                if p is not None:
                    plans.append(p)
    plans.sort(key=lambda p: (p.step_s, p.workers, len(p.stages), p.threads))
    if plans:
        near = [p for p in plans if p.step_s <= plans[0].step_s * (1 + tolerance)]
        best = min(near, key=lambda p: (p.workers, len(p.stages), p.step_s))
        plans.remove(best)
        plans.insert(0, best)
    return plans


def plan(profile: Profile, workers: int, gpus: int = 0, cost: CostModel = CostModel(), **pinned) -> Plan:
    """The fastest layout within ``workers`` workers and ``gpus`` GPUs (0 = CPU workers)."""
    plans = rank(profile, workers, gpus, cost, **pinned)
    if not plans:
        raise ValueError(f"no layout of {len(profile.modules)} modules fits {workers} workers"
                         + (f" on {gpus} GPUs" if gpus else "") + " within the memory measured")
    return plans[0]


# --------------------------------------------------------------------------------------------- report


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def table(profile: Profile, plans: list[Plan], runners_up: int = 2) -> str:
    """The chosen plan in detail, then the runners-up in a line each."""
    best = plans[0]
    lines = [f"profile: {profile.device} ({profile.device_name}), {profile.cores} cores, batch {profile.batch} x "
             f"{profile.crop} samples, {profile.precision}; profiling took {profile.cost_s:.1f} s",
             "module  " + "  ".join(f"{h} thr s/step" for h in profile.thread_counts) + "   sends/step   peak memory"]
    for m in profile.modules:
        times = "  ".join(f"{m.seconds(h, profile.batch):>12.4f}" for h in profile.thread_counts)
        lines.append(f"{m.module:>6}  {times}  {_mb(m.out_bytes_per_row * profile.batch):>11}  {_mb(m.peak_bytes):>12}")
    lines += ["", f"chosen: {best.describe()}"
              + (f", {best.gpus_per_worker:g} GPU per worker" if best.gpus_per_worker else ""),
              f"predicted {best.step_s:.4f} s/step, {best.windows_per_s:,.1f} windows/s; bottleneck: {best.bottleneck}",
              f"{'stage':>5}  {'modules':<14}{'replicas':>8}  {'s/step':>8}  {'compute':>8}  {'all-red.':>8}  "
              f"{'links':>8}  {'memory/worker':>13}"]
    for s, e in enumerate(best.stages):
        lines.append(f"{s:>5}  {str(e.modules):<14}{e.replicas:>8}  {e.step_s:>8.4f}  {e.compute_s:>8.4f}  "
                     f"{e.allreduce_s:>8.4f}  {e.link_s:>8.4f}  {_mb(e.memory_bytes):>13}")
    for s, (b, ch) in enumerate(zip(best.link_bytes, best.links)):
        lines.append(f"link {s} -> {s + 1}: {_mb(b)} per step over {ch}")
    if len(plans) > 1:
        lines += ["", "runners-up:"]
        for p in plans[1:runners_up + 1]:
            lines.append(f"  {p.describe()}: {p.step_s:.4f} s/step ({p.step_s / best.step_s:.2f}x), "
                         f"bottleneck {p.bottleneck}")
    return "\n".join(lines)
