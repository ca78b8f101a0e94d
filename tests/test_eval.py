"""Evaluation end to end on a synthetic de Boer corpus and one tiny tracked run shared by every test:
probes above chance and repeatable, a decoder whose loss falls, plots and a self-contained report, results
linked to the training run in MLflow, clear errors on bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from browser import inspect_page

from vgim_dist.cli import main
from vgim_dist.config import load_config
from vgim_dist.data.synth import synth_deboer
from vgim_dist.eval.decoder import decoder_run
from vgim_dist.eval.features import load_run
from vgim_dist.eval.probes import ProbeSettings, probe_run
from vgim_dist.eval.report import build_report
from vgim_dist.launch import train
from vgim_dist.model import build_module

pytestmark = pytest.mark.slow  # `make test` runs it, `make test-fast` skips it

FAST_PROBE = ProbeSettings(standardize=True)  # the method's epochs; z-scored: a 12-step encoder's features barely vary


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> dict:
    """24 words x 2 takes by one speaker at difficulty 0.2 (144 syllables), word and clean-split syllable
    shards, a 12-step tracked smoke run."""
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus"
    synth_deboer(corpus, words=24, voices_n=1, takes=2, difficulty=0.2, seed=1)  # easy: these tests are mechanics
    words, syllables = str(root / "words"), str(root / "syllables")
    assert main(["data", "prepare", str(corpus), "--format", "deboer", "--out", words]) == 0
    assert main(["data", "prepare", str(corpus), "--format", "deboer", "--level", "syllable",
                      "--syllable-split", "clean", "--out", syllables]) == 0
    run = str(root / "run")
    train(load_config("configs/smoke.yaml", [
        f"run.dir={run}", f"data.uri={words}", "data.crop=5120", "data.batch_size=4", "run.steps=12",
        "run.log_every=2", "run.threads=1", "checkpoint.every=0", "tracking.enabled=true",
        "tracking.system_metrics=false"]))
    return {"run": run, "words": words, "syllables": syllables}


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def test_probes_land_above_chance_and_repeat_exactly(setup):
    run, data = setup["run"], setup["syllables"]
    for task in ("vowels", "syllables"):
        r = probe_run(run, task, data, repeats=2, settings=FAST_PROBE, track=False)
        assert r["split_rule"].startswith("deboer/syllable/clean") and r["features"] == "mean"
        assert r["split"].startswith("deboer/syllable/clean") and r["split"].endswith(": train / test as prepared")
        assert r["protocol"] == "mean over time, bias, z-scored, 50 epochs, lr 0.001"
        for m, e in r["modules"].items():
            assert e["n_test"] > 10 and len(e["accuracy"]["values"]) == 2
            assert e["accuracy"]["mean"] > e["chance_uniform"] + 0.05, (task, m, e["accuracy"])
            assert len(e["step0"]["accuracy"]["values"]) == 2  # the same probes on the encoder as initialised
        assert Path(run, "eval", f"probe-{task}-standardized.syllables.json").is_file()
    # Sampled features too: the same seed gives the same draws, probes and accuracies.
    a = probe_run(run, "vowels", data, modules=[1], mode="sample", few_labels=True, settings=FAST_PROBE, track=False)
    b = probe_run(run, "vowels", data, modules=[1], mode="sample", few_labels=True, settings=FAST_PROBE, track=False)
    assert _without_timing(a) == _without_timing(b)
    assert list(a["modules"]["1"]["few_labels"])[:3] == ["1", "2", "4"]
    c = probe_run(run, "vowels", data, modules=[1], mode="sample", seed=1, settings=FAST_PROBE, track=False)
    assert c["modules"]["1"]["weight"] != a["modules"]["1"]["weight"]


def test_step0_baseline_is_the_encoder_as_initialised(setup):
    trained, initial = load_run(setup["run"]), load_run(setup["run"], step=0)
    assert (trained.step, initial.step) == (12, 0)
    cfg = load_config(Path(setup["run"], "config.yaml"))
    fresh = build_module(cfg.model, 0, cfg.seed)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in initial.modules[0].state_dict().items())
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.modules[0].state_dict().items())


def test_thesis_protocol_flatten_max_no_bias_reshuffle(setup):
    run, data = setup["run"], setup["syllables"]
    flat = probe_run(run, "syllables", data, modules=[0, 1], repeats=2, track=False,
                     settings=ProbeSettings(epochs=5, features="flatten", split="reshuffle"), baseline=False)
    for e in flat["modules"].values():
        assert e["dim"] > 32 and e["dim"] % 32 == 0  # C x T, not C
        assert e["n_test"] == round(0.2 * (e["n_train"] + e["n_test"]))
    assert flat["split"].endswith("80/20 reshuffle of train + test, fresh per repeat")
    assert flat["protocol"].startswith("flattened C x T, bias, raw, 5 epochs")
    vowels = probe_run(run, "vowels", data, modules=[1], track=False, baseline=False,
                       settings=ProbeSettings(epochs=5, pool="max", bias=False))
    assert vowels["protocol"].startswith("max over time, no bias") and vowels["modules"]["1"]["dim"] == 32
    names = {p.name for p in Path(run, "eval").glob("probe-*.json")}
    assert {"probe-syllables-flatten-reshuffle.syllables.json", "probe-vowels-max-nobias.syllables.json"} <= names
    # A probe of another data set is named by it, and overwrites nothing.
    other = Path(setup["syllables"]).with_name("syllables-copy")
    shutil.copytree(setup["syllables"], other)
    probe_run(run, "vowels", str(other), modules=[1], track=False, baseline=False,
              settings=ProbeSettings(epochs=5, pool="max", bias=False))
    assert {"probe-vowels-max-nobias.syllables.json", "probe-vowels-max-nobias.syllables-copy.json"} <= {
        p.name for p in Path(run, "eval").glob("probe-*.json")}


def test_encoder_is_frozen_in_eval_mode_and_checkpoint_untouched(setup):
    run = load_run(setup["run"])
    assert all(not m.training for m in run.modules)
    assert all(not p.requires_grad for m in run.modules for p in m.parameters())
    before = {(i, k): v.clone() for i, m in enumerate(run.modules) for k, v in m.state_dict().items()}
    decoder_run(setup["run"], 0, "mse", steps=2, batch_size=2, examples=1, draws=1, track=False)
    after = load_run(setup["run"])
    assert all(torch.equal(before[i, k], v) for i, m in enumerate(after.modules) for k, v in m.state_dict().items())


def test_decoder_loss_falls_and_writes_audio(setup):
    r = decoder_run(setup["run"], 1, "mse+mel", steps=30, batch_size=4, examples=2, draws=2, track=False)
    losses = [p["loss"] for p in r["curve"]]
    assert losses[-1] < 0.9 * losses[0], losses
    out = Path(setup["run"], "eval", "decoder-m1-mse+mel")
    for e in r["examples"]:
        assert (out / e["original"]).is_file() and (out / e["reconstruction"]).is_file()
    assert all((out / p).is_file() for p in r["prior"])
    assert r["interpolation"]["0"] == 1.0 and r["interpolation"]["32"] == pytest.approx(0.0)


def test_report_is_self_contained_and_logged_to_mlflow(setup):
    run = setup["run"]
    assert main(["eval", "probe", run, "--task", "vowels", "--data", setup["syllables"], "--epochs", "5",
                 "--standardize"]) == 0
    decoder_run(run, 1, "mse", steps=4, batch_size=2, examples=1, draws=1, track=False)
    out = build_report([run], tsne=True)
    html = out.read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:audio/wav;base64,")) for s in sources)
    assert "href=" not in html  # nothing outside the file
    plots = Path(run, "eval", "plots")
    for name in ("tsne.png", "histograms.png", "loss-module-0.png", "probe-vowels-standardized.syllables-weights.png",
                 "decoder-m1-mse-spectrograms.png"):
        assert (plots / name).stat().st_size > 1000, name
    md = out.with_suffix(".md").read_text()
    assert "| V-GIM | 1 |" in md and "| V-GIM step 0 | 1 |" in md and "(n = 1)" in md and "± 0.000" not in md
    assert "(majority class)" in md and "Protocol: mean over time" in md and "Split: deboer/syllable/clean" in md

    from mlflow import MlflowClient

    ids = json.loads(Path(run, "mlflow.json").read_text())
    c = MlflowClient(ids["tracking_uri"])
    evals = c.search_runs([ids["experiment_id"]], f"tags.vgim.evaluates = '{ids['parent_run_id']}'")
    by_name = {r.info.run_name: r for r in evals}
    assert {"probe-vowels-standardized.syllables", "report"} <= set(by_name)
    probe = by_name["probe-vowels-standardized.syllables"]
    assert probe.data.tags["mlflow.parentRunId"] == ids["parent_run_id"]
    assert {"probe-vowels-standardized.syllables.m0.accuracy_mean",
            "probe-vowels-standardized.syllables.m0.step0_accuracy_mean"} <= set(probe.data.metrics)
    assert [a.path for a in c.list_artifacts(by_name["report"].info.run_id)] == ["report.html", "report.md"]


def test_report_in_a_browser(setup, tmp_path):
    """The report as Chromium renders it: every image decodes to a real size, every audio player knows its
    clip's duration, and no two pieces of visible text overlap."""
    run = setup["run"]
    probe_run(run, "syllables", setup["syllables"], settings=ProbeSettings(epochs=5, standardize=True), track=False)
    probe_run(run, "vowels", setup["syllables"], settings=ProbeSettings(epochs=5, standardize=True), track=False)
    r = decoder_run(run, 1, "mse", steps=4, batch_size=2, examples=2, draws=1, track=False)
    page = build_report([run], tsne=False, track=False)
    seen = inspect_page(page, tmp_path)
    images = seen["images"]
    assert len(images) >= 6 and all(i["width"] > 100 and i["height"] > 100 for i in images), images
    assert len(seen["audio"]) >= 2 * len(r["examples"]) + len(r["prior"])  # the run's other decoders too
    assert all(d is not None and 0.3 < d < 5 for d in seen["audio"]), seen["audio"]  # 0.32 s clips: data loaded
    assert seen["texts"] > 50 and seen["overlaps"] == [], seen["overlaps"]
    assert seen["page_width"] <= seen["view_width"]  # nothing sticks out sideways


