"""The sweep file: a base config, a search space over config keys, the evaluation every trial ends with, the
metric to rank by and the resources of a trial (docs/sweeps.md). Typed and checked like a config: an unknown
key fails with the closest valid ones, and every trial's config is built and validated before anything runs.

`plan` expands the space into the trials, in a fixed order, random draws from the sweep's own seed: a dry
run, a run and a resumed run see the same trials.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vgim_dist.config import (
    PROBE_TASKS,
    Config,
    ConfigError,
    _opt,
    check_uri,
    describe_keys,
    dump_config,
    from_dict,
    load_config,
    read_tree,
)
from vgim_dist.storage import absolute_uri

CONFIG_KEY = "config"   # a space key whose values are config files: the method itself swept


@dataclass
class Dimension:
    """One swept key: exactly one of the four kinds."""

    grid: list[Any] = _opt(factory=list, doc="every value, crossed with the other grids")
    choice: list[Any] = _opt(factory=list, doc="one value drawn at random per sample")
    uniform: list[float] = _opt(factory=list, doc="[low, high], drawn uniformly per sample")
    loguniform: list[float] = _opt(factory=list, doc="[low, high], drawn log-uniformly per sample (low > 0)")


@dataclass
class EvalSpec:
    """A `vgim eval probe` every trial ends with, on its last checkpoint (the options of that command)."""

    task: Literal["syllables", "vowels", "speakers"] = _opt(doc=f"probe task, of {list(PROBE_TASKS)}")
    data: str = _opt(doc="shards with the task's labels")
    features: Literal["pooled", "flatten"] = "pooled"
    pool: Literal["mean", "max"] = "mean"
    bias: bool = True
    standardize: bool = False
    split: Literal["given", "reshuffle"] = "given"
    repeats: int = _opt(1, lo=1)
    epochs: int = _opt(50, lo=1)
    lr: float = _opt(1e-3, lo=0.0)
    batch_size: int = _opt(64, lo=1)
    seed: int = _opt(0, lo=0)
    baseline: bool = _opt(True, doc="also probe the encoder as initialised (step 0)")


@dataclass
class MetricSpec:
    eval: int = _opt(0, lo=0, doc="which entry of `eval` ranks the trials")
    module: int = _opt(-1, doc="which module's accuracy; -1 = the last")


@dataclass
class Resources:
    cpus: float = _opt(1.0, lo=0.0, doc="CPUs per trial that trains in its own process (run.runner: reference)")
    gpus: float = _opt(0.0, lo=0.0, doc="GPUs per such trial; a fraction lets trials share a GPU")
    driver_cpus: float = _opt(0.1, lo=0.01, doc="CPUs of a pipeline trial's own process, which only drives; its "
                              "stage workers reserve what its config gives them (pipeline.cpus_per_stage, ...)")


@dataclass
class Stopping:
    """Early stopping on the probe curve of the background evaluator (eval.every); off by default, since the
    thesis compares runs trained for equal steps."""

    scheduler: Literal["none", "asha", "median"] = _opt("none", doc="asha: successive halving; median: stop a "
                                                         "trial below the median of the others at the same step")
    task: Literal["syllables", "vowels", "speakers"] = _opt("syllables", doc="the probe curve, of eval.tasks")
    module: int = _opt(-1, doc="whose accuracy; -1 = the last module")
    grace: int = _opt(0, lo=0, doc="training steps before a trial may be stopped")


@dataclass
class SweepFile:
    dir: str = _opt(doc="sweep directory (path or s3://): trials/<name>/ holds each trial's run")
    base: str = _opt("", doc="config file every trial starts from; may be left out where the space sweeps `config`")
    set: dict[str, Any] = _opt(factory=dict, doc="config values for every trial, nested like a config file")
    space: dict[str, Dimension] = _opt(factory=dict, doc="config key -> values (a list is a grid)")
    samples: int = _opt(1, lo=1, doc="draws of the random keys, each crossed with the grids")
    seed: int = _opt(0, lo=0, doc="seed of the random draws")
    eval: list[EvalSpec] = _opt(factory=list)
    metric: MetricSpec = _opt(factory=MetricSpec)
    resources: Resources = _opt(factory=Resources)
    concurrency: int = _opt(0, lo=0, doc="trials at once at most; 0 = as many as the resources allow")
    retries: int = _opt(0, lo=0, doc="restarts of a failed trial (from its last checkpoint)")
    stopping: Stopping = _opt(factory=Stopping)


@dataclass
class Trial:
    name: str                     # also its run directory's name, under <dir>/trials/
    params: dict[str, Any]        # swept key -> value (``config``: the config file's name)
    config: str                   # the trial's resolved config, YAML: what its Ray worker trains
    bundles: list[dict[str, float]] = field(default_factory=list)  # the trial's resources, placed together

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "config": self.config, "bundles": self.bundles}


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepFile:
    """The sweep file, with ``--set`` overrides of its own keys (``dir=...``, ``eval.0.data=...``)."""
    tree = read_tree(path, overrides)
    # A list is a grid: the common case reads `seed: [0, 1, 2]`.
    space = tree.get("space")
    if isinstance(space, dict):
        tree["space"] = {k: {"grid": v} if isinstance(v, list) else v for k, v in space.items()}
    try:
        sweep = from_dict(SweepFile, tree)
        check(sweep)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return sweep


def check(s: SweepFile) -> None:
    """What the schema alone cannot say; each message names the key."""
    check_uri("dir", s.dir, schemes=("s3",))
    if not s.base and CONFIG_KEY not in s.space:
        raise ConfigError(f"base: required (the config file every trial starts from), unless space.{CONFIG_KEY} "
                          "sweeps config files")
    keys = [k for k, *_ in describe_keys()]
    for key, d in s.space.items():
        # A leaf key, or an item inside a list-valued one (model.modules.1.autoregressor).
        if key != CONFIG_KEY and key not in keys and not any(key.startswith(f"{k}.") for k in keys):
            close = difflib.get_close_matches(key, [CONFIG_KEY, *keys], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (vgim config --keys lists them)"
            raise ConfigError(f"space.{key}: not a config key{hint}")
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(d, k)]
        if len(kinds) != 1:
            raise ConfigError(f"space.{key}: give exactly one of grid, choice, uniform, loguniform (got "
                              f"{', '.join(kinds) or 'none'})")
        for kind in ("uniform", "loguniform"):
            r = getattr(d, kind)
            if r and (len(r) != 2 or r[0] >= r[1] or (kind == "loguniform" and r[0] <= 0)):
                raise ConfigError(f"space.{key}.{kind}: expected [low, high] with low < high"
                                  + (" and low > 0" if kind == "loguniform" else "") + f", got {r}")
        if key == CONFIG_KEY and not d.grid and not d.choice:
            raise ConfigError(f"space.{CONFIG_KEY}: config files are a grid or a choice, not a range")
    if s.eval and "://" in s.dir:
        raise ConfigError(f"eval: probes read local run directories; dir is {s.dir}")
    if s.resources.cpus + s.resources.gpus <= 0:
        raise ConfigError("resources: a trial needs some CPU or GPU")
    if s.eval and s.metric.eval >= len(s.eval):
        raise ConfigError(f"metric.eval: {s.metric.eval}, but eval has {len(s.eval)} entries")


def _flat(tree: dict, prefix: str = "") -> list[str]:
    """A nested mapping as ``key=value`` overrides; values as JSON, which YAML reads back unchanged."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def _points(s: SweepFile) -> list[dict[str, Any]]:
    """Every point of the space: the samples of the random keys, each crossed with the grids, in file order."""
    rng = random.Random(s.seed)
    grids = {k: d.grid for k, d in s.space.items() if d.grid}
    points = []
    for _ in range(s.samples if len(grids) < len(s.space) else 1):
        drawn = {}
        for k, d in s.space.items():
            if d.choice:
                drawn[k] = rng.choice(d.choice)
            elif d.uniform:
                drawn[k] = rng.uniform(*d.uniform)
            elif d.loguniform:
                drawn[k] = math.exp(rng.uniform(math.log(d.loguniform[0]), math.log(d.loguniform[1])))
        for combo in itertools.product(*grids.values()):
            point = {**drawn, **dict(zip(grids, combo))}
            points.append({k: point[k] for k in s.space})
    return points


