"""``vgim``: the command line. Each subcommand parses its arguments and calls into the package.

Errors a user can fix print one line, ``vgim: <what> (<where>); <what to do>``, and exit non-zero; the
traceback is shown only with ``--debug`` or ``VGIM_DEBUG=1``. Heavy packages (torch, Ray, MLflow) are
imported by the command that needs them, so ``vgim --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

from vgim_dist import __version__
from vgim_dist.config import ConfigError, check_uri, load_config
from vgim_dist.errors import UserError

RAY_CONNECT_TIMEOUT_S = 10


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it names one already or is an on/off flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if ("default" in text or flag or action.default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = "none" if action.default in (None, "", []) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML experiment file, e.g. configs/vgim.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run.steps=100 (repeatable; keys: vgim config --keys)")


def check_ray_address(address: str) -> None:
    """Fail in seconds, naming the address, when no Ray cluster listens there (``ray.init`` would wait minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"malformed Ray address {address!r}", "--address", "give HOST:PORT, e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {hostport} ({e.strerror or e})", "--address",
                        "start one with `ray start --head`, or check the address (the head's port, 6379 "
                        "by default)") from None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.address:
        check_ray_address(args.address)
    from vgim_dist.launch import train  # noqa: PLC0415
    from vgim_dist.train.loop import Interrupted  # noqa: PLC0415

    try:
        summary = train(cfg, resume=args.resume, address=args.address)
    except Interrupted as e:
        print(f"vgim train: {e}", file=sys.stderr)
        return 130
    print(json.dumps({"run_dir": summary["run_dir"], "steps": summary["steps"]}))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vgim_dist.sweep.spec import load_sweep, plan  # noqa: PLC0415

    sweep = load_sweep(args.sweep, args.overrides)
    trials = plan(sweep, args.sweep)     # every trial's config validated before anything starts
    if args.dry_run:
        from vgim_dist.sweep.run import dry_run  # noqa: PLC0415

        print(dry_run(trials))
        return 0
    if args.address:
        check_ray_address(args.address)
    from vgim_dist.sweep.run import run_sweep, table  # noqa: PLC0415

    rows = run_sweep(sweep, args.sweep, address=args.address, resume=args.resume)
    print(table(rows), end="")
    failed = [r["name"] for r in rows if r["status"] not in ("FINISHED", "STOPPED")]   # STOPPED: early stopping
    if failed:
        print(f"vgim sweep: {len(failed)} of {len(rows)} trials did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from vgim_dist.model import describe  # noqa: PLC0415

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
    from vgim_dist.plan import estimate, table  # noqa: PLC0415
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
    threads = cfg.run.threads or max(prof.thread_counts)
    alone = estimate(prof, [[m.module for m in prof.modules]], [1], threads, min(ctx["gpus"], 1), ray=False)
    if alone is not None:
        print(f"without Ray (run.runner=reference, {threads} thread{'s' * (threads > 1)}"
              f"{', one GPU' if ctx['gpus'] else ''}): "
              f"{alone.step_s:.4f} s/step, {alone.windows_per_s:.1f} windows/s")
    print("\nrun it with: " + " ".join(f"--set '{o}'" for o in ["run.runner=pipeline", *plans[0].overrides()]))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}", "vgim encode")
    if args.workers and args.address:
        raise UserError("--workers and --address both given", "vgim encode",
                        "give --workers N for a Ray on this machine or --address HOST:PORT for a cluster")
    for key in ("--data", "--out"):
        try:
            check_uri(key, getattr(args, key[2:]), schemes=("s3",))
        except ConfigError as e:
            raise UserError(str(e), "vgim encode", "give a local folder or s3://bucket/prefix") from None
    if args.address:
        check_ray_address(args.address)
    from vgim_dist.data.store import StoreError  # noqa: PLC0415 - torch and the model only for this command
    from vgim_dist.encode import EncodeError, encode  # noqa: PLC0415

    try:
        m = encode(args.run, args.module, args.data, args.out, step=args.step, what=args.what, dtype=args.dtype,
                   chunk_seconds=args.chunk_seconds, endpoint_url=args.endpoint_url, workers=args.workers,
                   address=args.address)
    except (EncodeError, StoreError) as e:
        raise UserError(str(e), args.run, "check the run directory, --module, --data and --out") from e
    print(json.dumps({"out": args.out, "step": m["provenance"]["step"], "module": args.module,
                      "utterances": {k: v["utterances"] for k, v in m["splits"].items()},
                      "frames": {k: v["frames"] for k, v in m["splits"].items()}, "hop": m["hop"],
                      "channels": m["channels"], "parts": m["parts"], "dtype": m["dtype"],
                      "skipped": len(m["skipped"])}))
    return 0


