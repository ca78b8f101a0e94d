"""Typed experiment configuration: dataclasses, loaded from YAML, overridden with ``--set a.b.c=value``.

Every value is checked against its declared type and range when the config is built. An unknown key fails
with the closest valid keys; a bad value names the key, what was expected and what was given. Nothing is
read from the command line at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


def _opt(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
         factory: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with an inclusive range [lo, hi] that `from_dict` enforces."""
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    uri: str = _opt("noise://", doc="shard directory (path or s3://), or 'noise://' for seeded random audio "
                    "(tests, benchmarks)")
    crop: int = _opt(20480, lo=1, doc="samples per training window (16 kHz)")
    batch_size: int = _opt(64, lo=1)
    grid: int = _opt(160, lo=1, doc="crop offsets are multiples of this")
    short: Literal["skip", "pad"] = _opt("skip", doc="utterances shorter than a crop: left out, or zero-padded "
                                         "at the end")
    split: str = _opt("train", doc="shard split used for training")
    prefetch: int = _opt(2, lo=0, doc="batches built ahead in a background thread")
    endpoint_url: str = _opt("", doc="S3-compatible endpoint for s3:// URIs; empty = AWS_ENDPOINT_URL or AWS itself")
    cache_dir: str = _opt("", doc="where shards are unpacked for memory-mapping; empty = $VGIM_CACHE or "
                          "~/.cache/vgim_dist")
    lower_run: str = _opt("", doc="a trained run whose modules 0..data.lower_module are loaded and frozen; "
                          "this run trains the modules above (docs/latents.md). Filled in from the manifest "
                          "when data.uri holds latent shards (vgim encode)")
    lower_step: int = _opt(0, lo=0, doc="the checkpoint step of data.lower_run")
    lower_module: int = _opt(-1, lo=-1, doc="the top frozen module of data.lower_run; -1: none, every module "
                             "trains")


@dataclass
class LayerConfig:
    """One conv block: Conv1d -> [BatchNorm1d] -> ReLU -> [MaxPool1d]."""

    kernel: int = _opt(lo=1)
    stride: int = _opt(1, lo=1)
    padding: int = _opt(0, lo=0)
    pool_kernel: int = _opt(0, lo=0, doc="MaxPool1d kernel after the ReLU; 0 = no pooling")
    pool_stride: int = _opt(0, lo=0, doc="MaxPool1d stride; 0 = pool_kernel")


@dataclass
class ModuleConfig:
    """A greedy module: a run of conv blocks and/or a GRU, trained by its own loss."""

    layers: list[LayerConfig] = _opt(factory=list)
    autoregressor: int = _opt(0, lo=0, doc="GRU hidden size ending the module; 0 = none")


@dataclass
class ModelConfig:
    modules: list[ModuleConfig] = _opt(factory=list)
    channels: int = _opt(512, lo=1, doc="width of every conv layer and Gaussian head")
    batch_norm: bool = True
    variational: bool = _opt(True, doc="V-GIM Gaussian latents (two samples); false = GIM (c = z = mu)")
    kld_weight: float = _opt(0.0033, lo=0.0)
    head_kernel: int = _opt(1, lo=1, doc="kernel of the mu / log-variance heads (stride 1, same length)")
    prediction_steps: int = _opt(10, lo=1, doc="K, offsets predicted by InfoNCE")
    negatives: int = _opt(10, lo=1)
    subsample_frames: int = _opt(128, lo=2, doc="InfoNCE window when a sequence is longer")


@dataclass
class OptimConfig:
    lr: float = _opt(2e-4, lo=0.0)
    beta1: float = _opt(0.9, lo=0.0, hi=1.0)
    beta2: float = _opt(0.999, lo=0.0, hi=1.0)
    eps: float = _opt(1e-8, lo=0.0)
    weight_decay: float = _opt(0.0, lo=0.0)
    lr_decay: float = _opt(1.0, lo=0.0, hi=1.0, doc="lr *= lr_decay every decay_every steps")
    decay_every: int = _opt(0, lo=0, doc="steps per decay (an epoch); 0 = constant lr")
    grad_clip: float = _opt(0.0, lo=0.0, doc="clip each module's gradient norm to this; 0 = no clipping")


