"""The cluster files against the schemas of the tools that read them: cluster/kuberay/*.yaml against KubeRay's
RayCluster and RayJob CRDs (stored in cluster/kuberay/crds/, with their source), cluster/ray-cluster.yaml
against the cluster launcher's schema inside the installed `ray` package. Each check is shown to reject a
broken copy. And the versions these files name agree with the Dockerfile and pyproject.toml."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "cluster/kuberay/crds"
CUT = "x-vgim-cut"          # a Kubernetes core type left out of the stored copy (README.md there)
SAME_AS = "x-vgim-same-as"  # RayJob's rayClusterSpec: the RayCluster spec


def crd_schema(name: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{name}.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """A CRD's structural schema as the API server applies it under `kubectl apply`'s default strict field
    validation: an object's unknown fields are errors, except where the schema keeps unknown fields (a map
    with additionalProperties, a cut core type)."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if node.get(CUT):
            return
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(schema)
    return schema


def kuberay_schemas() -> dict[str, dict]:
    cluster = crd_schema("rayclusters")
    job = crd_schema("rayjobs")
    assert job["properties"]["spec"]["properties"]["rayClusterSpec"][SAME_AS] == "rayclusters.ray.io spec"
    job["properties"]["spec"]["properties"]["rayClusterSpec"] = copy.deepcopy(cluster["properties"]["spec"])
    return {"RayCluster": strict(cluster), "RayJob": strict(job)}


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster/kuberay").glob("*.yaml"))}


def kuberay_errors(doc: dict) -> list[str]:
    """Every schema error of one manifest, as `path: message`."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion: {doc.get('apiVersion')!r} is not ray.io/v1"]
    schema = kuberay_schemas().get(doc.get("kind"))
    if schema is None:
        return [f"kind: {doc.get('kind')!r} is neither RayCluster nor RayJob"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "cluster/kuberay").glob("*.yaml")))
def test_kuberay_manifest_matches_the_crd(name):
    assert kuberay_errors(manifests()[name]) == []


def _break(doc: dict, how: str) -> dict:
    doc = copy.deepcopy(doc)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    if how == "misspelled field":
        spec["workerGroupSpecs"][0]["replica"] = spec["workerGroupSpecs"][0].pop("replicas")
    elif how == "wrong type":
        spec["workerGroupSpecs"][0]["maxReplicas"] = "four"
    elif how == "missing required field":
        del spec["headGroupSpec"]["template"]
    elif how == "ray start parameter not a string":
        spec["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    elif how == "pod template without containers":
        del spec["headGroupSpec"]["template"]["spec"]["containers"]
    elif how == "unknown top-level field":
        doc["spec"]["shutdownAfterJobFinish"] = True
    return doc


@pytest.mark.parametrize("how", ["misspelled field", "wrong type", "missing required field",
                                 "ray start parameter not a string", "pod template without containers",
                                 "unknown top-level field"])
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_a_broken_copy_of_a_kuberay_manifest_is_rejected(name, how):
    good = manifests()[name]
    assert kuberay_errors(good) == []
    errors = kuberay_errors(_break(good, how))
    assert errors, f"{name} with a {how} passed the schema"


def test_stored_crds_name_their_source():
    readme = (CRDS / "README.md").read_text()
    for name in ("rayclusters", "rayjobs"):
        head = (CRDS / f"ray.io_{name}.yaml").read_text().split("\napiVersion:")[0]
        commit = re.search(r"at commit\s+#?\s*([0-9a-f]{40})", head).group(1)
        assert commit in readme
        assert f"helm-chart/kuberay-operator/crds/ray.io_{name}.yaml" in head


def launcher_config() -> dict:
    return yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())


def check_launcher_config(cfg: dict) -> None:
    """What `ray up` does with the file before it starts anything: the file against the schema shipped in the
    `ray` package (ray/autoscaler/ray-schema.json), then with the provider's defaults filled in, again."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_cluster_launcher_config_matches_rays_schema():
    check_launcher_config(launcher_config())


@pytest.mark.parametrize("how", ["misspelled field", "wrong type", "unknown node type field"])
def test_a_broken_copy_of_the_launcher_config_is_rejected(how):
    cfg = launcher_config()
    if how == "misspelled field":
        cfg["max_worker"] = cfg.pop("max_workers")
    elif how == "wrong type":
        cfg["docker"]["run_options"] = "--shm-size=16g"
    else:
        cfg["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        check_launcher_config(cfg)


# --- versions -----------------------------------------------------------------------------------------------

def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray() -> str:
    (req,) = [d for d in pyproject()["project"]["dependencies"] if re.match(r"ray\b", d)]
    m = re.fullmatch(r"ray\[[^\]]*\]==(\S+)", req)
    assert m, f"pyproject.toml must pin Ray exactly (every node and the client run the same Ray): {req}"
    return m.group(1)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M))


def images_in_cluster_files() -> list[str]:
    found = [launcher_config()["docker"]["image"]]
    for doc in manifests().values():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for pod in [spec["headGroupSpec"]["template"], *[w["template"] for w in spec["workerGroupSpecs"]]]:
            found += [c["image"] for c in pod["spec"]["containers"]]
    return found


def test_versions_agree_across_dockerfile_cluster_files_and_pyproject():
    version = pyproject()["project"]["version"]
    ray_version = pinned_ray()
    assert ray.__version__ == ray_version, "the installed Ray is not the pinned one: run scripts/setup.sh"
    # The image tag is the package version, in every cluster file and in the documented build command.
    images = images_in_cluster_files()
    assert images and {i.rsplit(":", 1)[1] for i in images} == {version}, images
    assert len({i.rsplit(":", 1)[0] for i in images}) == 1, images
    build = re.search(r"docker build -t (\S+) \.", (ROOT / "docs/cluster.md").read_text()).group(1)
    assert build == images[0]
    # KubeRay's rayVersion is the pinned Ray.
    for name, doc in manifests().items():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_version, name
    # Python: the image's is named in the Dockerfile (both bases) and lies within requires-python; ruff checks
    # the code for the oldest one allowed.
    args = dockerfile_args()
    oldest = re.fullmatch(r">=(\d+\.\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert pyproject()["tool"]["ruff"]["target-version"] == "py" + oldest.replace(".", "")
    for python in (args["PYTHON_VERSION"], *re.findall(r"PYTHON_VERSION=(\d+\.\d+)",
                                                        (ROOT / "scripts/image_check.sh").read_text())):
        assert tuple(map(int, python.split("."))) >= tuple(map(int, oldest.split("."))), python
    assert args["BASE"].startswith("nvidia/cuda:") and "ubuntu24.04" in args["BASE"]
    assert args["PYTHON_VERSION"] == "3.12"       # Ubuntu 24.04's python3