def _label(key: str, value: Any) -> str:
    short = key.rsplit(".", 1)[-1]
    text = Path(value).stem if key == CONFIG_KEY else f"{value:.4g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{short}={text}")


def bundles(cfg: Config, r: Resources) -> list[dict[str, float]]:
    """The trial's resources: one bundle for the trial's process. A reference trial trains in it. A pipeline
    trial only drives from it, and Ray Train places its stage workers in a placement group of their own, all
    together or none (docs/sweeps.md), so they are not reserved twice."""
    if cfg.run.runner == "pipeline":
        return [{"CPU": r.driver_cpus}]
    return [{"CPU": r.cpus} | ({"GPU": r.gpus} if r.gpus else {})]


def plan(s: SweepFile, sweep_path: str | Path = "sweep", extra: list[str] | tuple[str, ...] = ()) -> list[Trial]:
    """The trials, each config built and validated now; an error names the trial and the key. ``extra``:
    overrides the sweep adds to every trial (its MLflow run)."""
    from vgim_dist.launch import absolute_paths  # noqa: PLC0415 - torch, once the file itself is valid

    root = absolute_uri(s.dir)
    trials = []
    for i, point in enumerate(_points(s)):
        name = "-".join([f"{i:03d}", *(_label(k, v) for k, v in point.items())])
        base = point.get(CONFIG_KEY, s.base)
        swept = [f"{k}={json.dumps(v)}" for k, v in point.items() if k != CONFIG_KEY]
        overrides = [*_flat(s.set), *swept, f"run.dir={root}/trials/{name}", *extra]
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"{sweep_path}: trial {name}: {e}") from None
        n = len(cfg.model.modules)
        if s.eval and not -n <= s.metric.module < n:
            raise ConfigError(f"{sweep_path}: metric.module: {s.metric.module}, but trial {name} has {n} modules")
        stop = s.stopping
        if stop.scheduler != "none":
            if not cfg.eval.every or stop.task not in cfg.eval.tasks:
                raise ConfigError(f"{sweep_path}: stopping.scheduler: {stop.scheduler} stops on the {stop.task} probe "
                                  f"curve, but trial {name} has eval.every {cfg.eval.every} and eval.tasks "
                                  f"{cfg.eval.tasks}; set them in `set` (docs/sweeps.md)")
            if not -n <= stop.module < n:
                raise ConfigError(f"{sweep_path}: stopping.module: {stop.module}, but trial {name} has {n} modules")
        if not cfg.run.name or cfg.run.name == Path(base).stem:
            cfg.run.name = name
        if cfg.run.runner == "reference":
            if cfg.run.threads == 0:   # a trial's share, not the machine's cores
                cfg.run.threads = max(1, int(s.resources.cpus))
            # Ray hides no GPU from a trial that asked for none: it must not take one that others were given.
            if not s.resources.gpus and cfg.run.device != "cpu":
                if cfg.run.device == "cuda":
                    raise ConfigError(f"{sweep_path}: resources.gpus: 0, but trial {name} has run.device: cuda; "
                                      "give each trial a GPU share, e.g. resources.gpus: 0.25")
                cfg.run.device = "cpu"
        params = {k: Path(v).stem if k == CONFIG_KEY else v for k, v in point.items()}
        trials.append(Trial(name, params, dump_config(absolute_paths(cfg)), bundles(cfg, s.resources)))
    return trials


def trial_config(text: str) -> Config:
    """A trial's config as `plan` wrote it, checked again where it runs."""
    cfg = from_dict(Config, yaml.safe_load(text))
    cfg.validate()
    return cfg