@dataclass
class RunConfig:
    dir: str = _opt("runs/default", doc="run directory: a local path or s3://bucket/prefix")
    name: str = _opt("", doc="name in MLflow run names; '' = the config file's name")
    steps: int = _opt(1000, lo=0)
    runner: Literal["reference", "pipeline"] = "reference"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = _opt(0, lo=0, doc="torch threads of each stage's process; 0 = the reference runner's default "
                        "(torch's: the cores) or a pipeline worker's reserved CPUs (at least 1); part of a run's "
                        "numbers, recorded in config.yaml")
    deterministic: bool = _opt(True, doc="deterministic algorithms only (torch.use_deterministic_algorithms; on "
                               "GPU also cuBLAS's fixed workspace); false = allow faster nondeterministic kernels")
    precision: Literal["fp32", "bf16"] = _opt("fp32", doc="bf16 = autocast the forward pass (GPU); fp32 master weights")
    log_every: int = _opt(10, lo=1)


@dataclass
class StageConfig:
    engine: Literal["torch", "deepspeed"] = _opt("torch", doc="optimizer engine of every stage")
    zero: int = _opt(0, lo=0, hi=2, doc="DeepSpeed ZeRO stage across a stage's replicas (engine: deepspeed)")


@dataclass
class PipelineConfig:
    stages: list[list[int]] | Literal["auto"] = _opt(
        factory=list, doc="module indices per stage; [] = one stage holding all; auto = planned at launch")
    in_flight: int = _opt(2, lo=1, hi=16, doc="batches a stage may run ahead of its consumer; each holds one "
                          "activation in memory (docs/pipeline.md)")
    replicas: list[int] | Literal["auto"] = _opt(
        factory=list, doc="data-parallel workers per stage, e.g. [2, 1]; [] = one each; auto = planned at launch")
    workers: int = _opt(0, lo=0, doc="workers an auto plan may use; 0 = one per CPU core, or per GPU")
    gpus_per_stage: float = _opt(0.0, lo=0.0, hi=1.0, doc="GPU share of each worker; 0 = a whole GPU each "
                                 "(an auto plan sets it when workers share GPUs)")
    max_failures: int = _opt(3, lo=-1, doc="worker-group restarts from the last checkpoint; -1 = unlimited")
    cpus_per_stage: float = _opt(0.0, lo=0.0, doc="CPUs reserved per worker; 0 = min(1, CPUs / workers)")
    placement: Literal["pack", "spread", "strict_spread"] = _opt(
        "pack", doc="where Ray puts the workers: pack onto few nodes, spread over nodes, or one per node")
    replan_after_s: float = _opt(300.0, lo=0.0, doc="after losing workers, seconds to wait for resources "
                                 "before re-planning for the workers left (merge stages, drop replicas); 0 = wait")


@dataclass
class CheckpointConfig:
    every: int = _opt(0, lo=0, doc="save every N steps; 0 = only at the end")
    keep: int = _opt(0, lo=0, doc="keep the newest N checkpoints; 0 = all")


@dataclass
class TrackingConfig:
    enabled: bool = _opt(True, doc="log to MLflow; false = metrics.jsonl only")
    uri: str = _opt("", doc="MLflow tracking URI; '' = sqlite:///<run.dir>/mlflow.db. Credentials: "
                    "MLFLOW_TRACKING_USERNAME/PASSWORD, not the URI")
    experiment: str = "vgim"
    model_name: str = _opt("", doc="registered model name; '' = do not register")
    parent_run: str = _opt("", doc="MLflow run id this job's run nests under (vgim sweep sets it to the "
                           "sweep's run); '' = a top-level run")
    flush_every: int = _opt(10, lo=1, doc="metric rows a stage buffers before one log_batch request")
    retries: int = _opt(3, lo=1, doc="attempts per request to the tracking store, with exponential backoff")
    max_pending: int = _opt(10000, lo=1, doc="metric rows a stage holds while the store is slow or away; "
                            "beyond it the oldest are dropped (metrics.jsonl keeps every row)")
    system_metrics: bool = _opt(True, doc="CPU, memory and GPU use of the training processes as system/* "
                                "metrics (needs psutil, and pynvml for GPUs)")