def cmd_sequential(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from vgim_dist.sequential import sequential  # noqa: PLC0415 - torch, Ray and MLflow only for this command
    from vgim_dist.train.loop import Interrupted  # noqa: PLC0415

    try:
        result = sequential(cfg, dtype=args.dtype, chunk_seconds=args.chunk_seconds, workers=args.workers)
    except Interrupted:
        print("vgim sequential: stopped, checkpoint saved; run the same command again to continue", file=sys.stderr)
        return 130
    print(json.dumps({"encoder": result["encoder"], "steps": [s["steps"] for s in result["modules"]]}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vgim_dist.config import describe_keys, dump_config  # noqa: PLC0415

    if args.keys:
        for key, kind, default, doc in describe_keys():
            print(f"{key:<28} {kind:<32} {default:<16} {doc}")
        return 0
    if not args.config:
        raise UserError("no config file given", "vgim config", "give a CONFIG file, or --keys for every key")
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgim", formatter_class=HelpFormatter, description=(
        "vgim-dist: greedy, module-wise self-supervised speech encoders (V-GIM, GIM, CPC), trained in one "
        "process or as a pipeline of Ray workers. `vgim COMMAND --help` for each command."))
    parser.add_argument("--version", action="version", version=f"vgim-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also VGIM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser

    p = add("train", help="train a config (reference or pipeline runner)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--address", default="", help="Ray cluster to join with run.runner=pipeline, e.g. "
                   "127.0.0.1:6379 (default: RAY_ADDRESS, else Ray starts on this machine)")
    p.set_defaults(func=cmd_train)

    p = add("sweep", help="many runs at once on Ray Tune: a search space over config keys, each trial probed")
    p.add_argument("sweep", help="YAML sweep file, e.g. configs/sweeps/kld.yaml (docs/sweeps.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep file value, e.g. --set dir=runs/kld --set eval.0.data=... (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in its dir: finished trials are "
                   "kept, unfinished ones continue from their checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their resources, run nothing")
    p.add_argument("--address", default="", help="Ray cluster to run the trials on, e.g. 127.0.0.1:6379 "
                   "(default: RAY_ADDRESS, else Ray starts on this machine)")
    p.set_defaults(func=cmd_sweep)

    p = add("inspect", help="table of modules: parameters, frames, hop, receptive field")
    _add_config_args(p)
    p.add_argument("--samples", type=int, default=0, help="input length in samples (default: data.crop)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per module")
    p.set_defaults(func=cmd_inspect)

    p = add("plan", help="profile each module here, then choose stages, replicas and threads")
    _add_config_args(p)
    p.add_argument("--workers", type=int, default=0, help="workers the plan may use (default: "
                   "pipeline.workers, else one per GPU, else one per CPU core)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs the plan may use (default: those visible "
                   "when run.device is cuda or auto, else 0)")
    p.add_argument("--json", action="store_true", help="print the chosen plan, two runners-up and the profile")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cached "
                   "profile in <run.dir>/plan/")
    p.set_defaults(func=cmd_plan)

    p = add("encode", help="a trained run's modules 0..K over audio shards -> latent shards (docs/latents.md)")
    p.add_argument("run", help="run directory (local or s3://bucket/prefix)")
    p.add_argument("--module", type=int, required=True, help="the top module K: its output is stored")
    p.add_argument("--data", required=True, help="audio shards (`vgim data prepare`), local or s3://")
    p.add_argument("--out", required=True, help="where the latent shards go, local or s3://")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest committed)")
    p.add_argument("--what", choices=("params", "mean"), default="params", help="params: a variational "
                   "module's mean and log-variance, so that a module trained on them samples as in the "
                   "pipeline; mean: the features alone")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--chunk-seconds", type=float, default=10.0, help="longer utterances run in chunks of this "
                   "length, overlapping by the receptive field (the result equals the whole-utterance forward)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--workers", type=int, default=0, help="encode shards in parallel as Ray tasks on a private "
                   "Ray with this many CPUs (default 0: one process)")
    p.add_argument("--address", default="", help="encode shards as Ray tasks on this Ray cluster, e.g. "
                   "10.0.0.5:6379 or auto; every node must reach the run directory and the shards")
    p.set_defaults(func=cmd_encode)

    p = add("sequential", help="sequential greedy training: module 0 for run.steps steps, its outputs stored as "
            "latent shards, module 1 on them, ... (docs/latents.md); run again to continue after a stop")
    _add_config_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="of the latent shards between modules")
    p.add_argument("--chunk-seconds", type=float, default=10.0, help="vgim encode's chunk length")
    p.add_argument("--workers", type=int, default=0, help="encode shards as Ray tasks on a private Ray with this "
                   "many CPUs (default 0: one process)")
    p.set_defaults(func=cmd_sequential)

    p = add("config", help="print the resolved config, or every key with its type and default")
    p.add_argument("config", nargs="?", help="YAML experiment file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--keys", action="store_true", help="list every config key: type, range, default, meaning")
    p.set_defaults(func=cmd_config)

    from vgim_dist.data.cli import add_data_commands  # noqa: PLC0415
    from vgim_dist.eval.cli import add_eval_commands  # noqa: PLC0415
    from vgim_dist.tracking.cli import add_tracking_commands  # noqa: PLC0415

    add_data_commands(sub)
    add_tracking_commands(sub)
    add_eval_commands(sub)
    _show_defaults(parser)
    _accept_debug_everywhere(parser)
    return parser


