"""``vgim report SWEEP_DIR``: a sweep's probe accuracies against its swept values (docs/sweeps.md).

Reads ``sweep.json`` (the trials and their values) and each trial's ``trial.json`` and ``eval/`` probe results.
``seed`` is the axis results are averaged over: each cell (the trials that share every other swept value)
gets the mean ± std over its seeds, one table per probe result and module, with its trial count, its failed
trials named, and a link to each trial's own report. A plot per probe and swept key shows the accuracy
against the key's values (over every trial with that value).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from vgim_dist.eval import plots
from vgim_dist.eval.report import _CSS, _img, _mean_std, _pm, _table, build_report, collect
from vgim_dist.run_dir import RunDir

SEED = "seed"


def is_sweep(path: str) -> bool:
    return (Path(path) / RunDir.SWEEP).is_file()


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _load(sweep_dir: Path) -> list[dict]:
    """Each trial: name, params, status, error, and its probe results (result name -> JSON) if it finished."""
    trials = []
    for t in json.loads((sweep_dir / RunDir.SWEEP).read_text())["trials"]:
        run = sweep_dir / "trials" / t["name"]
        record = json.loads((run / RunDir.TRIAL).read_text()) if (run / RunDir.TRIAL).is_file() else {}
        status = record.get("status", "NOT RUN")
        probes = collect(str(run)).probes if status == "FINISHED" else {}
        trials.append({"name": t["name"], "params": t["params"], "status": status, "error": record.get("error", ""),
                       "probes": probes})
    return trials


def _accuracy(trial: dict, probe: str, module: str, key: str | None = None) -> float | None:
    entry = trial["probes"].get(probe, {}).get("modules", {}).get(module)
    part = (entry or {}).get(key) if key else entry
    return part["accuracy"]["mean"] if part else None


def build_sweep_report(sweep_dir: str, out: Path | None = None, runs: bool = True, track: bool = True) -> Path:
    """Write ``<sweep>/report.html`` and ``report.md`` (tables), plots in ``report-plots/``; with ``runs``, each
    finished trial's own report (``trials/<name>/eval/report.html``, no t-SNE) where it has none yet."""
    root = Path(sweep_dir)
    out = out or root / "report.html"
    plot_dir = out.parent / f"{out.stem}-plots"
    trials = _load(root)
    keys = list(trials[0]["params"]) if trials else []
    cell_keys = [k for k in keys if k != SEED]
    finished = [t for t in trials if t["status"] == "FINISHED"]
    failed = [t for t in trials if t["status"] != "FINISHED"]
    links = {}
    for t in finished:
        page = root / "trials" / t["name"] / "eval" / "report.html"
        if runs and not page.is_file():
            build_report([str(page.parents[1])], page, tsne=False, track=False)
        links[t["name"]] = page.relative_to(out.parent).as_posix() if page.is_file() else ""

    cells: dict[tuple, list[dict]] = {}
    for t in trials:
        cells.setdefault(tuple(_value(t["params"][k]) for k in cell_keys), []).append(t)
    parts = [f"<h1>vgim sweep report</h1><p class='note'>{html.escape(str(root))}: {len(trials)} trials, "
             f"{len(finished)} finished, {len(failed)} did not finish; generated {time.strftime('%Y-%m-%d %H:%M')}"
             "</p>"]
    md = [f"# Sweep {root.name}", "",
          f"{len(trials)} trials, {len(finished)} finished, {len(failed)} did not finish.", ""]
    if failed:
        rows = [[t["name"], t["status"], t["error"]] for t in failed]
        parts.append("<h2>Trials that did not finish</h2>" + _table(["trial", "status", "error"], rows))
        md += ["## Trials that did not finish", "", "| trial | status | error |", "|---|---|---|"]
        md += [f"| {' | '.join(map(str, r))} |" for r in rows] + [""]

    probes = sorted({p for t in finished for p in t["probes"]})
    for probe in probes:
        modules = sorted({m for t in finished for m in t["probes"].get(probe, {}).get("modules", {})}, key=int)
        parts.append(f"<h2>{html.escape(probe)}</h2>")
        md += [f"## {probe}", ""]
        for m in modules:
            header = [*cell_keys, "accuracy", "step 0", "trials", "failed", "runs"]
            rows, md_rows = [], []
            for cell, members in cells.items():
                row = []
                for key in (None, "step0"):
                    values = [a for t in members if (a := _accuracy(t, probe, m, key)) is not None]
                    row.append(_pm(*_mean_std(values), len(values)) if values else "")
                done = [t for t in members if t["status"] == "FINISHED"]
                bad = ", ".join(t["name"] for t in members if t["status"] != "FINISHED")
                link = " ".join(f"<a href='{html.escape(links[t['name']])}'>{html.escape(t['name'])}</a>"
                                if links.get(t["name"]) else html.escape(t["name"]) for t in done)
                rows.append([*cell, *row, len(done), bad, link])
                md_rows.append([*cell, *row, len(done), bad, ", ".join(t["name"] for t in done)])
            note = f"module {m}: test accuracy, mean ± std over seeds (n = trials of the cell)"
            parts.append(f"<h3>module {m}</h3><p class='note'>{html.escape(note)}</p>"
                         + _table(header, rows, raw=(len(header) - 1,)))
            md += [f"### module {m}", "", note, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            md += ["| " + " | ".join(str(c) for c in r) + " |" for r in md_rows] + [""]
        for key in cell_keys:
            order = list(dict.fromkeys(_value(t["params"][key]) for t in trials))
            curves = {}
            for m in modules:
                points = []
                for v in order:
                    values = [a for t in finished if _value(t["params"][key]) == v
                              and (a := _accuracy(t, probe, m)) is not None]
                    if values:
                        points.append((v, *_mean_std(values)))
                if points:
                    curves[f"module {m}"] = points
            if curves:
                name = f"{probe}-{key}.png".replace("/", "_")
                parts.append(_img(plots.metric_by_value(curves, plot_dir / name, f"{probe} against {key}", key)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vgim sweep report</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if track:
        _log(root, [out, out.with_suffix(".md"), plot_dir])
    return out


def _log(root: Path, artifacts: list[Path]) -> None:
    """The report, its tables and plots on the sweep's MLflow run, when the sweep has one."""
    ids_file = Path(RunDir(str(root)).tracking_ids)
    if not ids_file.is_file():
        return
    from vgim_dist.tracking.logger import client  # noqa: PLC0415

    ids = json.loads(ids_file.read_text())
    c = client(ids["tracking_uri"])
    for a in artifacts:
        if a.is_dir():
            c.log_artifacts(ids["run_id"], str(a), a.name)
        elif a.is_file():
            c.log_artifact(ids["run_id"], str(a))