PROBE_TASKS = ("syllables", "vowels", "speakers")


@dataclass
class EvalConfig:
    """Probes of committed checkpoints while training, in a background evaluator (docs/evaluation.md)."""

    every: int = _opt(0, lo=0, doc="probe every N committed checkpoints (and step 0); 0 = off")
    tasks: list[str] = _opt(factory=lambda: ["syllables", "vowels"], doc=f"probe tasks, of {list(PROBE_TASKS)}")
    data: str = _opt("", doc="shards with the tasks' labels, e.g. de Boer syllable shards")
    epochs: int = _opt(20, lo=1, doc="probe epochs (z-scored features, time-averaged)")
    cpus: float = _opt(1.0, lo=0.0, doc="CPUs of the evaluator: a Ray actor's share on pipeline runs, torch "
                       "threads of its subprocess on the reference runner")


@dataclass
class Config:
    seed: int = _opt(0, lo=0)
    run: RunConfig = _opt(factory=RunConfig)
    data: DataConfig = _opt(factory=DataConfig)
    model: ModelConfig = _opt(factory=ModelConfig)
    optim: OptimConfig = _opt(factory=OptimConfig)
    pipeline: PipelineConfig = _opt(factory=PipelineConfig)
    stage: StageConfig = _opt(factory=StageConfig)
    checkpoint: CheckpointConfig = _opt(factory=CheckpointConfig)
    tracking: TrackingConfig = _opt(factory=TrackingConfig)
    eval: EvalConfig = _opt(factory=EvalConfig)

    @property
    def planned(self) -> bool:
        """Stages or replicas are ``auto``: the launch replaces them with a plan before anything runs."""
        return "auto" in (self.pipeline.stages, self.pipeline.replicas)

    def stage_modules(self) -> list[list[int]]:
        """The module indices of each stage (one stage with every module when none are given)."""
        if self.pipeline.stages == "auto":
            raise ConfigError("pipeline.stages: auto has not been planned yet (vgim_dist.plan.auto)")
        return self.pipeline.stages or [list(range(self.data.lower_module + 1, len(self.model.modules)))]

    def stage_replicas(self) -> list[int]:
        """Workers per stage (1 each unless ``pipeline.replicas`` says otherwise)."""
        if self.pipeline.replicas == "auto":
            raise ConfigError("pipeline.replicas: auto has not been planned yet (vgim_dist.plan.auto)")
        return self.pipeline.replicas or [1] * len(self.stage_modules())

    def validate(self) -> None:
        """Cross-field checks; each message carries the numbers that broke it."""
        for key, value in (("run.dir", self.run.dir), ("data.uri", self.data.uri)):
            check_uri(key, value, schemes=("s3", "noise") if key == "data.uri" else ("s3",))
        if self.tracking.uri:
            check_uri("tracking.uri", self.tracking.uri, schemes=("http", "https", "sqlite", "databricks",
                                                                  "postgresql", "mysql", "file"))
            if not self.tracking.enabled:
                raise ConfigError(f"tracking.uri is set ({redact(self.tracking.uri)}) but tracking.enabled is "
                                  "false; drop one of them")
        n = len(self.model.modules)
        if n == 0:
            raise ConfigError("model.modules: at least one module is required")
        if self.data.lower_module >= n - 1:
            raise ConfigError(f"data.lower_module: {self.data.lower_module} leaves no module to train of the "
                              f"{n} in model.modules")
        if (self.data.lower_module >= 0) != bool(self.data.lower_run):
            raise ConfigError("data.lower_run and data.lower_module: give both (a run and its top frozen module) "
                              "or neither")
        for i, m in enumerate(self.model.modules):
            if not m.layers and not m.autoregressor:
                raise ConfigError(f"model.modules.{i}: a module needs conv layers, an autoregressor, or both")
            if not m.layers and i == 0:
                raise ConfigError("model.modules.0: the first module must start with conv layers (raw audio in)")
        if self.eval.every:
            if not self.eval.data:
                raise ConfigError("eval.data: eval.every needs shards with the probe labels, e.g. de Boer syllable "
                                  "shards (vgim data prepare --format deboer --level syllable ...)")
            if "://" in self.run.dir:
                raise ConfigError(f"eval.every: the evaluator reads a local run directory; run.dir is {self.run.dir}")
            for i, t in enumerate(self.eval.tasks):
                if t not in PROBE_TASKS:
                    raise ConfigError(f"eval.tasks.{i}: expected one of {list(PROBE_TASKS)}, got {t!r}")
        if self.planned:
            if self.pipeline.replicas == "auto" and self.run.runner != "pipeline":
                raise ConfigError("pipeline.replicas: auto needs run.runner: pipeline")
            return  # the split is checked once planned
        check_layout(self)


