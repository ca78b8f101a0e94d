"""The command line as a user meets it: one-line errors that name the key or file and the way out, a fast
`--help` that shows every default, `--version`, and tracebacks only on request."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vgim_dist.cli import build_parser

VGIM = [sys.executable, "-m", "vgim_dist"]
TRAIN = [*VGIM, "train", "configs/smoke.yaml", "--set", "run.steps=1", "--set", "tracking.enabled=false"]
NO_AWS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def run(args, tmp, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "VGIM_DEBUG"}
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    args = [a.replace("TMP", str(tmp)) for a in args]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=Path(__file__).parents[1])


def with_checkpoint(tmp):
    d = tmp / "used" / "checkpoints" / "step-4"
    d.mkdir(parents=True)
    (d / "checkpoint.json").write_text('{"step": 4, "modules": [0, 1, 2, 3]}')


CASES = {
    "crop too short": ([*TRAIN, "--set", "data.crop=640", "--set", "run.dir=TMP/r"], None,
                       ["module 1 emits", "(data.crop)", "set data.crop to at least"]),
    "run dir holds checkpoints": ([*TRAIN, "--set", "run.dir=TMP/used"], with_checkpoint,
                                  ["already holds checkpoints up to step 4", "run.dir=", "--resume"]),
    "cuda without a GPU": ([*TRAIN, "--set", "run.device=cuda", "--set", "run.dir=TMP/r"], None,
                           ["run.device=cuda", "no CUDA device"]),
    "missing data.uri": ([*TRAIN, "--set", "data.uri=TMP/nowhere", "--set", "run.dir=TMP/r"], None,
                         ["no manifest.json", "data.uri=", "vgim data prepare"]),
    "empty data.uri": ([*TRAIN, "--set", "data.uri=", "--set", "run.dir=TMP/r"], None, ["data.uri: empty"]),
    "s3 run dir without credentials": ([*TRAIN, "--set", "run.dir=s3://bucket/run"], "no-aws",
                                       ["run.dir=s3://bucket/run", "credentials"]),
    "s3 data without credentials": ([*TRAIN, "--set", "data.uri=s3://bucket/shards", "--set", "run.dir=TMP/r"],
                                    "no-aws", ["data.uri=s3://bucket/shards", "credentials"]),
    "malformed run.dir URI": ([*TRAIN, "--set", "run.dir=s3:/bad-uri"], None,
                              ["run.dir", "malformed URI 's3:/bad-uri'"]),
    "malformed --out URI": ([*VGIM, "data", "prepare", "TMP", "--format", "folder", "--out", "s3:/bad-uri"], None,
                            ["--out", "malformed URI 's3:/bad-uri'"]),
    "unreachable --address": ([*TRAIN, "--set", "run.runner=pipeline", "--set", "run.dir=TMP/r", "--address",
                               "127.0.0.1:1"], None, ["no Ray cluster answers at 127.0.0.1:1", "ray start --head"]),
    "runner typo": ([*TRAIN, "--set", "run.runner=pipline"], None, ["run.runner", "did you mean pipeline?"]),
    "key typo": ([*TRAIN, "--set", "run.stesp=3"], None, ["unknown config key 'run.stesp'", "did you mean run.steps"]),
    "no such corpus": ([*VGIM, "data", "prepare", "TMP/none", "--format", "folder", "--out", "TMP/o"], None,
                       ["no corpus folder", "/none"]),
    "ui without a store": ([*VGIM, "ui", "TMP"], None, ["no MLflow store", "mlflow.db"]),
    "probe of no run": ([*VGIM, "eval", "probe", "TMP/none", "--task", "vowels", "--data", "TMP"], None,
                        ["TMP/none"]),
}


# Cases whose command imports the whole training or evaluation stack (seconds each) run in the slow tier.
SLOW_CASES = {"probe of no run", "s3 run dir without credentials", "s3 data without credentials"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
                         ids=list(CASES))
def test_bad_input_is_one_line_with_the_way_out(case, tmp_path):
    args, setup, words = CASES[case]
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    env = NO_AWS if setup == "no-aws" else None
    if callable(setup):
        setup(tmp_path)
    out = run(args, tmp_path, env)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("vgim: "), out.stdout + out.stderr
    for w in words:
        assert w.replace("TMP", str(tmp_path)) in lines[0], (w, lines[0])
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()   # no local folder named after a bad URI


@pytest.mark.slow
def test_eval_errors_give_the_hint_that_fits(tmp_path):
    """An eval error names its command and adds a hint only where the message has no way out of its own, and
    never points at --data where the data is not the problem."""
    assert run([*TRAIN, "--set", "run.dir=TMP/run"], tmp_path).returncode == 0
    cases = {   # args: (words in the line, words not in it)
        ("report", "TMP/none"): (["TMP/none", "(vgim report)", "run directory"], ["--data"]),
        ("eval", "probe", "TMP/run", "--task", "vowels", "--data", "TMP/nodata", "--no-mlflow"):
            (["no manifest.json in TMP/nodata", "(vgim eval probe); check --data"], []),
        ("eval", "decoder", "TMP/run", "--module", "9", "--no-mlflow"):
            (["module 9 does not exist", "modules 0..3", "(vgim eval decoder)"], ["--data", "check the run"]),
    }
    for args, (words, absent) in cases.items():
        out = run([*VGIM, *args], tmp_path)
        lines = [line.replace(str(tmp_path), "TMP") for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert all(w in lines[0] for w in words) and not any(w in lines[0] for w in absent), (args, lines[0])


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    args = [*TRAIN, "--set", "data.crop=640", "--set", f"run.dir={tmp_path}"]
    for extra, env in (([], {"VGIM_DEBUG": "1"}), (["--debug"], None)):
        cmd = [*args[:3], *extra, *args[3:]] if extra else args
        out = run(cmd, tmp_path, env)
        assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr, out.stderr


def test_debug_is_accepted_after_any_subcommand(tmp_path):
    parser = build_parser()
    for argv in (["train", "c.yaml", "--debug"], ["--debug", "train", "c.yaml"],
                 ["inspect", "c.yaml", "--debug"], ["config", "--keys", "--debug"],
                 ["data", "prepare", "x", "--format", "folder", "--out", "o", "--debug"],
                 ["data", "synth", "deboer", "--debug", "o"], ["data", "verify", "x", "--debug"],
                 ["eval", "probe", "r", "--task", "vowels", "--data", "d", "--debug"],
                 ["report", "r", "--debug"], ["ui", "r", "--debug"]):
        assert parser.parse_args(argv).debug is True, argv
    assert parser.parse_args(["train", "c.yaml"]).debug is False
    # What the one-line errors tell the user to do: `--debug` at the end of the same command.
    out = run([*TRAIN, "--set", "data.crop=640", "--set", f"run.dir={tmp_path}", "--debug"], tmp_path)
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr, out.stderr


def parsers(p, path):
    """(command path, parser) for every command at every depth."""
    yield path, p
    for a in p._actions:
        if a.__class__.__name__ == "_SubParsersAction":
            for name, sub in a.choices.items():
                yield from parsers(sub, f"{path} {name}")


def test_help_is_fast_shows_every_default_and_the_version():
    t0 = time.perf_counter()
    out = run([*VGIM, "--help"], ".")
    assert out.returncode == 0 and "train" in out.stdout
    assert time.perf_counter() - t0 < 3.0     # the interpreter's start included; torch alone takes 2-5 s
    probe = "import sys, vgim_dist.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    assert run([*VGIM, "--version"], ".").stdout.startswith("vgim-dist ")

    for path, p in parsers(build_parser(), "vgim"):
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or a.__class__.__name__ in ("_HelpAction", "_VersionAction",
                                                                "_StoreTrueAction"):
                continue
            assert "default" in (p._get_formatter()._get_help_string(a) or ""), f"{path} {a.option_strings}"
        assert "SPEC" not in text, path


def test_prepare_names_the_skipped_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import numpy as np
    import soundfile as sf

    sf.write(corpus / "good.wav", (np.sin(np.arange(16000) / 5) * 0.3).astype("float32"), 16000)
    (corpus / "broken.wav").write_bytes(b"RIFF not really a wav")
    out = run([*VGIM, "data", "prepare", str(corpus), "--format", "folder", "--out", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "skipped 1 files" in out.stderr and "manifest.json" in out.stderr and "broken.wav" in out.stderr
    assert re.search(r"prepare: 1/1 shard \(0:0\d elapsed, ETA 0:00\) - wrote train-00000.parquet: 1 utterances, "
                     "1 skipped", out.stderr)  # log: a line


def test_progress_is_a_line_per_item_in_a_log_with_an_eta(capsys, monkeypatch):
    from vgim_dist import progress as module

    clock = iter(range(0, 1000, 10))      # each item takes 10 s
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    assert list(module.progress(range(3), "probe vowels", unit="module")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == ["probe vowels: 1/3 module (0:10 elapsed, ETA 0:20)",
                                                    "probe vowels: 2/3 module (0:20 elapsed, ETA 0:10)",
                                                    "probe vowels: 3/3 module (0:30 elapsed, ETA 0:00)"]
    list(module.progress(["a", "b"], "prepare", unit="shard", note=lambda x: f"wrote {x}"))
    assert [line.split(" (")[0] + " -" + line.split(" -")[1] for line in capsys.readouterr().err.splitlines()] == [
        "prepare: 1/2 shard - wrote a", "prepare: 2/2 shard - wrote b"]
    list(module.progress(range(1, 8), "decoder module 0", unit="step", every=3))   # every 3rd item and the last
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "decoder module 0: 3/7 step", "decoder module 0: 6/7 step", "decoder module 0: 7/7 step"]


def test_progress_is_a_bar_on_a_terminal():
    """On a terminal the same loop draws one tqdm bar, redrawn in place, with the item's note as its suffix."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # a 120-column terminal
    code = ("import time; from vgim_dist.progress import progress\n"
            "for x in progress(['a', 'b', 'c'], 'prepare', unit='shard', note=lambda x: 'wrote ' + x):\n"
            "    time.sleep(0.15)\n")
    proc = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.PIPE, timeout=60)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:     # the terminal is closed once the child has gone
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert proc.returncode == 0
    text = drawn.decode(errors="replace")
    assert "\r" in text and "prepare:" in text and "/3" in text and "shard" in text, text
    assert "prepare: 1/3 shard (" not in text      # no log lines on a terminal


