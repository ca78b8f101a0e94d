"""The command line as a user meets it: one-line errors that name the key or file and the way out, a fast
`--help` that shows every default, `--version`, and tracebacks only on request."""

import os
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


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
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


def test_debug_shows_the_traceback(tmp_path):
    args = [*TRAIN, "--set", "data.crop=640", "--set", f"run.dir={tmp_path}"]
    for extra, env in (([], {"VGIM_DEBUG": "1"}), (["--debug"], None)):
        cmd = [*args[:3], *extra, *args[3:]] if extra else args
        out = run(cmd, tmp_path, env)
        assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr, out.stderr


def test_help_is_fast_shows_every_default_and_the_version():
    t0 = time.perf_counter()
    out = run([*VGIM, "--help"], ".")
    assert out.returncode == 0 and "train" in out.stdout
    assert time.perf_counter() - t0 < 3.0     # the interpreter's start included; torch alone takes 2-5 s
    probe = "import sys, vgim_dist.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    assert run([*VGIM, "--version"], ".").stdout.startswith("vgim-dist ")

    def parsers(p, path):
        yield path, p
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                for name, sub in a.choices.items():
                    yield from parsers(sub, f"{path} {name}")

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
    assert "prepare: 1/1 shard - wrote train-00000.parquet: 1 utterances, 1 skipped" in out.stderr  # log: a line


def test_progress_is_a_line_per_item_in_a_log(capsys):
    from vgim_dist.progress import progress

    assert list(progress(range(3), "probe vowels", unit="module")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == [f"probe vowels: {k}/3 module" for k in (1, 2, 3)]
    list(progress(["a", "b"], "prepare", unit="shard", note=lambda x: f"wrote {x}"))
    assert capsys.readouterr().err.splitlines() == ["prepare: 1/2 shard - wrote a", "prepare: 2/2 shard - wrote b"]


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
    assert "prepare: 1/3 shard - " not in text      # no log lines on a terminal
