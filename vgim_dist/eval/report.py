"""``vgim report``: one self-contained HTML page comparing runs from what their evaluations left on disk.

Reads, per run: ``config.yaml``, ``summary.json``, ``metrics.jsonl`` and ``eval/`` (probe JSON, test
features, decoder results and WAVs). Computes nothing that needs the data or the encoder, except t-SNE of
the saved features. Plots are written as PNG under ``<run>/eval/plots/`` (per run) and ``<report>-plots/``
(comparisons) and embedded as base64, audio as base64 WAV, so the HTML file is all one needs to share.

Runs whose configs differ only in seed (and run directory, tracking, checkpointing, stage split) form a
group, labelled by method (V-GIM, GIM, CPC; ", sequential" for sequential greedy training, above frozen
modules of another run, docs/latents.md): the comparison table gives the mean and standard deviation
over a group's seeds of each run's mean probe accuracy.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open

from vgim_dist.config import Config, load_config, to_dict
from vgim_dist.eval import plots
from vgim_dist.eval.track import eval_dir, log_evaluation
from vgim_dist.progress import progress
from vgim_dist.tracking.tracker import run_names
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.metrics import MetricsLog


def method(cfg: Config) -> str:
    mods = cfg.model.modules
    if len(mods) == 1 and mods[0].layers and mods[0].autoregressor:
        return "CPC"
    return "V-GIM" if cfg.model.variational else "GIM"


def schedule(cfg: Config) -> str:
    """How the run's modules were trained (docs/latents.md): all at once, each on the one below as it is at
    that step, or above frozen modules of another run (module by module, `vgim sequential`)."""
    if cfg.data.lower_run:
        return f"sequential greedy (modules 0-{cfg.data.lower_module} frozen)"
    return "simultaneous greedy"


def _group_key(cfg: Config) -> str:
    """The config without what does not change the method: seed, run, tracking, checkpoints, stage split."""
    d = to_dict(cfg)
    for k in ("seed", "run", "tracking", "checkpoint", "pipeline", "eval"):
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
    kinds = [method(rs[0].cfg) + (", sequential" if rs[0].cfg.data.lower_run else "") for rs in by_key.values()]
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
    """Group -> module -> (mean, std over runs of each run's mean accuracy, runs); each group is followed by
    ``<group> step 0``, the same probes on its runs' encoders as initialised, where the results have them."""
    table = {}
    for label, rs in groups.items():
        for row, key in ((label, None), (f"{label} step 0", "step0")):
            per_module: dict[int, list[float]] = {}
            for r in rs:
                for m, e in r.probes.get(probe, {}).get("modules", {}).items():
                    if part := (e.get(key) if key else e):
                        per_module.setdefault(int(m), []).append(part["accuracy"]["mean"])
            if per_module:
                table[row] = {m: (*_mean_std(v), len(v)) for m, v in sorted(per_module.items())}
    return table


# The thesis's results table (syllables: modules 1 and 2 there, 0 and 1 here; mean ± std over its runs, as
# fractions). Its vowel figure names no module. Shown beside runs of the thesis architecture.
PUBLISHED = {"syllables": {"GIM": {0: (0.5368, 0.0182), 1: (0.3009, 0.0187)},
                           "V-GIM": {0: (0.5078, 0.0187), 1: (0.4170, 0.0154)}},
             "vowels": {"V-GIM": {-1: (0.8538, float("nan"))}}}
THESIS_CONFIGS = ("gim-thesis.yaml", "vgim-thesis.yaml")


def _architecture(cfg: Config) -> dict:
    d = to_dict(cfg)["model"]
    for k in ("variational", "kld_weight"):
        d.pop(k)
    return d


@functools.cache
def _thesis_architecture() -> str | None:
    """The shipped thesis configs' model section (they differ only in the variational part), if present."""
    folder = Path(__file__).resolve().parents[2] / "configs"
    if not (folder / THESIS_CONFIGS[0]).is_file():
        return None
    return json.dumps(_architecture(load_config(folder / THESIS_CONFIGS[0])), sort_keys=True)


def is_thesis(cfg: Config) -> bool:
    return json.dumps(_architecture(cfg), sort_keys=True) == _thesis_architecture()


def published_rows(task: str, groups: dict[str, list[RunResults]]) -> dict[str, dict[int, tuple[float, float]]]:
    """The thesis's figures for ``task``, for each method that a group of thesis-architecture runs has."""
    methods = {method(rs[0].cfg) for rs in groups.values() if is_thesis(rs[0].cfg)}
    return {f"{k} (thesis, published)": v for k, v in PUBLISHED.get(task, {}).items() if k in methods}


# A run shorter than this shows that training runs end to end, not what the method learns.
SHORT_RUN_STEPS = 1000


def run_title(r: RunResults) -> str:
    """The run as MLflow names it (method, seed, runner, steps and corpus), and its folder."""
    return f"{run_names(r.cfg)[0]} ({r.name})"


def findings(runs: list[RunResults]) -> list[str]:
    """What each run shows and what it does not, in a few sentences: every probe's best module against the
    same probe at step 0, then, for a short run, what its length cannot show."""
    out = []
    for r in runs:
        steps = r.summary.get("final", {}).get("step", CheckpointManager(str(r.dir)).latest() or 0)
        said = []
        for p in r.probes.values():
            mods = {int(m): e for m, e in p["modules"].items() if "step0" in e}
            if not mods:
                continue
            gain = {m: e["accuracy"]["mean"] - e["step0"]["accuracy"]["mean"] for m, e in mods.items()}
            best = max(gain, key=gain.get)
            chance = f", chance {1 / len(p['classes']):.3f}" if p.get("classes") else ""
            said.append(f"the {p['task']} probe ({p['protocol']}{chance}) reads "
                        f"{mods[best]['accuracy']['mean']:.3f} on module {best} against "
                        f"{mods[best]['step0']['accuracy']['mean']:.3f} at step 0 ({gain[best]:+.3f}); "
                        f"{sum(g > 0 for g in gain.values())} of {len(gain)} modules beat their step-0 score")
        text = f"{run_title(r)}: " + ("; ".join(said) if said else "no probe beside step 0 yet "
                                      "(`vgim eval probe` runs one)") + "."
        if steps < SHORT_RUN_STEPS:
            text += (f" {steps} steps is a short run: it shows that training works end to end, not what the method "
                     "learns. A module can still sit near or below its step-0 score (a random first convolution is "
                     "already a fair filter bank). Trained for thousands of steps and probed by the thesis's "
                     "protocol (raw features), trained modules are far above step 0 (docs/experiments.md).")
            if r.decoders:
                text += " At this length its decoders' reconstructions are expected to sound like noise."
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#666;font-size:.9em}audio{height:2em;vertical-align:middle}h2{border-bottom:1px solid #ddd}"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _audio(path: Path) -> str:
    seconds = sf.info(str(path)).duration
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<audio controls preload="auto" src="data:audio/wav;base64,{data}">'
            f'</audio> <span class="note">{seconds:.2f} s</span>')


