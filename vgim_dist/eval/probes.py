"""Linear probes on frozen features (docs/method.md): how much of a label a module's output makes linearly
readable.

One Linear layer on a module's output, cross-entropy, Adam, a fixed number of epochs over the train split,
then accuracy on the whole test split in its fixed order. Two protocols:
- the default (the published code's): the output averaged over time (per frame for phones), the splits as
  the shards give them;
- the thesis's table: syllables from the flattened C x T output, vowels max-pooled over time without a
  bias, 100 epochs, a fresh 80/20 reshuffle of train + test for every repeat.
Every random choice (probe initialisation, batch order, reshuffles, few-label subsets, sampled features)
comes from a seed derived from (seed, task, module, repeat), so a probe run repeats exactly on the CPU.
Every result also probes the encoder as initialised (step 0), so a reader sees what training bought.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn

from vgim_dist.data.readers import SYLLABLES, VOWELS
from vgim_dist.eval.features import (
    FeatureMode,
    Run,
    SplitFeatures,
    extract,
    load_run,
    split_rule,
)
from vgim_dist.eval.names import TASKS, Task
from vgim_dist.eval.track import eval_dir, log_evaluation
from vgim_dist.progress import progress
from vgim_dist.seeding import derive_seed

PHONE_CLASSES = 41
PHONE_HOP = 160  # converted_aligned_phones.txt: one label per 10 ms at 16 kHz
FEW_LABELS = tuple(2 ** k for k in range(8))  # 1, 2, 4, ... 128 labelled examples per class

log = logging.getLogger(__name__)


Split = Literal["given", "reshuffle"]


@dataclass
class ProbeSettings:
    """The default protocol (docs/method.md); phones use lr 1e-4 unless set."""

    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    standardize: bool = False  # z-score each channel with train-split statistics before the probe
    features: Literal["pooled", "flatten"] = "pooled"  # flatten: the C x T output, no pooling
    pool: Literal["mean", "max"] = "mean"  # over time, for pooled features
    bias: bool = True
    split: Split = "given"  # reshuffle: a fresh 80/20 split of train + test per repeat

    @property
    def reduce(self) -> str:
        return "flatten" if self.features == "flatten" else self.pool

    def protocol(self) -> str:
        """One line that a results table prints beside every number."""
        shape = "flattened C x T" if self.features == "flatten" else f"{self.pool} over time"
        return (f"{shape}, {'' if self.bias else 'no '}bias, {'z-scored' if self.standardize else 'raw'}, "
                f"{self.epochs} epochs, lr {self.lr:g}")


def standardize(xtr: torch.Tensor, xte: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the train split's per-channel mean and std. A linear probe can express this
    affine map itself, so accuracy at convergence is unchanged; it only spares Adam from crawling along
    channels whose spread across clips is tiny (a briefly trained encoder's, say)."""
    mean, std = xtr.mean(dim=0), xtr.std(dim=0).clamp_min(1e-8)
    return (xtr - mean) / std, (xte - mean) / std


# --------------------------------------------------------------------------------------------- labels


def _label(task: str, u, uri: str) -> str | list[int]:
    if task == "speakers":
        return u.speaker
    key = {"syllables": "syllable", "vowels": "vowel", "phones": "phones"}[task]
    if key not in u.labels:
        hint = ("de Boer syllable shards (vgim data prepare --format deboer --level syllable)"
                if task in ("syllables", "vowels") else "LibriSpeech shards with converted_aligned_phones.txt")
        raise ValueError(f"{uri}: utterance {u.id} has no {key!r} label; the {task} probe needs {hint}")
    return u.labels[key]


def classes_for(task: str, train: SplitFeatures, uri: str) -> list[str]:
    if task == "syllables":
        return list(SYLLABLES)
    if task == "vowels":
        return list(VOWELS)
    if task == "phones":
        return [str(c) for c in range(PHONE_CLASSES)]
    return sorted({_label(task, u, uri) for u in train.utterances})


def utterance_targets(task: str, feats: SplitFeatures, classes: list[str], uri: str) -> torch.Tensor:
    """(N,) class indices; -1 for a label the train split never had (a test-only speaker)."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(_label(task, u, uri), -1) for u in feats.utterances])


def frame_rows(feats: SplitFeatures, module: int, uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Phones: every frame of every utterance as a row, (F, C) features and (F,) labels, clipped to the
    shorter of the two sequences (the encoder's last frames can outrun the alignment, or fall short)."""
    xs, ys = [], []
    for u, z in zip(feats.utterances, feats.frames[module]):          # z: (T_m, C)
        labels = torch.tensor(_label("phones", u, uri))
        n = min(len(labels), len(z))
        xs.append(z[:n])
        ys.append(labels[:n])
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------------- probe


