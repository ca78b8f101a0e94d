"""The first GPU machine answers "is it right" and "is it fast" in one command, in under 10 minutes.

    python benchmarks/gpu_check.py              # GPU: the gpu tests, then configs/vgim.yaml; results in $OUT
    python benchmarks/gpu_check.py --dry-run    # CPU: the gpu tests' code on the CPU, the speed parts on
                                                # configs/smoke.yaml (a few minutes on 2 cores)

Writes ``gpu_check.json`` and ``gpu_check.md`` (and the tests' ``gpu_tests.xml``) to $OUT:

0. correctness first: ``pytest -m gpu`` (the CPU proofs run on CUDA: the pipeline bitwise equal to the
   reference runner with deterministic algorithms, over the host-staged link between two stages sharing a GPU
   and, with two GPUs, over NCCL; recovery after a killed stage; DeepSpeed; bf16 autocast against fp32), each
   test's verdict in the JSON. In a dry run the same tests run on the CPU (VGIM_GPU_DRY_RUN=1);
1. environment: GPU, driver, CUDA, torch, NCCL;
2. the reference step (every module in one process) in bf16 and in fp32 at a batch that fills the GPU: step
   time, windows/s, peak memory, MFU (FLOPs counted from the model's shapes, `vgim_dist/model/flops.py`;
   the method is in docs/performance.md);
3. ``vgim plan`` for this GPU (2 workers: may two stages sharing it beat one?);
4. the pipeline runner with 2 stages sharing the GPU (half a GPU each, host-staged link), against the
   reference runner on the same batch;
5. the loader's windows/s per core from local shards, against the GPU's demand;
6. a torch.compile variant of the reference step, if it compiles within its share of the budget.

Each part is timed against a budget and fails on its own: an error is recorded and the next part runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import run_time

from vgim_dist.config import Config, load_config
from vgim_dist.data.config import DataConfig
from vgim_dist.data.loader import ShardSource
from vgim_dist.data.prepare import prepare
from vgim_dist.data.readers import folder
from vgim_dist.data.source import NoiseSource
from vgim_dist.data.store import Store
from vgim_dist.model.flops import step_flops
from vgim_dist.plan import table
from vgim_dist.plan.auto import plan_config
from vgim_dist.plan.profile import host_cores
from vgim_dist.train.stage import Stage

# Dense peak TFLOP/s (no sparsity) by GPU name: (bf16, tf32). fp32 convolutions run as TF32 on cuDNN by default.
PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0),
               "A100": (312.0, 156.0), "L40S": (362.0, 183.0), "L4": (121.0, 60.0), "A10": (125.0, 62.5),
               "RTX 4090": (165.0, 82.6)}


def peak_tflops(name: str) -> tuple[float, float] | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):   # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_cores": host_cores(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}", nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = "unknown (no nvidia-smi)"
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_step(cfg: Config, device: torch.device, steps: int, compiled: bool = False) -> dict:
    """Every module in order on one batch (the reference runner's step, data excluded): median seconds per
    step after two warm-up steps, peak memory, FLOPs and MFU."""
    stages = [Stage(cfg, s, device) for s in range(len(cfg.stage_modules()))]
    if compiled:
        for st in stages:
            for m in st.modules:
                m.forward = torch.compile(m.forward)
    x = NoiseSource(cfg.data, cfg.seed).batch(0)
    if device.type == "cuda":
        x = x.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(2 + steps):
        _sync(device)
        t = time.perf_counter()
        y = x
        for st in stages:
            y, _ = st.train_step(y)
        _sync(device)
        if k >= 2:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    flops = sum(step_flops(cfg.model, cfg.data.batch_size, cfg.data.crop))
    out = {"precision": cfg.run.precision, "batch": cfg.data.batch_size, "step_s": step,
           "windows_per_s": cfg.data.batch_size / step, "tflops_per_step": flops / 1e12,
           "achieved_tflops": flops / step / 1e12, "compiled": compiled}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            out["peak_tflops"] = peak[0] if cfg.run.precision == "bf16" else peak[1]
            out["mfu"] = out["achieved_tflops"] / out["peak_tflops"]
    del stages
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fill_batch(cfg: Config, device: torch.device, candidates: list[int], budget_s: float) -> int:
    """The largest batch from ``candidates`` whose bf16 step fits in 85 % of the GPU's memory, tried in
    increasing order until one fails or the budget is spent."""
    best, t0 = candidates[0], time.perf_counter()
    for b in candidates:
        if time.perf_counter() - t0 > budget_s:
            break
        c = with_overrides(cfg, [f"data.batch_size={b}", "run.precision=bf16"])
        try:
            r = reference_step(c, device, steps=1)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best = b
        if device.type != "cuda" or r["peak_memory_gib"] * 2**30 > 0.45 * torch.cuda.get_device_properties(
                device).total_memory:            # doubling would pass 85 %
            break
    return best


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from vgim_dist.config import apply_override, from_dict, to_dict  # noqa: PLC0415

    tree = to_dict(cfg)
    for o in overrides:
        apply_override(tree, o)
    out = from_dict(Config, tree)
    out.validate()
    return out


def loader_rate(batch: int, crop: int, work: Path, batches: int) -> dict:
    """Windows/s one process reads from local shards of a noise corpus (4 s clips), and per core."""
    corpus_dir = work / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        sf.write(corpus_dir / f"clip-{i:03d}.flac", (rng.standard_normal(64000) * 0.1).clip(-1, 1), 16000)
    prepare(folder(corpus_dir), Store(str(work / "shards")), log=lambda _: None)
    cfg = DataConfig(uri=str(work / "shards"), cache_dir=str(work / "cache"), batch_size=batch, crop=crop,
                     prefetch=0)
    src = ShardSource(cfg, seed=0)
    src.batch(0)
    t = time.perf_counter()
    for step in range(1, batches + 1):
        src.batch(step)
    rate = batches * batch / (time.perf_counter() - t)
    src.close()
    return {"windows_per_s_one_process": rate, "cores": host_cores(), "windows_per_s_all_cores": rate * host_cores()}


def compile_in_child(args: argparse.Namespace, cfg_overrides: list[str], timeout: float) -> dict:
    """The torch.compile variant in a child process, killed after ``timeout`` seconds."""
    cmd = [sys.executable, __file__, "--compile-child", "--config", args.config,
           *[a for o in cfg_overrides for a in ("--set", o)]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not compile and run within {timeout:.0f} s"}
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


ROOT = Path(__file__).resolve().parents[1]


def correctness(dry: bool, out_dir: Path, timeout: float, select: str = "") -> dict:
    """``pytest -m gpu`` in a child process, killed after ``timeout`` seconds: a verdict per test from its
    JUnit XML (outcome, seconds, the failure's first line), the counts, and one verdict for all."""
    xml = out_dir / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", *(["-k", select] if select else []), "tests"]
    env = {**os.environ, "VGIM_GPU_DRY_RUN": "1" if dry else "0"}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    except subprocess.TimeoutExpired as e:
        rc, tail = None, [f"pytest -m gpu killed after {timeout:.0f} s", *str(e.stdout or "").splitlines()[-10:]]
    out = {"command": " ".join(["VGIM_GPU_DRY_RUN=1"] * dry + ["python", *cmd[1:]]),
           "device": "cpu (dry run)" if dry else "cuda", "wall_s": time.perf_counter() - t, "exit_code": rc}
    tests = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            verdict, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    verdict = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or node.text or "").strip().splitlines()[0][:300]
                    break
            tests.append({"test": f"{case.get('classname', '').removeprefix('tests.')}::{case.get('name')}",
                          "verdict": verdict, "seconds": round(float(case.get("time", 0)), 1), "message": message})
    counts = {v: sum(t["verdict"] == v for t in tests) for v in ("passed", "failed", "error", "skipped")}
    ran = counts["passed"] + counts["failed"] + counts["error"]
    out.update(counts=counts, tests=tests,
               verdict="passed" if rc == 0 and ran and not counts["failed"] + counts["error"] else
               "no test ran" if rc in (0, 5) and not ran else "failed")
    if out["verdict"] != "passed":
        out["output_tail"] = tail
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check: {env.get('gpu', 'CPU dry run')}", "",
             f"{'dry run on CPU, ' if result['dry_run'] else ''}config {result['config']}, "
             f"{result['wall_s']:.0f} s in all", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    tier = result.get("correctness") or {}
    if tier:
        lines += ["", f"## Correctness: `pytest -m gpu` on {tier.get('device', '?')}: {tier.get('verdict', 'error')}",
                  "", f"`{tier.get('command', '')}`, {tier.get('wall_s', 0):.0f} s: {tier.get('counts', {})}", "",
                  "| test | verdict | s | note |", "|---|---|---|---|"]
        lines += [f"| {t['test']} | {t['verdict']} | {t['seconds']} | {t['message']} |" for t in tier.get("tests", [])]
        if "error" in tier:
            lines.append(f"| (the tier itself) | error | | {tier['error']} |")
    lines += ["", "## Reference step", "",
              "| precision | batch | s / step | windows / s | peak memory GiB | TFLOP/s | MFU |",
              "|---|---|---|---|---|---|---|"]
    for r in result.get("reference", []):
        if "error" in r:
            lines.append(f"| {r.get('precision', '?')} | error: {r['error']} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "n/a"
        lines.append(f"| {r['precision']}{' compiled' if r['compiled'] else ''} | {r['batch']} | {r['step_s']:.4f} | "
                     f"{r['windows_per_s']:,.0f} | {mem} | {r['achieved_tflops']:.1f} | {mfu} |")
    plan = result.get("plan") or {}
    lines += ["", "## vgim plan on this device (2 workers)", "", "```", plan.get("table") or json.dumps(plan), "```"]
    for name, key in (("Pipeline, 2 stages sharing the device, against the reference runner", "pipeline"),
                      ("Loader against the GPU's demand", "loader"), ("torch.compile (bf16)", "compile")):
        part_ = result.get(key) or {}
        lines += ["", f"## {name}", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in part_.items() if k != "trace"]
    return "\n".join(lines) + "\n"


def part(result: dict, key: str, fn, *args) -> None:
    t = time.perf_counter()
    try:
        result[key] = fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed part must not lose the others' figures
        result[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
    print(f"gpu_check: {key} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, smoke config, few steps: checks the code paths")
    ap.add_argument("--config", default="")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the JSON and Markdown go (default $OUT)")
    ap.add_argument("--tests-timeout", type=float, default=0,
                    help="seconds for `pytest -m gpu` (default 270 on GPU, 1200 in a dry run); 0 = default")
    ap.add_argument("--skip-tests", action="store_true", help="the speed parts only")
    ap.add_argument("--tests-k", default="", metavar="EXPR", help="only the gpu tests pytest -k EXPR selects")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.config = args.config or ("configs/smoke.yaml" if args.dry_run else "configs/vgim.yaml")
    base = ["data.uri=noise://", "checkpoint.every=0", "tracking.enabled=false", *args.overrides]

    if args.compile_child:
        cfg = load_config(args.config, base)
        print(json.dumps(reference_step(cfg, torch.device(cfg.run.device), steps=5, compiled=True)))
        return

    t_start = time.perf_counter()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; use --dry-run on a CPU machine")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"dry_run": dry, "config": args.config}
    # 0. correctness first: a wrong pipeline's speed means nothing
    if not args.skip_tests:
        part(result, "correctness", correctness, dry, out_dir, args.tests_timeout or (1200.0 if dry else 270.0),
             args.tests_k)
        (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))   # kept if a later part hangs
    dev = [f"run.device={device.type}"]
    cfg = load_config(args.config, [*base, *dev, *(["data.batch_size=4", "data.crop=5120"] if dry else [])])
    steps = 2 if dry else 10
    if dry:
        torch.set_num_threads(1)   # a shared CPU machine: several threads per process only wait for each other
    result["environment"] = environment(device)

    # 2. the reference at a batch that fills the GPU, bf16 and fp32
    batch = cfg.data.batch_size if dry else fill_batch(cfg, device, [64, 128, 256, 512, 1024], budget_s=90)
    result["reference"] = []
    for precision in ("bf16", "fp32"):
        c = with_overrides(cfg, [f"data.batch_size={batch}", f"run.precision={precision}"])
        part(result, "_ref", reference_step, c, device, steps)
        result["reference"].append(result.pop("_ref"))
    bf16 = with_overrides(cfg, [f"data.batch_size={batch}", "run.precision=bf16"])

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        # 3. the plan for this device, two workers allowed
        def plan_part() -> dict:
            c = with_overrides(bf16, [f"run.dir={work}/plan", "pipeline.stages=auto", "pipeline.replicas=auto",
                                      "run.runner=pipeline", *(["run.threads=1"] if dry else [])])
            plans, ctx = plan_config(c, workers=2, gpus=0 if dry else 1)
            return {"table": table(ctx["profile"], plans), "chosen": plans[0].to_dict(),
                    "profile_cost_s": ctx["profile"].cost_s}
        part(result, "plan", plan_part)

        # 4. two stages sharing the device against the reference runner, same batch, same measuring
        def pipeline_part() -> dict:
            common = [*base, *dev, f"data.batch_size={batch}", "run.precision=bf16", f"data.crop={cfg.data.crop}"]
            warm, n = (1, 2) if dry else (5, 30)
            pipe = run_time(args.config, [*common, "run.runner=pipeline", "pipeline.stages=[[0], [1, 2, 3]]",
                                          *([] if dry else ["pipeline.gpus_per_stage=0.5"]), "run.threads=1"], n, warm)
            ref = run_time(args.config, [*common, "run.runner=reference", "pipeline.stages=[]"], n, warm)
            return {"stages": [[0], [1, 2, 3]], "gpus_per_stage": None if dry else 0.5, "pipeline_step_s": pipe,
                    "reference_step_s": ref, "pipeline_over_reference_throughput": ref / pipe,
                    "pipeline_windows_per_s": batch / pipe, "reference_windows_per_s": batch / ref}
        part(result, "pipeline", pipeline_part)

        # 5. the loader against the GPU's demand
        def loader_part() -> dict:
            r = loader_rate(batch, cfg.data.crop, Path(work) / "loader", batches=3 if dry else 20)
            demand = max((x.get("windows_per_s", 0) for x in result["reference"]), default=0)
            return {**r, "gpu_demand_windows_per_s": demand,
                    "cores_needed": demand / r["windows_per_s_one_process"] if demand else None}
        part(result, "loader", loader_part)

    # 6. torch.compile, in what is left of the budget (at most 150 s; 9.5 minutes in all, the tests included)
    left = 570 - (time.perf_counter() - t_start)
    part(result, "compile", compile_in_child, args,
         [*dev, f"data.batch_size={batch}", "run.precision=bf16", f"data.crop={cfg.data.crop}"],
         min(150.0, max(20.0, left)) if not dry else 30.0)

    result["wall_s"] = time.perf_counter() - t_start
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