# --------------------------------------------------------------------------------------------- layout


def check_replicas(replicas: list[int] | tuple[int, ...]) -> None:
    """Neighbouring stages have equal replica counts, or 1 on one side (docs/pipeline.md)."""
    for s in range(len(replicas) - 1):
        a, b = replicas[s], replicas[s + 1]
        if a != b and min(a, b) != 1:
            raise ConfigError(f"pipeline.replicas: stages {s} and {s + 1} have {a} and {b} replicas; neighbours "
                              "need equal counts, or 1 on one side")


def check_layout(cfg: Config) -> None:
    """Every rule a (planned) layout obeys, whoever made it (the config, the planner, a re-plan); each message
    carries the numbers that broke it."""
    n, stages, first = len(cfg.model.modules), cfg.stage_modules(), cfg.data.lower_module + 1
    flat = [i for s in stages for i in s]
    if not first and flat and flat[0] > 0 and cfg.data.uri != "noise://":
        first = flat[0]     # latent shards of module first - 1, perhaps: the launch reads their manifest and checks
    if flat != list(range(first, n)) or any(not s for s in stages):
        frozen = f" (modules 0..{first - 1} are frozen: data.lower_module = {first - 1})" if first else ""
        raise ConfigError(f"pipeline.stages: {cfg.pipeline.stages} must split modules {first}..{n - 1} into "
                          f"non-empty contiguous runs in order, e.g. {[[first], list(range(first + 1, n))]}{frozen}")
    reps = cfg.pipeline.replicas
    if reps:
        if len(reps) != len(stages) or min(reps) < 1:
            raise ConfigError(f"pipeline.replicas: {reps} must give a count >= 1 for each of the {len(stages)} "
                              f"stages {stages}")
        check_replicas(reps)
        if max(reps) > 1 and cfg.run.runner != "pipeline":
            raise ConfigError(f"pipeline.replicas: {reps} needs run.runner: pipeline")


# --------------------------------------------------------------------------------------------- URIs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$")
_USERINFO = re.compile(r"(?<=://)([^/@\s:]*)(:[^/@\s]*)?@")     # scheme://user[:password]@host


_MISTYPED_URI = re.compile(r"(s3|sqlite|file|https?)//+(.*)$", re.IGNORECASE)
log = logging.getLogger(__name__)