def train_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, s: ProbeSettings, seed: int) -> nn.Linear:
    """A Linear(D -> n_classes) fitted to (x (N, D), y (N,)) with Adam and cross-entropy, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        probe = nn.Linear(x.shape[1], n_classes, bias=s.bias)
    order = torch.Generator().manual_seed(derive_seed(seed, "order"))
    opt = torch.optim.Adam(probe.parameters(), lr=s.lr)
    for _ in range(s.epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), s.batch_size):  # the last, partial batch is kept
            idx = perm[i:i + s.batch_size]
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe


@torch.no_grad()
def accuracy(probe: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (probe(x).argmax(dim=1) == y).float().mean().item()


def few_label_subset(y: torch.Tensor, n: int, n_classes: int, seed: int) -> torch.Tensor:
    """Indices of up to ``n`` random examples of every class (all of a class that has fewer)."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten() for c in range(n_classes)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:n]] for p in picks]).sort().values


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


# --------------------------------------------------------------------------------------------- run


def default_modules(run: Run, task: str) -> list[int]:
    if task != "phones":
        return list(range(len(run.modules)))
    grus = [i for i, m in enumerate(run.cfg.model.modules) if m.autoregressor]
    if not grus:
        raise ValueError(f"{run.dir}: the phone probe reads a GRU module's output and this run has none; "
                         f"pass --module M for a module with a {PHONE_HOP}-sample hop")
    return grus


