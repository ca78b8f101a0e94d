"""Typed configuration: every shipped config loads; bad keys and values fail loudly and say why."""

import subprocess
import sys
from pathlib import Path

import pytest

from vgim_dist.config import ConfigError, dump_config, load_config

SHIPPED = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "config.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_required_configs_exist():
    names = {p.stem for p in SHIPPED}
    assert {"vgim", "gim", "cpc", "vgim-thesis", "gim-thesis", "smoke"} <= names


def test_overrides_are_typed():
    cfg = load_config("configs/vgim.yaml", ["run.steps=7", "optim.lr=1e-3", "pipeline.stages=[[0, 1], [2, 3]]",
                                            "model.modules.0.layers.1.kernel=6", "data.uri=s3://b/p"])
    assert cfg.run.steps == 7 and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.pipeline.stages == [[0, 1], [2, 3]]
    assert cfg.model.modules[0].layers[1].kernel == 6
    assert cfg.data.uri == "s3://b/p"


def test_yaml_exponent_without_dot_is_a_float():
    # PyYAML reads `2e-4` as a string; a float field must still accept it.
    assert load_config("configs/vgim.yaml", ["optim.lr=2e-4"]).optim.lr == 2e-4


@pytest.mark.parametrize("override,message", [
    ("run.stesp=3", r"unknown config key 'run.stesp'; did you mean run.steps"),
    ("modle.channels=3", r"unknown config key 'modle'; did you mean model"),
    ("run.steps=2.5", r"run.steps: expected an integer, got 2.5"),
    ("run.steps=-1", r"run.steps: expected int >= 0, got -1"),
    ("optim.beta1=1.5", r"optim.beta1: expected float in \[0.0, 1.0\], got 1.5"),
    ("run.runner=spark", r"run.runner: expected one of \['reference', 'pipeline'\], got 'spark'"),
    ("model.batch_norm=3", r"model.batch_norm: expected true or false, got 3"),
    ("optim.lr=fast", r"optim.lr: expected a number, got 'fast'"),
    ("pipeline.stages=[[0], [2, 3]]", r"pipeline.stages: \[\[0\], \[2, 3\]\] must split modules 0..3"),
    ("model.modules.9.autoregressor=3", r"model.modules.9 is not an index of a list of 4"),
    ("pipeline.in_flight=1000", r"pipeline.in_flight: expected int in \[1, 16\], got 1000"),
    ("run.deterministic=maybe", r"run.deterministic: expected true or false, got 'maybe'"),
    ("run.steps", r"expected KEY=VALUE"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/vgim.yaml", [override])


def test_run_steps_integral_float_is_accepted():
    assert load_config("configs/vgim.yaml", ["run.steps=3.0"]).run.steps == 3


@pytest.mark.slow
def test_importing_the_package_reads_no_command_line():
    out = subprocess.run([sys.executable, "-c", "import vgim_dist.model, vgim_dist.train.stage; print('ok')",
                          "--bogus-flag"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_cli_reports_config_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vgim_dist", "inspect", "configs/vgim.yaml", "--set",
                          "model.chanels=3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key 'model.chanels'; did you mean model.channels" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_inspect_json():
    import json

    out = subprocess.run([sys.executable, "-m", "vgim_dist", "inspect", "configs/vgim.yaml", "--samples", "20480",
                          "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [(r["module"], r["params"], r["frames"], r["channels"]) for r in rows] == [
        (0, 5_252_096, 1023, 512), (1, 5_246_976, 257, 512), (2, 4_196_864, 128, 512), (3, 1_902_080, 128, 256)]


def test_a_subcommand_that_cannot_be_imported_is_an_error(monkeypatch):
    from vgim_dist.cli import build_parser

    monkeypatch.setitem(sys.modules, "vgim_dist.data.cli", None)    # as if its dependencies were missing
    with pytest.raises(ImportError):
        build_parser()