def _table(header: list[str], rows: list[list], raw: tuple[int, ...] = ()) -> str:
    """An HTML table; the columns in ``raw`` hold HTML already (links), the rest is escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw else html.escape(str(c))}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pm(mean: float, std: float, n: int) -> str:
    """``mean ± std``, or ``mean (n = 1)`` where there is nothing to take a std over."""
    if math.isnan(std):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f} (n = 1)"


def _runs_section(runs: list[RunResults]) -> str:
    rows = []
    for r in runs:
        final = r.summary.get("final", {})
        losses = "; ".join(f"M{k.split('.')[1]} {v:.3f}" for k, v in final.items() if k.endswith(".nce"))
        rows.append([r.name, r.group, schedule(r.cfg), r.cfg.seed, CheckpointManager(str(r.dir)).latest(),
                     len(r.cfg.model.modules), r.cfg.model.channels,
                     r.cfg.model.kld_weight if r.cfg.model.variational else 0, losses])
    return "<h2>Runs</h2>" + _table(["run", "group", "training", "seed", "checkpoint", "modules", "channels",
                                     "kld_weight", "final InfoNCE per module"], rows)


def _comparison_section(groups: dict[str, list[RunResults]], runs: list[RunResults], plot_dir: Path) -> tuple[str, str]:
    """HTML and Markdown of the probe comparison: per probe, a group x module table (with step-0 rows, and the
    thesis's figures for thesis-architecture runs) and a bar chart."""
    probes = sorted({p for r in runs for p in r.probes})
    parts, md = ["<h2>Probe accuracy</h2>"], []
    for probe in probes:
        table = comparison(groups, probe)
        first = next(r.probes[probe] for r in runs if probe in r.probes)
        modules = sorted({m for row in table.values() for m in row})
        e0 = first["modules"][str(modules[0])]
        chance, majority = e0["chance_uniform"], e0["chance_majority"]
        protocol = first.get("protocol", "mean over time, bias, "
                             + ("z-scored" if first["settings"].get("standardize") else "raw"))
        split = first.get("split", f"{first['split_rule']}: {first['train_split']} / {first['test_split']}")
        published = published_rows(first["task"], groups)
        header = ["group", "runs", *[f"module {m}" for m in modules]]
        rows = [[g, max(v[2] for v in row.values()), *[_pm(*row[m]) if m in row else "" for m in modules]]
                for g, row in table.items()]
        for g, row in published.items():
            cells = [_pm(*row[m], 2) if m in row else "" for m in modules]
            if -1 in row:  # a figure without its module: under the first column, said so
                cells[0] = f"{row[-1][0]:.3f} (module not given)"
            rows.append([g, "", *cells])
        note = (f"test accuracy, mean ± std over a group's runs of each run's mean over {first['repeats']} probe "
                f"repeats (n = runs); 'step 0' rows: the same probes on the encoders as initialised. Protocol: "
                f"{protocol}, latent {first['features']}. Split: {split}, {e0['n_test']} test items. Data "
                f"{first['data']}. Chance {chance:.3f} (uniform), {majority:.3f} (majority class).")
        if published:
            note += (" Published rows: the thesis's table (its protocol: flattened C x T syllables, max-pooled "
                     "vowels without bias, 80/20 reshuffle); comparable only to runs probed the same way.")
        parts.append(f"<h3>{html.escape(probe)}</h3><p class='note'>{html.escape(note)}</p>" + _table(header, rows))
        md += [f"### {probe}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
        bars = {g: {m: v[:2] for m, v in row.items()} for g, row in table.items()}
        parts.append(_img(plots.accuracy_by_module(bars, plot_dir / f"{probe}-accuracy.png", probe, chance, majority,
                                                   hatched=tuple(g for g in bars if g.endswith(" step 0")))))
        curves = {f"{r.name} m{m}": {n: (c["mean"], c["std"]) for n, c in e["few_labels"].items()}
                  for r in runs for m, e in r.probes.get(probe, {}).get("modules", {}).items() if "few_labels" in e}
        if curves:
            parts.append(_img(plots.few_label_curves(curves, plot_dir / f"{probe}-few-labels.png",
                                                     f"{probe}: few labels")))
        per_run = []
        for r in runs:
            if probe not in r.probes:
                continue
            ms = r.probes[probe]["modules"]
            for label, key in (("", None), (" step 0", "step0")):
                accs = {m: (ms[str(m)].get(key) if key else ms[str(m)]) for m in modules if str(m) in ms}
                cells = [_pm(a["accuracy"]["mean"], a["accuracy"]["std"], len(a["accuracy"]["values"]))
                         if (a := accs.get(m)) else "" for m in modules]
                if any(cells):
                    per_run.append([r.name + label, r.group, *cells])
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


def _probe_curves(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``probe.<task>.module.<i>`` values in metrics.jsonl rows: task -> "module i" -> [(step, accuracy)]."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("probe.") and k.count(".") == 3:
                _, task, _, i = k.split(".")
                curves.setdefault(task, {}).setdefault(f"module {i}", []).append((row["step"], v))
    return {t: {m: sorted(p) for m, p in sorted(c.items())} for t, c in curves.items()}


def _run_section(r: RunResults, tsne: bool) -> str:
    out = eval_dir(str(r.dir)) / "plots"
    parts = [f"<h2>{html.escape(run_title(r))} <span class='note'>({html.escape(r.group)})</span></h2>"]
    history = MetricsLog(str(r.dir), 0)
    history.resume(CheckpointManager(str(r.dir)).latest() or 0)
    if history.rows:
        parts.append("<h3>Training losses</h3>" + "".join(_img(p) for p in plots.training_curves(history.rows, out)))
    if feats := _features(r):
        x, labels, classes = feats
        if tsne:
            parts.append("<h3>t-SNE</h3>" + _img(plots.tsne(x, labels, classes, out / "tsne.png")))
        parts.append("<h3>Feature histograms</h3>" + _img(plots.histograms(
            x, out / "histograms.png", title="time-averaged test features vs N(0, 1)")))
    vowels = [(n, p) for n, p in r.probes.items() if n.startswith("probe-vowels")
              and all(e["dim"] <= 512 for e in p["modules"].values())]  # not flattened C x T
    if vowels:
        parts.append("<h3>Vowel probe weights</h3>" + "".join(
            _img(plots.weight_heatmaps({int(m): e["weight"] for m, e in p["modules"].items()}, p["classes"],
                                       out / f"{name}-weights.png", f"{name}: channel x vowel"))
            for name, p in vowels))
    if curves := _probe_curves(history.rows):
        parts.append("<h3>Probes while training</h3><p class='note'>accuracy of the background evaluator's probes "
                     "(eval.every) against the training step, from the encoder as initialised</p>" + "".join(
                         _img(plots.probe_curves(c, out / f"probe-curve-{task}.png", f"{task} probe during training"))
                         for task, c in curves.items()))
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
    shows = "".join(f"<p>{html.escape(line)}</p>" for line in findings(runs))
    body = [f"<h1>vgim report</h1><p class='note'>{len(runs)} runs, generated {time.strftime('%Y-%m-%d %H:%M')}</p>",
            f"<h2>What this shows</h2>{shows}", _runs_section(runs), compare_html,
            *[_run_section(r, tsne) for r in progress(runs, "report", unit="run")]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vgim report</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    md = out.with_suffix(".md")
    md.write_text(f"# Probe comparison\n\nRuns: {', '.join(run_title(r) for r in runs)}\n\n"
                  + "".join(f"{line}\n\n" for line in findings(runs)) + f"{compare_md}\n")
    if track:
        for r in runs:
            log_evaluation(str(r.dir), "report", {}, [out, md])
    return out
