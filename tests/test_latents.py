"""Latent shards: `vgim encode` (chunked against whole, provenance, resume, verify, S3) and training upper
modules from them (docs/latents.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vgim_dist.cli import main
from vgim_dist.data import readers
from vgim_dist.data.audio import SCALE
from vgim_dist.data.latents import row_array
from vgim_dist.data.prepare import prepare
from vgim_dist.data.shard import MANIFEST, decode
from vgim_dist.data.store import Store
from vgim_dist.downstream import load_encoder
from vgim_dist.encode import encode
from vgim_dist.eval.features import load_run
from vgim_dist.eval.report import RunResults, assign_groups, schedule
from vgim_dist.launch import train
from vgim_dist.sequential import sequential

from helpers import FAST, ROOT, assert_bitwise_equal, cfg_for, final_state, noise_corpus, small_run

LENGTHS = [24000, 5000, 17000, 3100, 40000, 9000]     # samples: four longer than a 0.5 s chunk


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("latents")
    audio = str(root / "audio")
    prepare(readers.folder(noise_corpus(root / "corpus", LENGTHS)), Store(audio), shard_size=4, log=str)
    return {"root": root, "run": small_run(root / "run"), "audio": audio}


def small_run_from(run_dir: Path, *overrides: str) -> str:
    """The smoke config, FAST, trained in ``run_dir`` with ``overrides`` (one stage unless they say otherwise)."""
    train(cfg_for(run_dir, *overrides))
    return str(run_dir)


def rows(uri: str) -> dict[str, tuple[dict, bytes]]:
    """Every row of a shard set by id: (the row's fields, its data)."""
    store = Store(uri)
    manifest = json.loads(store.read_bytes(MANIFEST))
    out = {}
    for shard in (s for split in manifest["splits"].values() for s in split["shards"]):
        for row in decode(shard["name"], store.read_bytes(shard["name"]), shard["xxh3_64"]).to_pylist():
            out[row["id"]] = row
    return out


def test_encode_chunked_equals_whole_and_records_provenance(setup):
    root = setup["root"]
    m = encode(setup["run"], 2, setup["audio"], str(root / "m2"), chunk_seconds=0.5, log=str)
    encode(setup["run"], 2, setup["audio"], str(root / "m2-whole"), chunk_seconds=100, log=str)
    assert m["kind"] == "latents" and m["provenance"]["step"] == 3 and m["provenance"]["module"] == 2
    assert set(m["provenance"]["checkpoint"]) == {f"module-{i}.safetensors" for i in range(3)}
    assert m["provenance"]["config"]["model"]["channels"] == 32 and m["chunk_samples"] == 8000
    assert (m["hop"], m["receptive_field"], m["channels"], m["dtype"]) == (160, 465, 32, "float32")
    assert m["parts"] == ["mean", "logvar"] and m["utterances"] == len(LENGTHS)
    a, b = rows(str(root / "m2")), rows(str(root / "m2-whole"))
    enc = load_encoder(setup["run"], modules=[2])
    audio = rows(setup["audio"])
    for id_, row in a.items():
        assert row["frames"] == b[id_]["frames"] == enc.frames(audio[id_]["length"])[0]
        # the chunked forward equals the whole-utterance forward: every kept frame sees the same samples; the
        # values agree to float32 rounding (the BLAS kernels of a convolution may round by input length)
        z = row_array(row["latent"], "float32", 64)
        torch.testing.assert_close(z, row_array(b[id_]["latent"], "float32", 64), rtol=1e-5, atol=2e-6)
        wav = torch.from_numpy(np.frombuffer(audio[id_]["audio"], "<i2").astype(np.float32) / SCALE)
        # the mean is the encoder's output (to rounding: it runs oneDNN's kernels, encode does not)
        torch.testing.assert_close(z[:, :32], enc(wav[None])[0][0], rtol=1e-5, atol=1e-6)
    assert any(n > 8000 for n in LENGTHS)


def test_encode_mean_dtype_resume_and_verify(setup, capsys):
    out = str(setup["root"] / "m3")
    assert main(["encode", setup["run"], "--module", "3", "--data", setup["audio"], "--out", out,
                 "--dtype", "bfloat16", "--what", "mean", "--chunk-seconds", "0.3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parts"] == ["mean"] and printed["dtype"] == "bfloat16" and printed["channels"] == 32
    m = json.loads(Path(out, MANIFEST).read_text())
    assert m["receptive_field"] is None and m["what"] == "mean"     # a GRU sees the utterance so far
    enc = load_encoder(setup["run"], modules=[3])
    audio, latent = rows(setup["audio"]), rows(out)
    for id_, row in latent.items():
        wav = torch.from_numpy(np.frombuffer(audio[id_]["audio"], "<i2").astype(np.float32) / SCALE)
        want = enc(wav[None])[0][0].to(torch.bfloat16).float()
        torch.testing.assert_close(row_array(row["latent"], "bfloat16", 32), want, rtol=0.02, atol=1e-3)
    # A re-run keeps every shard; a damaged one is made again.
    shard = Path(out, m["splits"]["train"]["shards"][0]["name"])
    before = shard.read_bytes()
    lines = []
    encode(setup["run"], 3, setup["audio"], out, dtype="bfloat16", what="mean", chunk_seconds=0.3, log=lines.append)
    assert all(line.startswith("kept") for line in lines) and shard.read_bytes() == before
    assert main(["data", "verify", out]) == 0
    data = bytearray(before)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", out]) == 1
    lines = []
    encode(setup["run"], 3, setup["audio"], out, dtype="bfloat16", what="mean", chunk_seconds=0.3, log=lines.append)
    assert sum(line.startswith("rebuilt") or line.startswith("wrote") for line in lines) == 1
    assert shard.read_bytes() == before and main(["data", "verify", out]) == 0


def test_encode_refuses_what_it_cannot_do(setup, capsys):
    out = str(setup["root"] / "bad")
    assert main(["encode", setup["run"], "--module", "4", "--data", setup["audio"], "--out", out]) == 2
    assert "--module 4" in capsys.readouterr().err
    assert main(["encode", setup["run"], "--module", "0", "--data", setup["audio"], "--out", out,
                 "--step", "1"]) == 1
    assert "no committed checkpoint for step 1" in capsys.readouterr().err


@pytest.mark.slow
def test_encode_in_parallel_to_s3_equals_one_process(setup, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    local = str(setup["root"] / "m1")
    encode(setup["run"], 1, setup["audio"], local, chunk_seconds=0.5, log=str)
    assert main(["encode", setup["run"], "--module", "1", "--data", setup["audio"], "--out", "s3://latents/m1",
                 "--chunk-seconds", "0.5", "--workers", "2"]) == 0
    remote = Store("s3://latents/m1")
    want = json.loads(Path(local, MANIFEST).read_text())
    got = json.loads(remote.read_bytes(MANIFEST))
    assert got["splits"] == want["splits"]          # the same shards, byte for byte (their checksums)
    assert main(["data", "verify", "s3://latents/m1"]) == 0


# ------------------------------------------------------------------------- training from latent shards

UPPER = ["run.steps=4", "checkpoint.every=2", "pipeline.stages=[]"]


def test_training_from_latents_equals_the_frozen_lower_reference(setup):
    """Modules 1..3 trained from module-0 latent shards (float32) end bitwise equal to the same modules
    trained with the lower run's module 0 loaded, frozen and run over each whole utterance of the audio."""
    root = setup["root"]
    latents = str(root / "m0")
    encode(setup["run"], 0, setup["audio"], latents, chunk_seconds=0.5, log=str)
    from_shards = small_run_from(root / "upper-latents", f"data.uri={latents}", *UPPER)
    frozen = small_run_from(root / "upper-frozen", f"data.uri={setup['audio']}", f"data.lower_run={setup['run']}",
                            "data.lower_step=3", "data.lower_module=0", *UPPER)
    a, b = final_state(from_shards), final_state(frozen)
    assert_bitwise_equal(a, b)
    # every checkpoint holds the frozen module too, as the lower run saved it; the run records where from
    lower = final_state(setup["run"])
    assert all(torch.equal(a[k], lower[k]) for k in lower if k.startswith("module.0.") and ".optim." not in k
               and not k.endswith("rng"))
    assert not any(k.startswith("module.0.") and (".optim." in k or k.endswith("rng")) for k in a)
    cfg = yaml.safe_load(Path(from_shards, "config.yaml").read_text())
    assert (cfg["data"]["lower_run"], cfg["data"]["lower_step"], cfg["data"]["lower_module"]) == (setup["run"], 3, 0)
    # the whole encoder loads from either run, as probes and the report load it; the step-0 baseline of the
    # probes has the frozen module as loaded
    assert load_encoder(from_shards).modules == (0, 1, 2, 3)
    base = load_run(from_shards, step=0).modules[0].state_dict()
    assert all(torch.equal(v, lower[f"module.0.{k}"]) for k, v in base.items())
    # the upper modules really trained on module 0's outputs: their weights moved from the initialisation
    assert not torch.equal(a["module.1.layers.0.0.weight"], final_state(setup["run"])["module.1.layers.0.0.weight"])


def test_a_run_from_latents_refuses_another_architecture(setup, capsys):
    latents = str(setup["root"] / "m0-arch")
    encode(setup["run"], 0, setup["audio"], latents, log=str)
    base = ["train", "configs/smoke.yaml", *[f"--set={o}" for o in [*FAST, *UPPER, f"data.uri={latents}"]]]
    assert main([*base, f"--set=run.dir={setup['root'] / 'arch1'}", "--set=model.channels=16"]) == 2
    assert "model.channels: 16, but the latent shards" in capsys.readouterr().err
    assert main([*base, f"--set=run.dir={setup['root'] / 'arch2'}",
                 "--set=model.modules.0.layers.0.kernel=12"]) == 2
    assert "model.modules.0:" in capsys.readouterr().err
    assert main([*base, f"--set=run.dir={setup['root'] / 'arch3'}", "--set=data.crop=2570"]) == 2
    assert "data.crop: 2570 samples is not a whole number" in capsys.readouterr().err
    assert main([*base[:-1], f"--set=data.uri={latents}", f"--set=run.dir={setup['root'] / 'arch4'}",
                 "--set=pipeline.stages=[[0],[1,2,3]]"]) == 2
    assert "must split modules 1..3" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_from_latents_equals_the_reference_from_latents(setup):
    root = setup["root"]
    latents = str(root / "m0-pipe")
    encode(setup["run"], 0, setup["audio"], latents, log=str)
    ref = small_run_from(root / "pipe-ref", f"data.uri={latents}", *UPPER)
    pipe = small_run_from(root / "pipe", f"data.uri={latents}", "run.steps=4", "checkpoint.every=2",
                          "run.runner=pipeline", "pipeline.stages=[[1],[2,3]]")
    assert_bitwise_equal(final_state(ref), final_state(pipe))


# ------------------------------------------------------------------------- module by module, resumable

def test_sequential_resumes_after_a_kill_and_equals_an_uninterrupted_sequence(setup, tmp_path):
    overrides = ["run.steps=4", "checkpoint.every=2", f"data.uri={setup['audio']}"]
    whole = sequential(cfg_for(tmp_path / "whole", *overrides))
    assert whole["encoder"] == str(tmp_path / "whole" / "module-3")
    assert load_encoder(whole["encoder"]).modules == (0, 1, 2, 3)
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "vgim_dist", "sequential", "configs/smoke.yaml",
            *[f"--set={o}" for o in [*FAST, f"run.dir={killed}", *overrides]]]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (killed / "module-1" / "checkpoints").exists():
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the sequence ended before the kill"
    assert not (killed / "module-3").exists()
    assert main(["sequential", "configs/smoke.yaml", *args[5:]]) == 0
    for k in range(4):
        assert_bitwise_equal(final_state(tmp_path / "whole" / f"module-{k}"), final_state(killed / f"module-{k}"))


@pytest.mark.slow
def test_sequential_nests_every_modules_mlflow_run_under_one_parent(setup, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "seq"
    sequential(cfg_for(run_dir, "run.steps=2", f"data.uri={setup['audio']}", "tracking.enabled=true",
                       "tracking.system_metrics=false"))
    c = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = json.loads((run_dir / "sequence.json").read_text())["parent_run_id"]
    runs = c.search_runs([c.get_experiment_by_name("vgim").experiment_id])
    modules = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["vgim.run_dir"] for r in modules) == [str(run_dir / f"module-{k}") for k in range(4)]
    assert c.get_run(parent).info.status == "FINISHED"
    assert not (ROOT / "mlruns").exists() and not (ROOT / "mlartifacts").exists()


def test_the_report_names_the_two_methods(tmp_path):
    simultaneous = cfg_for(tmp_path / "a")
    upper = cfg_for(tmp_path / "b", "data.lower_run=/runs/lower", "data.lower_module=0", "pipeline.stages=[]",
                    "data.uri=/shards")
    runs = [RunResults(tmp_path / n, c, {}) for n, c in (("a", simultaneous), ("b", upper))]
    assert sorted(assign_groups(runs)) == ["V-GIM", "V-GIM, sequential"]
    assert (schedule(simultaneous), schedule(upper)) == ("simultaneous greedy",
                                                         "sequential greedy (modules 0-0 frozen)")


def test_training_from_half_precision_and_mean_only_latents(setup):
    """bfloat16 shards round the input (the run differs from the float32 one); mean-only shards are the input
    as stored (no sample drawn)."""
    root = setup["root"]
    states = {}
    for dtype, what in (("float32", "params"), ("bfloat16", "params"), ("float32", "mean")):
        latents = str(root / f"m1-{dtype}-{what}")
        encode(setup["run"], 1, setup["audio"], latents, dtype=dtype, what=what, log=str)
        states[dtype, what] = final_state(small_run_from(root / f"upper-m1-{dtype}-{what}", f"data.uri={latents}",
                                                         "run.steps=2", "pipeline.stages=[]"))
    w = "module.2.layers.0.0.weight"
    assert set(states["float32", "params"]) == set(states["bfloat16", "params"]) == set(states["float32", "mean"])
    assert not torch.equal(states["float32", "params"][w], states["bfloat16", "params"][w])
    assert not torch.equal(states["float32", "params"][w], states["float32", "mean"][w])
