"""``vgim``: the command line. Each subcommand parses its arguments and calls into the package."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vgim_dist.config import ConfigError, load_config
from vgim_dist.storage import StorageFault


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML experiment file, e.g. configs/vgim.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run.steps=100 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from vgim_dist.launch import train  # noqa: PLC0415
    from vgim_dist.train.loop import Interrupted  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, resume=args.resume, address=args.address)
    except Interrupted as e:
        print(f"vgim train: {e}", file=sys.stderr)
        return 130
    print(json.dumps({"run_dir": summary["run_dir"], "steps": summary["steps"]}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vgim_dist.model import describe  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    rows = describe(cfg.model, args.samples or cfg.data.crop)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    samples = args.samples or cfg.data.crop
    print(f"{args.config}: {len(rows)} modules, input {samples} samples")
    print(f"{'module':>6}  {'params':>10}  {'channels':>8}  {'frames':>6}  {'hop':>5}  {'field':>6}  layers")
    for r in rows:
        print(f"{r['module']:>6}  {r['params']:>10,}  {r['channels']:>8}  {r['frames']:>6}  {r['hop']:>5}  "
              f"{r['receptive_field']:>6}  {', '.join(r['layers'])}")
    print(f"{'total':>6}  {sum(r['params'] for r in rows):>10,}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vgim_dist.plan import table  # noqa: PLC0415
    from vgim_dist.plan.auto import plan_config  # noqa: PLC0415

    # The layout is what is being chosen: the config's stages and replicas are ignored, its threads kept.
    cfg = load_config(args.config, [*args.overrides, "pipeline.stages=auto", "pipeline.replicas=auto",
                                    "run.runner=pipeline"])
    plans, ctx = plan_config(cfg, args.workers or 0, args.gpus, refresh=args.refresh)
    prof = ctx["profile"]
    if args.json:
        print(json.dumps({"chosen": plans[0].to_dict(), "runners_up": [p.to_dict() for p in plans[1:3]],
                          "workers": ctx["workers"], "gpus": ctx["gpus"], "profile": prof.to_dict(),
                          "overrides": plans[0].overrides()}, indent=1))
        return 0
    print(f"{args.config}: {ctx['workers']} workers" + (f", {ctx['gpus']} GPUs" if ctx["gpus"] else ""))
    print(table(prof, plans))
    print("\nrun it with: " + " ".join(f"--set '{o}'" for o in ["run.runner=pipeline", *plans[0].overrides()]))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vgim_dist.config import describe_keys, dump_config  # noqa: PLC0415

    if args.keys:
        for key, kind, default, doc in describe_keys():
            print(f"{key:<28} {kind:<32} {default:<16} {doc}")
        return 0
    if not args.config:
        print("vgim config: give a CONFIG file, or --keys for the reference of every key", file=sys.stderr)
        return 2
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (reference or pipeline runner)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--address", default="", help="Ray cluster to join with run.runner=pipeline, e.g. "
                   "127.0.0.1:6379 (default: RAY_ADDRESS, else Ray starts on this machine)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="table of modules: parameters, frames, hop, receptive field")
    _add_config_args(p)
    p.add_argument("--samples", type=int, default=0, help="input length in samples (default: data.crop)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per module")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="profile each module here, then choose stages, replicas and threads")
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=0, help="workers the plan may use (default: "
                   "pipeline.workers, else one per GPU, else one per CPU core)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs the plan may use (default: those visible "
                   "when run.device is cuda or auto, else 0)")
    p.add_argument("--json", action="store_true", help="print the chosen plan, two runners-up and the profile")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cached "
                   "profile in <run.dir>/plan/")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="print the resolved config, or every key with its type and default")
    p.add_argument("config", nargs="?", help="YAML experiment file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keys", action="store_true", help="list every config key: type, range, default, meaning")
    p.set_defaults(func=cmd_config)

    from vgim_dist.data.cli import add_data_commands  # noqa: PLC0415

    add_data_commands(sub)

    from vgim_dist.tracking.cli import add_tracking_commands  # noqa: PLC0415

    add_tracking_commands(sub)

    from vgim_dist.eval.cli import add_eval_commands  # noqa: PLC0415

    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vgim: config error: {e}", file=sys.stderr)
        return 2
    except StorageFault as e:  # a damaged checkpoint or shard, a full disk: one line naming the file
        print(f"vgim {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