def check_uri(key: str, value: str, schemes: tuple[str, ...]) -> None:
    """A local path, or ``<scheme>://...`` with a scheme from ``schemes``; ``s3:/x`` (one slash), ``s3:x``, an
    unknown scheme and an empty value fail with the key's name instead of becoming a local folder."""
    if not value.strip():
        raise ConfigError(f"{key}: empty; give a local path or {schemes[0]}://...")
    m = _SCHEME.match(value)
    if not m or len(m.group(1)) == 1:        # a plain path (or a Windows drive letter)
        if typo := _MISTYPED_URI.match(value):
            log.warning("%s: %r is taken as a local folder, but looks like a URI with its colon missing; did you "
                        "mean %s://%s?", key, redact(value), typo.group(1), typo.group(2))
        return
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in schemes:
        raise ConfigError(f"{key}: unsupported scheme {scheme!r} in {redact(value)!r}; expected a local path or "
                          f"{', '.join(s + '://' for s in schemes)}")
    if not rest.startswith("//") or (scheme not in ("sqlite", "file", "noise") and not rest[2:].strip("/")):
        raise ConfigError(f"{key}: malformed URI {redact(value)!r}; expected {scheme}://<host or bucket>/...")


def redact(text: str) -> str:
    """``text`` with the user and password of every ``scheme://user:password@host`` replaced by ``***``."""
    return _USERINFO.sub(lambda m: "***@" if m.group(2) else m.group(0), text)


# --------------------------------------------------------------------------------------------- parsing


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, key: str, meta: dict | None = None) -> Any:
    """Check ``value`` against the type hint ``tp``; return it converted (YAML strings like 2e-4 -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:   # checked where it is used (a sweep's values, by the config they end up in)
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}{hint}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for a in args[:-1]:  # the first alternative that accepts the value; the last one's error otherwise
            try:
                return _coerce(value, a, key, meta)
            except ConfigError:
                pass
        try:
            return _coerce(value, args[-1], key, meta)
        except ConfigError:
            raise ConfigError(f"{key}: expected {' or '.join(_kind(a) for a in args)}, got {value!r}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if value != value:
            raise ConfigError(f"{key}: expected a number, got NaN")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported config type {tp} at {key}")
    lo, hi = (meta or {}).get("lo"), (meta or {}).get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: expected {tp.__name__} {bounds}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and ill-typed values."""
    names = _field_names(cls)
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(f'{prefix}.{c}' if prefix else c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML; list elements addressed by index) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. run.steps=100")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string such as a URI with a colon
    parts = key.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key!r}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key!r}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def yaml_error(path: str | Path, e: yaml.YAMLError) -> str:
    """A YAML error as one line naming the file, the line and the column: ``f.yaml, line 3, column 8: ...``."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def read_tree(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML file's mapping (empty without a file), dotted overrides applied; unchecked."""
    tree: dict = {}
    if path is not None:
        try:
            tree = _yaml_tree(Path(path).read_text(), path)
        except OSError as e:
            raise ConfigError(f"{path}: {e}") from None
    for o in overrides:
        apply_override(tree, o)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, type-check and validate."""
    cfg = from_dict(Config, read_tree(path, overrides))
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    cfg.validate()
    return cfg


def config_from_text(text: str, where: str) -> Config:
    """A config written out by `dump_config` (a run directory's ``config.yaml``, local or on S3), validated;
    ``where`` names it in errors."""
    try:
        cfg = from_dict(Config, _yaml_tree(text, where))
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _yaml_tree(text: str, where: str | Path) -> dict:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(where, e)) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return tree


def _kind(tp: Any) -> str:
    """A type hint as the config reference names it: ``int``, ``one of a|b``, ``list[int] or auto``."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return choices[0] if len(choices) == 1 else "one of " + "|".join(choices)
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_kind(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf key of the schema: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        kind = _kind(tp)
        if lo is not None:
            kind += f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
        rows.append((key, kind, repr(default), f.metadata.get("doc", "")))
    return rows


def dump_config(cfg: Config) -> str:
    """The config as YAML, credentials in URIs redacted (it is written to run.dir and to MLflow)."""
    return redact(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
