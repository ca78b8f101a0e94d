"""The MLflow UI as a user sees it: `vgim ui` over a tracked run, checked through its REST API (the experiment
opens on training runs; one parent run and a child per stage, each with its own system metrics) and in a
headless Chromium (Debian's `chromium`, installed by scripts/setup.sh), whose screenshot must show a page and
whose run pages must stay in the training view and draw loss curves."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import requests

from vgim_dist.config import load_config
from vgim_dist.launch import train
from vgim_dist.tracking.server import free_port, ui_address, wait_ready
from vgim_dist.tracking.tracker import EXPERIMENT_KIND

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def api(url: str, endpoint: str, body: dict | None = None, **params) -> dict:
    r = (requests.post(f"{url}/api/2.0/mlflow/{endpoint}", json=body, timeout=60) if body is not None
         else requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=60))
    r.raise_for_status()
    return r.json()


def screenshot(url: str, path, wait_ms: int = 30000) -> None:
    """A 1600x1000 PNG of ``url`` after the page's scripts ran for ``wait_ms`` of virtual time."""
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={path}", "--window-size=1600,1000", f"--virtual-time-budget={wait_ms}", url],
                   capture_output=True, timeout=300, check=True)


def rendered(url: str, until: str = "") -> str:
    """The page's DOM after its scripts ran for 30 s of virtual time (longer, up to 180 s, until the regex
    ``until`` matches: charts wait on the server, which virtual time does not speed up), scripts and styles
    left out."""
    for budget in (30000, 90000, 180000):
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              f"--virtual-time-budget={budget}", url], capture_output=True, text=True,
                             timeout=600).stdout
        dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
        if not until or re.search(until, dom):
            break
    return dom


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_ui_opens_on_the_training_runs_of_a_tracked_job(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    run_dir = tmp_path / "run"
    train(load_config("configs/smoke.yaml", [f"run.dir={run_dir}", "run.steps=6", "run.log_every=2",
                                             "data.crop=2560", "data.batch_size=4", "run.threads=1"]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "vgim_dist", "ui", str(run_dir), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_ready(ui, url, timeout=300)
        ids = json.loads((run_dir / "mlflow.json").read_text())
        page = ui.stdout.readline().split()[3]         # "MLflow UI at <address> (store ...)"
        assert page == f"{url}/#/experiments/{ids['experiment_id']}/runs?workflowType=machine_learning"
        exp = api(url, "experiments/get", experiment_id=ids["experiment_id"])["experiment"]
        assert EXPERIMENT_KIND.items() <= {t["key"]: t["value"] for t in exp.get("tags", [])}.items()
        runs = api(url, "runs/search", {"experiment_ids": [ids["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
        assert [p["info"]["run_name"] for p in parents] == ["smoke V-GIM s0 reference 6 steps on noise"]
        kids = sorted(r["info"]["run_name"] for r, t in zip(runs, tags)
                      if t.get("mlflow.parentRunId") == parents[0]["info"]["run_id"])
        assert kids == ["stage-0 (M0)", "stage-1 (M1-M3)"]
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        parent_metrics = {m["key"] for m in parents[0]["data"]["metrics"]}
        assert {"system/process_cpu_percent", "system/process_rss_mb"} <= parent_metrics   # this process

        shot = tmp_path / "experiment.png"
        screenshot(page, shot)
        image = imread(shot)
        assert image.shape[:2] == (1000, 1600)
        # A page, not a blank or an error: many distinct colours (text, table, charts).
        assert len(np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
        dom = rendered(page)
        assert "smoke V-GIM s0 reference 6 steps on noise" in dom          # the runs table, with the job's name

        # Run pages at the addresses vgim prints (`tracking: see it at ...`) keep the training view: the
        # breadcrumb says Runs, never Evaluations, and the parent's Model metrics draw curves, not dots.
        for run in (parents[0]["info"]["run_id"], *(s["run_id"] for s in ids["stages"])):
            page = rendered(ui_address(url, ids["experiment_id"], run))
            assert "Model training" in page and "Evaluation" not in page, run
        line = r'class="js-line"[^>]*\bd="([^"]*)"'
        charts = rendered(ui_address(url, ids["experiment_id"], parents[0]["info"]["run_id"]).replace(
            "?", "/model-metrics?"), until=line)
        lines = re.findall(line, charts)
        assert any(d.count("L") >= 2 for d in lines), lines[:5]        # steps 2, 4 and 6 joined by a line
    finally:
        ui.terminate()
        ui.wait(timeout=60)
