"""What reproducibility costs on this machine: time per training step, and whether two runs agree bitwise.

    .venv/bin/python benchmarks/determinism.py [--config configs/vgim.yaml] [--batch 8] [--crop 20480]
        [--steps 3] [--threads 1 2]

Three ways of running the same steps, each twice at each thread count, every run in a fresh process:

- ``index_put``: the InfoNCE negatives gathered with plain indexing (``pool[perms]``), whose backward adds
  colliding rows from several threads in no fixed order (how this project computed them before);
- ``ordered``: the negatives' backward as vgim-dist computes it, one collision-free scatter per permutation,
  summed in order (``run.deterministic=false``);
- ``ordered+det``: the same with ``torch.use_deterministic_algorithms(True)`` (``run.deterministic=true``,
  the default).

Also times the InfoNCE loss alone (forward and backward of module 0's loss on its output shape).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time

MODES = ("index_put", "ordered", "ordered+det")


def measure(config: str, batch: int, crop: int, steps: int, threads: int, mode: str) -> dict:
    import torch  # noqa: PLC0415 - imported in the measuring process only

    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.data.source import NoiseSource  # noqa: PLC0415
    from vgim_dist.model import loss  # noqa: PLC0415
    from vgim_dist.train.stage import Stage, configure_torch  # noqa: PLC0415

    if mode == "index_put":
        loss._PermutedRows.apply = staticmethod(lambda pool, perms: pool[perms])
    cfg = load_config(config, [f"data.batch_size={batch}", f"data.crop={crop}", "data.uri=noise://",
                               f"run.threads={threads}", f"run.deterministic={mode == 'ordered+det'}",
                               "pipeline.stages=[]", "run.device=cpu"])
    configure_torch(cfg.run, torch.device("cpu"))
    stage, source = Stage(cfg, 0), NoiseSource(cfg.data, cfg.seed)
    elapsed = 0.0
    for step in range(steps + 1):                           # step 0 warms up
        x = source.batch(step)
        t = time.perf_counter()
        stage.train_step(x)
        elapsed += (time.perf_counter() - t) if step else 0.0
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in stage.modules.parameters()))

    # The loss alone, on module 0's output shape: (B, L, D) targets and contexts.
    m = cfg.model
    L = stage.modules[0](source.batch(0), torch.Generator().manual_seed(0)).output.shape[-1]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(batch, L, m.channels, generator=gen, requires_grad=True)
    predictor = torch.nn.Linear(m.channels, m.channels * m.prediction_steps, bias=False)
    loss_s = []
    for rep in range(6):
        t = time.perf_counter()
        loss.info_nce(z, z, predictor, steps=m.prediction_steps, negatives=m.negatives,
                      window=m.subsample_frames, generator=torch.Generator().manual_seed(rep)).backward()
        loss_s.append(time.perf_counter() - t)
    return {"step_s": elapsed / steps, "loss_s": min(loss_s[1:]), "digest": digest.hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vgim.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=20480)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args.config, args.batch, args.crop, args.steps, args.threads[0], args.mode)))
        return

    print(f"{args.config}: batch {args.batch} x {args.crop} samples, mean of {args.steps} steps after one warm-up, "
          "each run twice in fresh processes")
    print(f"{'threads':>7}  {'mode':>12}  {'s/step':>7}  {'loss ms':>7}  {'two runs equal':>14}")
    results = {}
    for threads in args.threads:
        for mode in MODES:
            runs = [json.loads(subprocess.run(
                [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch), "--crop",
                 str(args.crop), "--steps", str(args.steps), "--threads", str(threads), "--mode", mode],
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
            step_s = min(r["step_s"] for r in runs)
            loss_s = min(r["loss_s"] for r in runs)
            results[(threads, mode)] = step_s
            equal = "yes" if runs[0]["digest"] == runs[1]["digest"] else "no"
            print(f"{threads:>7}  {mode:>12}  {step_s:>7.3f}  {loss_s * 1e3:>7.1f}  {equal:>14}")
    for threads in args.threads:
        base = results[(threads, "index_put")]
        print(f"{threads} thread(s), step time / index_put: " +
              ", ".join(f"{m} {results[(threads, m)] / base:.3f}" for m in MODES[1:]))


if __name__ == "__main__":
    main()