def test_a_corrupt_yaml_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    from vgim_dist.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  dir: [unclosed\nmodel: {a: 1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vgim: config error: {bad}, line 4, column 6: expected ',' or ']', but got ':' "
                   "(while parsing a flow sequence)"], err


def test_a_closed_pipe_ends_quietly():
    # The reader stops after one line; the writer must neither print a traceback nor report a failure.
    for _ in range(5):
        r = subprocess.run(f"{sys.executable} -m vgim_dist config --keys | head -1; exit ${{PIPESTATUS[0]}}",
                           shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 141) and r.stderr == "" and r.stdout.startswith("seed"), (r.returncode, r.stderr)


@pytest.mark.parametrize("value, meant", [("s3//bucket/run", "s3://bucket/run"), ("S3///bucket/run", "S3://bucket/run")])
def test_a_local_run_dir_that_looks_like_a_mistyped_uri_is_warned_about(caplog, value, meant):
    from vgim_dist.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"run.dir={value}"])
    assert cfg.run.dir == value
    assert f"run.dir: {value!r} is taken as a local folder" in caplog.text and f"did you mean {meant}?" in caplog.text


def test_every_option_of_every_command_prints_its_default():
    # In the printed help, not only in the formatter: argparse prints nothing for an option without help text.
    for path, p in parsers(build_parser(), "vgim"):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if (not a.option_strings or a.required or a.default == "==SUPPRESS=="
                    or a.__class__.__name__ in ("_HelpAction", "_VersionAction", "_StoreTrueAction")):
                continue
            shown = p._get_formatter()._get_help_string(a) % {"default": a.default}
            assert " ".join(shown.split()) in text and "default" in shown, f"{path} {a.option_strings[-1]}"