def _accept_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after any subcommand at any depth, as the error lines suggest (``vgim train ... --debug``).

    A subcommand's copy has no default (``SUPPRESS``), so it never overwrites the one given before the
    subcommand (``vgim --debug train ...``).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                if not any("--debug" in a.option_strings for a in p._actions):
                    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show the traceback of an error (also VGIM_DEBUG=1)")
                _accept_debug_everywhere(p)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """The help formatter that shows defaults, for every subcommand at every depth. An option without help
    text gets one saying its default: argparse prints nothing at all for an option without help."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if action.option_strings and not action.help and not action.required and action.default != argparse.SUPPRESS:
            action.help = "default: none" if action.default in (None, "", []) else "default: %(default)s"
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _show_defaults(p)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("VGIM_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args)
        sys.stdout.flush()   # inside the try: a closed pipe may only show at the last flush
        engine = sys.modules.get("vgim_dist.parallel.deepspeed_engine")   # loaded only where a stage used it
        if engine and argv is None:   # run as the program, not called from Python: DeepSpeed needs a hard exit
            engine.end_process(code)
        return code
    except BrokenPipeError:   # the reader went away (`vgim config --keys | head`): end quietly, as Unix tools do
        if sys.stdout is sys.__stdout__:   # the real standard output (not a caller's capture): nothing to flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print("vgim: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"vgim: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (UserError, ConfigError)) else 1


def one_line(e: BaseException) -> str:
    """An error as one line: ours as they are, others with their type and a pointer to the traceback."""
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    from vgim_dist.data.store import StoreError  # noqa: PLC0415 - imported only once something failed
    from vgim_dist.storage import StorageFault  # noqa: PLC0415

    if isinstance(e, (UserError, StorageFault, StoreError)):
        return _first_line(e)     # ours name the file, the row or the store
    if isinstance(e, (FileExistsError, FileNotFoundError, PermissionError)):
        return _first_line(e)     # ours name the path and the way out; the OS's name the path
    return f"{type(e).__name__}: {_first_line(e)}; rerun with --debug for the traceback"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
