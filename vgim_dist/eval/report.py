"""``vgim report``: one self-contained HTML page comparing runs from what their evaluations left on disk.

Reads, per run: ``config.yaml``, ``summary.json``, ``metrics.jsonl`` and ``eval/`` (probe JSON, test
features, decoder results and WAVs). Computes nothing that needs the data or the encoder, except t-SNE of
the saved features. Plots are written as PNG under ``<run>/eval/plots/`` (per run) and ``<report>-plots/``
(comparisons) and embedded as base64, audio as base64 WAV, so the HTML file is all one needs to share.

Runs whose configs differ only in seed (and run directory, tracking, checkpointing, stage split) form a
group, labelled by method (V-GIM, GIM, CPC): the comparison table gives the mean and standard deviation
over a group's seeds of each run's mean probe accuracy.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open

from vgim_dist.config import Config, load_config, to_dict
from vgim_dist.progress import progress
from vgim_dist.eval import plots
from vgim_dist.eval.track import eval_dir, log_evaluation
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.metrics import MetricsLog


def method(cfg: Config) -> str:
    mods = cfg.model.modules
    if len(mods) == 1 and mods[0].layers and mods[0].autoregressor:
        return "CPC"
    return "V-GIM" if cfg.model.variational else "GIM"


def _group_key(cfg: Config) -> str:
    """The config without what does not change the method: seed, run, tracking, checkpoints, stage split."""
    d = to_dict(cfg)
    for k in ("seed", "run", "tracking", "checkpoint", "pipeline"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


@dataclass
class RunResults:
    dir: Path
    cfg: Config
    summary: dict
    probes: dict[str, dict] = field(default_factory=dict)     # probe name (probe-<task>[-sample]) -> JSON
    decoders: dict[str, dict] = field(default_factory=dict)   # decoder-m<M>-<loss> -> result.json
    group: str = ""

    @property
    def name(self) -> str:
        return self.dir.name


def collect(run_dir: str) -> RunResults:
    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise FileNotFoundError(f"{d / 'config.yaml'}: not found; is {run_dir} a run directory?")
    cfg = load_config(d / "config.yaml")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    r = RunResults(d, cfg, summary)
    e = d / "eval"
    for p in sorted(e.glob("probe-*.json")):
        r.probes[p.stem] = json.loads(p.read_text())
    for p in sorted(e.glob("decoder-*/result.json")):
        r.decoders[p.parent.name] = json.loads(p.read_text())
    return r


def assign_groups(runs: list[RunResults]) -> dict[str, list[RunResults]]:
    """Group label -> runs; two different configs of one method get the first run's name in their label."""
    by_key: dict[str, list[RunResults]] = {}
    for r in runs:
        by_key.setdefault(_group_key(r.cfg), []).append(r)
    kinds = [method(rs[0].cfg) for rs in by_key.values()]
    groups = {}
    for kind, rs in zip(kinds, by_key.values()):
        label = kind if kinds.count(kind) == 1 else f"{kind} ({rs[0].name})"
        for r in rs:
            r.group = label
        groups[label] = rs
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.array(values)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def comparison(groups: dict[str, list[RunResults]], probe: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """Group -> module -> (mean, std over runs of each run's mean accuracy, runs)."""
    table = {}
    for label, rs in groups.items():
        per_module: dict[int, list[float]] = {}
        for r in rs:
            for m, e in r.probes.get(probe, {}).get("modules", {}).items():
                per_module.setdefault(int(m), []).append(e["accuracy"]["mean"])
        if per_module:
            table[label] = {m: (*_mean_std(v), len(v)) for m, v in sorted(per_module.items())}
    return table


# --------------------------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#666;font-size:.9em}audio{height:2em;vertical-align:middle}h2{border-bottom:1px solid #ddd}"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _audio(path: Path) -> str:
    return f'<audio controls src="data:audio/wav;base64,{base64.b64encode(path.read_bytes()).decode()}"></audio>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _runs_section(runs: list[RunResults]) -> str:
    rows = []
    for r in runs:
        final = r.summary.get("final", {})
        losses = "; ".join(f"M{k.split('.')[1]} {v:.3f}" for k, v in final.items() if k.endswith(".nce"))
        rows.append([r.name, r.group, r.cfg.seed, CheckpointManager(str(r.dir)).latest(), len(r.cfg.model.modules),
                     r.cfg.model.channels, r.cfg.model.kld_weight if r.cfg.model.variational else 0, losses])
    return "<h2>Runs</h2>" + _table(["run", "group", "seed", "checkpoint", "modules", "channels", "kld_weight",
                                     "final InfoNCE per module"], rows)


def _comparison_section(groups: dict[str, list[RunResults]], runs: list[RunResults], plot_dir: Path) -> tuple[str, str]:
    """HTML and Markdown of the probe comparison: per probe, a group x module table and a bar chart."""
    probes = sorted({p for r in runs for p in r.probes})
    parts, md = ["<h2>Probe accuracy</h2>"], []
    for probe in probes:
        table = comparison(groups, probe)
        first = next(r.probes[probe] for r in runs if probe in r.probes)
        modules = sorted({m for row in table.values() for m in row})
        chance = first["modules"][str(modules[0])]["chance_uniform"]
        scaled = ", z-scored per channel" if first["settings"].get("standardize") else ", raw"
        header = ["group", "runs", *[f"module {m}" for m in modules]]
        rows = [[g, max(v[2] for v in row.values()), *[_pm(*row[m][:2]) if m in row else "" for m in modules]]
                for g, row in table.items()]
        parts.append(f"<h3>{html.escape(probe)}</h3><p class='note'>test accuracy, mean ± std over a group's runs "
                     f"of each run's mean over {first['repeats']} probe repeats; data {html.escape(first['data'])} "
                     f"(split {html.escape(first['split_rule'])}, {first['modules'][str(modules[0])]['n_test']} "
                     f"test items, features: {first['features']}{scaled}); chance {chance:.3f}</p>"
                     + _table(header, rows))
        md += [f"### {probe}", "", f"data {first['data']} (split {first['split_rule']}), "
               f"features {first['features']}{scaled}, chance {chance:.3f}", "",
               "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
        bars = {g: {m: v[:2] for m, v in row.items()} for g, row in table.items()}
        parts.append(_img(plots.accuracy_by_module(bars, plot_dir / f"{probe}-accuracy.png", probe, chance)))
        curves = {f"{r.name} m{m}": {n: (c["mean"], c["std"]) for n, c in e["few_labels"].items()}
                  for r in runs for m, e in r.probes.get(probe, {}).get("modules", {}).items() if "few_labels" in e}
        if curves:
            parts.append(_img(plots.few_label_curves(curves, plot_dir / f"{probe}-few-labels.png",
                                                     f"{probe}: few labels")))
        per_run = [[r.name, r.group, *[_pm(r.probes[probe]["modules"][str(m)]["accuracy"]["mean"],
                                           r.probes[probe]["modules"][str(m)]["accuracy"]["std"])
                                       if str(m) in r.probes[probe]["modules"] else "" for m in modules]]
                   for r in runs if probe in r.probes]
        parts.append("<details><summary>per run (mean ± std over probe repeats)</summary>"
                     + _table(["run", "group", *[f"module {m}" for m in modules]], per_run) + "</details>")
    if not probes:
        parts.append("<p class='note'>No probe results: run <code>vgim eval probe RUN ...</code> first.</p>")
    return "".join(parts), "\n".join(md)


def _features(r: RunResults) -> tuple[dict[int, torch.Tensor], list[str], list[str]] | None:
    """Saved test features of the syllable probe (else any probe), with syllable labels when there are any."""
    files = sorted(eval_dir(str(r.dir)).glob("features-probe-*.safetensors"),
                   key=lambda p: ("syllables" not in p.name, p.name))
    if not files:
        return None
    with safe_open(files[0], "pt") as f:
        meta = f.metadata()
        feats = {int(k.split(".")[1]): f.get_tensor(k) for k in sorted(f.keys())}
    syllables = json.loads(meta["syllables"])
    if all(syllables):
        return feats, syllables, sorted(set(syllables))
    return feats, json.loads(meta["labels"]), json.loads(meta["classes"])


def _run_section(r: RunResults, tsne: bool) -> str:
    out = eval_dir(str(r.dir)) / "plots"
    parts = [f"<h2>{html.escape(r.name)} <span class='note'>({html.escape(r.group)}, seed {r.cfg.seed})</span></h2>"]
    history = MetricsLog(str(r.dir), 0)
    history.resume(CheckpointManager(str(r.dir)).latest() or 0)
    if history.rows:
        parts.append("<h3>Training losses</h3>" + "".join(_img(p) for p in plots.training_curves(history.rows, out)))
    if feats := _features(r):
        x, labels, classes = feats
        if tsne:
            parts.append("<h3>t-SNE</h3>" + _img(plots.tsne(x, labels, classes, out / "tsne.png")))
        parts.append("<h3>Feature histograms</h3>" + "".join(
            _img(plots.histograms(v, out / f"histograms-module-{m}.png", title=f"module {m}: time-averaged "
                                  "test features per channel vs N(0, 1)")) for m, v in x.items()))
    for name, p in r.probes.items():
        if name.startswith("probe-vowels"):
            parts.append("<h3>Vowel probe weights</h3>" + "".join(
                _img(plots.weight_heatmap(e["weight"], p["classes"], out / f"{name}-weights-module-{m}.png",
                                          f"{name}, module {m}: channel x vowel")) for m, e in p["modules"].items()))
    for name, d in r.decoders.items():
        base = r.dir / "eval" / name
        parts.append(f"<h3>Decoder {html.escape(name)}</h3><p class='note'>{d['steps']} steps, loss {d['loss']}, "
                     f"features {d['features']}; test loss {d['test_loss']:.4g} over {d['n_test']} clips</p>")
        parts.append(_img(plots.decoder_curve(d["curve"], out / f"{name}-curve.png", f"{name}: train loss")))
        if d["interpolation"]:
            parts.append("<p class='note'>Interpolation contribution: copy the top-n most different channels of "
                         f"z2 into z1, MSE of the decode against decode(z2) relative to n = 0, over "
                         f"{d['interpolation_pairs']} test pairs</p>"
                         + _table(["n", *d["interpolation"]],
                                  [["score", *[f"{v:.3f}" for v in d["interpolation"].values()]]]))
        pairs = [(e["id"], sf.read(base / e["original"], dtype="float32")[0],
                  sf.read(base / e["reconstruction"], dtype="float32")[0]) for e in d["examples"]]
        if pairs:
            parts.append(_img(plots.spectrograms(pairs, out / f"{name}-spectrograms.png")))
        rows = [[e["id"], _audio(base / e["original"]), _audio(base / e["reconstruction"])] for e in d["examples"]]
        rows += [[f"N(0, I) draw {k}", "", _audio(base / p)] for k, p in enumerate(d["prior"])]
        parts.append("<table><tr><th>clip</th><th>original</th><th>decoded</th></tr>" + "".join(
            f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows) + "</table>")
    return "".join(parts)


def default_output(run_dirs: list[str]) -> Path:
    """One run: ``<run>/eval/report.html``; several: ``report.html`` in their common parent folder."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "eval" / "report.html"
    return Path(os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])) / "report.html"


def build_report(run_dirs: list[str], out: Path | None = None, tsne: bool = True, track: bool = True) -> Path:
    """Write the HTML report (and a Markdown comparison table beside it); returns the HTML path."""
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    out = Path(out) if out else default_output(run_dirs)
    runs = [collect(d) for d in run_dirs]
    groups = assign_groups(runs)
    plot_dir = out.parent / f"{out.stem}-plots"
    compare_html, compare_md = _comparison_section(groups, runs, plot_dir)
    body = [f"<h1>vgim report</h1><p class='note'>{len(runs)} runs, generated {time.strftime('%Y-%m-%d %H:%M')}</p>",
            _runs_section(runs), compare_html,
            *[_run_section(r, tsne) for r in progress(runs, "report", unit="run")]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vgim report</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    md = out.with_suffix(".md")
    md.write_text(f"# Probe comparison\n\nRuns: {', '.join(r.name for r in runs)}\n\n{compare_md}\n")
    if track:
        for r in runs:
            log_evaluation(str(r.dir), "report", {}, [out, md])
    return out
