"""``vgim eval probe``, ``vgim eval decoder`` and ``vgim report``. The main CLI calls `add_eval_commands`."""

from __future__ import annotations

import argparse
import functools
import json

from vgim_dist.errors import UserError
from vgim_dist.eval.names import LOSSES, TASKS


def _user_errors(fn):
    """Bad input (a missing run or checkpoint, wrong shards, an unknown module) as one line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(a: argparse.Namespace) -> int:
        from vgim_dist.data.store import StoreError  # noqa: PLC0415

        try:
            return fn(a)
        except (FileNotFoundError, ValueError, StoreError) as e:
            command = " ".join(filter(None, ("vgim", a.command, getattr(a, "eval_command", None))))
            raise UserError(str(e), command, _hint(e, a)) from e
    return wrapper


def _hint(e: Exception, a: argparse.Namespace) -> str:
    """What to check, where the message does not already say what to do (``...; pass --data ...``)."""
    from vgim_dist.data.store import StoreError  # noqa: PLC0415

    text = str(e)
    if ";" in text:
        return ""
    data = getattr(a, "data", "")
    if isinstance(e, StoreError) or (data and data in text):
        return "check --data"
    if any(run in text for run in getattr(a, "runs", None) or [a.run]):
        return "check the run directory: a run.dir written by `vgim train`"
    return ""


@_user_errors
def _probe(a: argparse.Namespace) -> int:
    from vgim_dist.eval.probes import ProbeSettings, probe_run  # noqa: PLC0415

    settings = ProbeSettings(epochs=a.epochs, lr=a.lr or (1e-4 if a.task == "phones" else 1e-3),
                             batch_size=a.batch_size, standardize=a.standardize, features=a.features, pool=a.pool,
                             bias=not a.no_bias, split=a.split)
    result = probe_run(a.run, a.task, a.data, modules=None if a.module is None else [a.module], repeats=a.repeats,
                       mode=_LATENT[a.latent], settings=settings, few_labels=a.few_labels, seed=a.seed, step=a.step,
                       train_split=a.train_split, test_split=a.test_split, track=not a.no_mlflow,
                       baseline=not a.no_baseline)
    print(json.dumps({"task": a.task, "run": a.run, "protocol": result["protocol"], "split": result["split"],
                      "accuracy": {m: round(e["accuracy"]["mean"], 4) for m, e in result["modules"].items()},
                      "step0_accuracy": {m: round(e["step0"]["accuracy"]["mean"], 4)
                                         for m, e in result["modules"].items() if "step0" in e}}))
    return 0


@_user_errors
def _decoder(a: argparse.Namespace) -> int:
    from vgim_dist.eval.decoder import decoder_run  # noqa: PLC0415

    r = decoder_run(a.run, a.module, a.loss, data=a.data, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                    mode=_LATENT[a.latent], examples=a.examples, draws=a.draws, seed=a.seed, step=a.step,
                    test_split=a.test_split, track=not a.no_mlflow)
    print(json.dumps({"run": a.run, "module": a.module, "loss": a.loss, "train_loss": r["curve"][-1]["loss"],
                      "test_loss": r["test_loss"]}))
    return 0


@_user_errors
def _report(a: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from vgim_dist.eval.report import build_report, collect, findings  # noqa: PLC0415
    from vgim_dist.eval.sweep_report import build_sweep_report, is_sweep  # noqa: PLC0415

    if len(a.runs) == 1 and is_sweep(a.runs[0]):
        print(build_sweep_report(a.runs[0], Path(a.out) if a.out else None, runs=not a.no_runs,
                                 track=not a.no_mlflow))
        return 0
    out = build_report(a.runs, Path(a.out) if a.out else None, tsne=not a.no_tsne, track=not a.no_mlflow)
    # Runs of the thesis architecture: their tables beside the thesis's published figures, here as well.
    for section in out.with_suffix(".md").read_text().split("### ")[1:]:
        if "(thesis, published)" in section:
            print(f"### {section.strip()}\n")
    for line in findings([collect(run) for run in a.runs]):   # what the runs show, and what they cannot yet
        print(line, end="\n\n")
    print(out)
    return 0


_LATENT = {"mu": "mean", "sample": "sample"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by `vgim train` (config.yaml + checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--latent", choices=tuple(_LATENT), default="mu",
                   help="what a Gaussian module passes on: mu, or one seeded draw from N(mu, sigma^2) (default: mu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation's initialisation and batches")
    p.add_argument("--test-split", default="test", help="the split evaluated")
    p.add_argument("--no-mlflow", action="store_true", help="write the JSON results only")


def add_eval_commands(subparsers) -> None:
    """Register ``eval probe``, ``eval decoder`` and ``report``."""
    ev = subparsers.add_parser("eval", help="probes and decoders on a trained run's frozen encoder")
    esub = ev.add_subparsers(dest="eval_command", required=True)

    p = esub.add_parser("probe", help="linear probes on frozen features, beside the same probes at step 0")
    _common(p)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", required=True, help="shards with the task's labels, e.g. de Boer syllable shards "
                   "(vgim data prepare --format deboer --level syllable --syllable-split clean)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--module", type=int, default=None, help="one module")
    which.add_argument("--all", action="store_true", help="every module (the default; phones: every GRU module)")
    p.add_argument("--repeats", type=int, default=1, help="probes per module with different seeds: mean and std")
    p.add_argument("--few-labels", action="store_true", help="also the curve for 1, 2, 4, ... 128 labels per class")
    p.add_argument("--features", choices=("pooled", "flatten"), default="pooled",
                   help="pooled over time, or the flattened C x T output (the thesis's syllable probe; clips of one "
                   "length) (default: pooled)")
    p.add_argument("--pool", choices=("mean", "max"), default="mean",
                   help="pooling over time (the thesis's vowel probe: max) (default: mean)")
    p.add_argument("--no-bias", action="store_true", help="a probe without bias (the thesis's vowel probe)")
    p.add_argument("--split", choices=("given", "reshuffle"), default="given",
                   help="the prepared train/test splits, or a fresh 80/20 reshuffle of both per repeat (the "
                   "thesis's table) (default: given)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the same probes on the encoder as initialised (step 0)")
    p.add_argument("--epochs", type=int, default=50, help="(the thesis's table: 100)")
    p.add_argument("--lr", type=float, default=0.0, help="default: 1e-3, phones 1e-4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--standardize", action="store_true",
                   help="z-score each feature with train-split statistics (docs/method.md probes raw features)")
    p.add_argument("--train-split", default="train")
    p.set_defaults(func=_probe)

    p = esub.add_parser("decoder", help="train a decoder for one module; reconstructions, N(0, I) decodes")
    _common(p)
    p.add_argument("--module", type=int, required=True)
    p.add_argument("--loss", choices=LOSSES, default="mse")
    p.add_argument("--data", default="", help="shards to train and test on (default: the run's data.uri; "
                   "for a run from latent shards, the audio they were encoded from)")
    p.add_argument("--steps", type=int, default=1000, help="decoder training steps")
    p.add_argument("--batch-size", type=int, default=64, help="clips per decoder step")
    p.add_argument("--lr", type=float, default=2e-4, help="the decoder's Adam learning rate")
    p.add_argument("--examples", type=int, default=4, help="test clips written as original + reconstruction WAV")
    p.add_argument("--draws", type=int, default=4, help="decodes of N(0, I) draws written as WAV")
    p.set_defaults(func=_decoder)

    p = subparsers.add_parser("report", help="one self-contained HTML page comparing runs' evaluations, or a "
                              "sweep's accuracies against its swept values")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or one sweep directory (vgim sweep)")
    p.add_argument("--out", default="", help="HTML path (default: RUN/eval/report.html for one run, "
                   "SWEEP/report.html for a sweep, else report.html in the runs' common folder)")
    p.add_argument("--no-runs", action="store_true", help="a sweep: skip writing each trial's own report")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plots (the slowest part)")
    p.add_argument("--no-mlflow", action="store_true")
    p.set_defaults(func=_report)