def test_bad_input_names_the_file_or_key(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(str(tmp_path))
    with pytest.raises(ValueError, match="'syllable' label.*--level syllable"):
        probe_run(setup["run"], "syllables", setup["words"], settings=FAST_PROBE, track=False)
    with pytest.raises(ValueError, match="module 7 does not exist"):
        probe_run(setup["run"], "vowels", setup["syllables"], modules=[7], track=False)
    with pytest.raises(ValueError, match="decoder loss 'l1'"):
        decoder_run(setup["run"], 0, "l1", track=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 3"):
        load_run(setup["run"], step=3)


def test_speaker_and_phone_probes_on_librispeech_layout(setup, librispeech_dir, tmp_path):
    """Speakers per utterance; phones per 10 ms frame of the GRU module, labels from an alignment file
    (here loud vs quiet frames, which the synthetic corpus does not have otherwise)."""
    import shutil

    import numpy as np
    import soundfile as sf

    corpus = tmp_path / "libri"
    shutil.copytree(librispeech_dir, corpus)
    lines = []
    for f in sorted(corpus.rglob("*.flac")):
        x, _ = sf.read(f, dtype="float32")
        energy = np.square(x[: len(x) // 160 * 160]).reshape(-1, 160).mean(axis=1)
        lines.append(" ".join([f.stem, *map(str, (energy > np.median(energy)).astype(int))]))
    (corpus / "converted_aligned_phones.txt").write_text("\n".join(lines) + "\n")
    shards = str(tmp_path / "shards")
    assert main(["data", "prepare", str(corpus), "--format", "librispeech", "--out", shards]) == 0

    speakers = probe_run(setup["run"], "speakers", shards, modules=[0], settings=FAST_PROBE, track=False)
    assert speakers["classes"] == ["100", "101", "102"]
    assert speakers["modules"]["0"]["accuracy"]["mean"] > 1 / 3
    phones = probe_run(setup["run"], "phones", shards, settings=ProbeSettings(epochs=5, lr=1e-3, standardize=True),
                       track=False)
    assert list(phones["modules"]) == ["3"] and len(phones["classes"]) == 41
    e = phones["modules"]["3"]
    assert e["n_test"] > 500 and e["accuracy"]["mean"] > e["chance_majority"]
    with pytest.raises(ValueError, match="module 1 has a 80-sample hop"):
        probe_run(setup["run"], "phones", shards, modules=[1], track=False)


def test_report_prints_the_thesis_figures_beside_thesis_runs(tmp_path, capsys):
    """A run of the thesis architecture: the report's syllable table gains the published rows, and `vgim
    report` prints it. Results JSON as `vgim eval probe` writes them (one module pair, one repeat)."""
    from vgim_dist.config import dump_config

    run = tmp_path / "vgim-seed0"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config("configs/vgim-thesis.yaml")))
    module = {"accuracy": {"mean": 0.61, "std": 0.0, "values": [0.61]}, "step0": {"accuracy": {
        "mean": 0.32, "std": 0.0, "values": [0.32]}}, "n_train": 80, "n_test": 20, "n_test_unseen_label": 0,
        "chance_uniform": 1 / 9, "chance_majority": 0.15, "dim": 800, "weight": [[0.0] * 800] * 9}
    result = {"task": "syllables", "data": "syl", "split_rule": "deboer/syllable/clean", "split": "s",
              "protocol": "flattened C x T, bias, raw, 100 epochs, lr 0.001", "features": "mean", "repeats": 1,
              "settings": {"standardize": False}, "train_split": "train", "test_split": "test",
              "classes": ["ba"] * 9, "modules": {"0": module, "1": module}}
    (run / "eval" / "probe-syllables-flatten-reshuffle.syl.json").write_text(json.dumps(result))
    assert main(["report", str(run), "--no-mlflow", "--no-tsne"]) == 0
    out = capsys.readouterr().out
    assert "| V-GIM (thesis, published) |  | 0.508 ± 0.019 | 0.417 ± 0.015 |" in out
    assert "| V-GIM | 1 | 0.610 (n = 1) | 0.610 (n = 1) |" in out and "| V-GIM step 0 | 1 |" in out
    assert "GIM (thesis, published)" not in out.replace("V-GIM (thesis", "")  # no GIM run, no GIM row


def test_probes_decoder_and_report_on_a_run_from_latent_shards(setup, tmp_path):
    """Modules 1-3 trained from module-0 latent shards of the shared run: probes of every module (module 0
    the lower run's, frozen), a decoder on the audio the shards came from, the report naming the method."""
    latents, upper = str(tmp_path / "m0"), str(tmp_path / "upper")
    assert main(["encode", setup["run"], "--module", "0", "--data", setup["words"], "--out", latents]) == 0
    train(load_config("configs/smoke.yaml", [
        f"run.dir={upper}", f"data.uri={latents}", "data.crop=5120", "data.batch_size=4", "run.steps=4",
        "run.threads=1", "pipeline.stages=[]", "tracking.enabled=false"]))
    r = probe_run(upper, "vowels", setup["syllables"], settings=FAST_PROBE, track=False)
    assert sorted(r["modules"]) == ["0", "1", "2", "3"]
    lower = probe_run(setup["run"], "vowels", setup["syllables"], modules=[0], settings=FAST_PROBE, track=False)
    assert r["modules"]["0"]["accuracy"] == lower["modules"]["0"]["accuracy"]     # the same frozen module
    decoder_run(upper, 1, "mse", steps=2, batch_size=2, examples=1, draws=1, track=False)
    html = build_report([upper], tsne=False).read_text()
    assert "sequential greedy (modules 0-0 frozen)" in html