def data_name(uri: str) -> str:
    """The short name of a data set in result names: its folder's name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1]) or "data"


def result_name(task: str, data: str, mode: FeatureMode, s: ProbeSettings) -> str:
    """``probe-<task>[-<protocol options>].<data set>``: probes of two data sets or protocols never share a file."""
    options = [s.features if s.features == "flatten" else "", s.pool if s.pool != "mean" else "",
               "" if s.bias else "nobias", s.split if s.split != "given" else "", "sample" if mode == "sample" else "",
               "standardized" if s.standardize else ""]
    return "-".join([f"probe-{task}", *filter(None, options)]) + f".{data_name(data)}"


def _rows(task: str, feats: SplitFeatures, m: int, classes: list[str], uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    if feats.frames is not None:
        return frame_rows(feats, m, uri)
    return feats.vectors[m], utterance_targets(task, feats, classes, uri)


def _splits(train: tuple, test: tuple, s: ProbeSettings, seed: int, repeat: int) -> tuple:
    """(xtr, ytr, xte, yte) for one repeat: the given split, or a fresh 80/20 reshuffle of both together."""
    if s.split == "given":
        return (*train, *test)
    x, y = torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(derive_seed(seed, "reshuffle", repeat)))
    n_test = round(0.2 * len(x))
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def _probe_module(task: str, m: int, train: SplitFeatures, test: SplitFeatures, classes: list[str], uri: str,
                  s: ProbeSettings, repeats: int, seed: int, few_labels: bool) -> dict:
    """Accuracy over ``repeats`` probes of module ``m``, and what a reader needs to judge it."""
    given = _rows(task, train, m, classes, uri), _rows(task, test, m, classes, uri)
    if given[0][0].shape[1] != given[1][0].shape[1]:
        raise ValueError(f"{uri}: train and test features of module {m} differ in size "
                         f"({given[0][0].shape[1]} vs {given[1][0].shape[1]}); flattened features need one clip length")
    accs, entry = [], {}
    for r in range(repeats):
        xtr, ytr, xte, yte = _splits(*given, s, seed, r)
        if s.standardize:
            xtr, xte = standardize(xtr, xte)
        keep = yte >= 0  # test-only speakers cannot be predicted by a probe that never saw them
        xte, yte = xte[keep], yte[keep]
        probe = train_probe(xtr, ytr, len(classes), s, derive_seed(seed, "probe", task, m, r))
        accs.append(accuracy(probe, xte, yte))
        if r == 0:
            counts = torch.bincount(yte, minlength=len(classes))
            entry = {"n_train": len(xtr), "n_test": len(xte), "n_test_unseen_label": int((~keep).sum()),
                     "chance_uniform": 1 / len(classes), "chance_majority": counts.max().item() / len(yte),
                     "dim": xtr.shape[1], "weight": probe.weight.detach().tolist()}  # (classes, D): vowel heat map
            if few_labels:
                entry["few_labels"] = _few_label_curve(xtr, ytr, xte, yte, len(classes), s, repeats, seed, task, m)
    return {"accuracy": _stats(accs), **entry}


def probe_run(run_dir: str, task: Task, data: str, modules: list[int] | None = None, repeats: int = 1,
              mode: FeatureMode = "mean", settings: ProbeSettings | None = None, few_labels: bool = False,
              seed: int = 0, step: int | None = None, train_split: str = "train", test_split: str = "test",
              track: bool = True, baseline: bool = True, save: bool = True) -> dict:
    """Probe ``task`` on the shards at ``data`` for each module, and (``baseline``) the same probes on the
    encoder as initialised; results as JSON in ``<run>/eval/<result_name>.json`` (``save``) and MLflow."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {list(TASKS)}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if task == "phones" and (few_labels or (settings and (settings.features, settings.split) != ("pooled", "given"))):
        raise ValueError("the phone probe is per frame: no few-label curves, flattening or reshuffling")
    settings = settings or ProbeSettings(lr=1e-4 if task == "phones" else 1e-3)
    started = time.monotonic()
    run = load_run(run_dir, step)
    modules = modules if modules is not None else default_modules(run, task)
    for m in modules:
        run.check_module(m)
        if task == "phones" and run.hop(m) != PHONE_HOP:
            raise ValueError(f"{run_dir}: module {m} has a {run.hop(m)}-sample hop; phone labels are one per "
                             f"{PHONE_HOP} samples (10 ms)")
    upto, frames = max(modules), task == "phones"
    endpoint = run.cfg.data.endpoint_url
    encoders = {"trained": run} | ({"step0": load_run(run_dir, 0)} if baseline and run.step != 0 else {})
    feats = {k: [extract(r, data, split, upto, mode, seed, frames, endpoint_url=endpoint, reduce=settings.reduce)
                 for split in (train_split, test_split)] for k, r in encoders.items()}
    train, test = feats["trained"]
    classes = classes_for(task, train, data)
    rule = split_rule(data, endpoint)

    result = {"task": task, "run_dir": run_dir, "checkpoint_step": run.step, "data": data, "split_rule": rule,
              "split": f"{rule}: " + ("80/20 reshuffle of train + test, fresh per repeat"
                                      if settings.split == "reshuffle"
                                      else f"{train_split} / {test_split} as prepared"),
              "protocol": settings.protocol(), "train_split": train_split, "test_split": test_split,
              "features": mode, "classes": classes, "settings": asdict(settings), "repeats": repeats,
              "seed": seed, "modules": {}}
    for m in progress(modules, f"probe {task}", unit="module"):
        entry = _probe_module(task, m, train, test, classes, data, settings, repeats, seed, few_labels)
        if "step0" in feats:
            entry["step0"] = {"accuracy": _probe_module(task, m, *feats["step0"], classes, data, settings, repeats,
                                                        seed, False)["accuracy"]}
        result["modules"][str(m)] = entry
        log.info("probe %s module %d: accuracy %.3f +- %.3f over %d repeats (%d test %s)%s", task, m,
                 entry["accuracy"]["mean"], entry["accuracy"]["std"], repeats, entry["n_test"],
                 "frames" if frames else "utterances",
                 f"; step 0: {entry['step0']['accuracy']['mean']:.3f}" if "step0" in entry else "")
    result["seconds"] = round(time.monotonic() - started, 2)
    if not save:
        return result

    name = result_name(task, data, mode, settings)
    out = eval_dir(run_dir)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    if not frames:
        (out / f"features-{name}.safetensors").write_bytes(_features_blob(test, modules, task, classes, data))
    if track:
        metrics = {f"{name}.m{m}.{prefix}accuracy_{k}": part["accuracy"][k] for m, e in result["modules"].items()
                   for prefix, part in (("", e), ("step0_", e.get("step0"))) if part for k in ("mean", "std")}
        log_evaluation(run_dir, name, metrics, [json_path])
    return result


def _few_label_curve(xtr, ytr, xte, yte, n_classes: int, s: ProbeSettings, repeats: int, seed: int, task: str,
                     m: int) -> dict:
    """Test accuracy against labelled train examples per class: 1, 2, 4, ... up to the largest class."""
    largest = int(torch.bincount(ytr, minlength=n_classes).max())
    curve = {}
    for n in (n for n in FEW_LABELS if n <= largest):
        accs = []
        for r in range(repeats):
            r_seed = derive_seed(seed, "few", task, m, n, r)
            idx = few_label_subset(ytr, n, n_classes, r_seed)
            accs.append(accuracy(train_probe(xtr[idx], ytr[idx], n_classes, s, r_seed), xte, yte))
        curve[str(n)] = _stats(accs)
    return curve


def _features_blob(test: SplitFeatures, modules: list[int], task: str, classes: list[str], uri: str) -> bytes:
    """Time-averaged test features per module with their labels: what the t-SNE and histogram plots read."""
    tensors = {f"module.{m}": test.pooled[m].contiguous() for m in modules}
    meta = {"task": task, "classes": json.dumps(classes),
            "labels": json.dumps([_label(task, u, uri) for u in test.utterances]),
            "syllables": json.dumps([u.labels.get("syllable", "") for u in test.utterances])}
    return st_save(tensors, metadata=meta)
