"""Offline checks of the Kubernetes manifests in infra/kuberay/, no cluster needed.

The RayCluster and RayJob documents are validated against the openAPIV3Schema of KubeRay
v1.7.0's CRDs (ray-operator/config/crd/bases at tag v1.7.0, unchanged but gzipped, in
tests/data/kuberay-v1.7.0/), made as strict about unknown fields
as the API server is. The other tests check what no schema can: that the job entrypoints run,
that the GPU pods hold the runs their configs describe, that the MLflow server stays inside the
cluster, and that no credential is written into a file.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_infra_launcher import IMAGE, PROJECT_DIR
from test_lock import locked_version

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "infra" / "kuberay"
SCHEMAS = REPO / "tests" / "data" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = ("namespace.yaml", "raycluster.yaml", "mlflow.yaml")
MANIFESTS += tuple(f"rayjob-{name}.yaml" for name in ("prepare-data", "train", "tune"))
NAMESPACE = "cmray"
WORKDIR = PROJECT_DIR  # the repository root inside the image
GPU = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Keys of a Ray runtime_env that the job manifests may use.
RUNTIME_ENV_KEYS = {"env_vars", "working_dir", "pip", "uv", "conda", "py_modules", "config"}

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are over 1 MB of YAML
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [doc for doc in yaml.load_all(text, Loader=loader) if doc]


DOCS: list[tuple[str, Doc]] = [
    (path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in _load(path)
]


def _id(item: tuple[str, Doc]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def of_kind(*kinds: str) -> list[tuple[str, Doc]]:
    return [(name, doc) for name, doc in DOCS if doc["kind"] in kinds]


def one(kind: str, name: str) -> Doc:
    found = [doc for _, doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under infra/kuberay, found {len(found)}"
    return found[0]


RAY_DOCS = of_kind("RayCluster", "RayJob")
JOBS = of_kind("RayJob")


def job_running(script: str) -> Doc:
    """The RayJob whose entrypoint runs pipelines/<script>."""
    found = [doc for _, doc in JOBS if f"pipelines/{script}" in doc["spec"]["entrypoint"]]
    assert len(found) == 1, f"expected one RayJob running pipelines/{script}"
    return found[0]


def walk(node: Any) -> Iterator[Any]:
    """Every value in a parsed document, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# --------------------------------------------------------------------------- Ray cluster specs


def cluster_spec(doc: Doc) -> Doc:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(doc: Doc) -> list[tuple[str, Doc]]:
    """(group name, group spec) of the head ("head") and every worker group."""
    spec = cluster_spec(doc)
    workers = [(group["groupName"], group) for group in spec.get("workerGroupSpecs", [])]
    return [("head", spec["headGroupSpec"]), *workers]


def ray_container(group: Doc) -> Doc:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container comes first


def gpus(group: Doc, side: str = "limits") -> int:
    return int(ray_container(group).get("resources", {}).get(side, {}).get(GPU, 0))


def cpus(group: Doc) -> float:
    value = str(ray_container(group)["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def gpu_group(doc: Doc) -> Doc:
    """The worker group with the most GPUs per pod."""
    return max((group for _, group in groups(doc)), key=gpus)


def env_value(container: Doc, name: str) -> Any:
    entries = [e for e in container.get("env", []) if e["name"] == name]
    assert len(entries) == 1, f"{container['name']}: expected one env entry {name}"
    return entries[0].get("value", entries[0].get("valueFrom"))


# --------------------------------------------------------------------------- CRD schemas


def structural(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema, as strict as Kubernetes: an object with
    ``properties`` takes no other field (unless x-kubernetes-preserve-unknown-fields), an
    x-kubernetes-int-or-string node takes an integer or a string, ``nullable`` admits null.
    Other x- extensions are ignored (jsonschema skips unknown keywords)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):  # maps of field names to schemas
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = structural(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd = _load(SCHEMAS / f"{CRD_FILES[kind]}.gz")[0]
    group, _, version = api_version.partition("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    entry = next((v for v in crd["spec"]["versions"] if v["name"] == version), None)
    assert entry is not None, f"the {kind} CRD has no version {version}"
    schema = structural(entry["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: Doc) -> list[str]:
    found = validator(doc["kind"], doc["apiVersion"]).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in found)


def test_the_manifests_exist() -> None:
    for name in MANIFESTS:
        assert (KUBERAY / name).is_file(), f"infra/kuberay/{name} is missing"
    for name, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
        assert doc["metadata"].get("name"), f"{name}: a {doc['kind']} without a name"
    assert {doc["kind"] for _, doc in RAY_DOCS} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_ray_manifest_matches_the_crd_schema(item: tuple[str, Doc]) -> None:
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


def _parent(doc: Doc, path: str) -> tuple[Any, str]:
    *keys, last = path.split("/")
    node: Any = doc
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, last


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, last = _parent(doc, path)
        node[last] = value

    return mutate


def _rename(path: str, new: str | None) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, last = _parent(doc, path)
        value = node.pop(last)
        if new is not None:
            node[new] = value

    return mutate


HEAD_CONTAINER = "spec/rayClusterSpec/headGroupSpec/template/spec/containers/0"
# What is broken, how, and the error the check must report.
BROKEN = {
    "misspelled top field": (
        _rename("spec/shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "misspelled pod field": (
        _rename(f"{HEAD_CONTAINER}/workingDir", "workingdir"),
        "'workingdir' was unexpected",
    ),
    "string for an integer": (_set("spec/backoffLimit", "two"), "is not of type 'integer'"),
    "string for a boolean": (
        _set("spec/shutdownAfterJobFinishes", "yes"),
        "is not of type 'boolean'",
    ),
    "list for a quantity": (
        _set(f"{HEAD_CONTAINER}/resources/limits/cpu", ["4"]),
        "is not valid under any of the given schemas",
    ),
    "value outside an enum": (
        _set("spec/rayClusterSpec/authOptions/mode", "password"),
        "'password' is not one of",
    ),
    "missing required field": (
        _rename("spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas", None),
        "'maxReplicas' is a required property",
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), list(BROKEN.values()), ids=list(BROKEN))
def test_the_schema_check_rejects_a_broken_manifest(
    mutate: Callable[[Doc], None], expected: str
) -> None:
    broken = copy.deepcopy(job_running("train.py"))
    mutate(broken)
    errors = schema_errors(broken)
    assert len(errors) == 1 and expected in errors[0], errors


def test_the_schema_check_takes_quantities_as_integers_or_strings() -> None:
    doc = copy.deepcopy(job_running("train.py"))
    for value in (4, "4", "4000m"):
        _set(f"{HEAD_CONTAINER}/resources/limits/cpu", value)(doc)
        assert schema_errors(doc) == []


# --------------------------------------------------------------------------- Ray pods


def test_images_and_ray_version_are_pinned() -> None:
    import ray

    nodes = [node for _, doc in DOCS for node in walk(doc) if isinstance(node, dict)]
    images = [node["image"] for node in nodes if "image" in node]
    assert images and set(images) == {IMAGE}
    assert f"-ray{ray.__version__}-" in IMAGE
    for _, doc in RAY_DOCS:
        assert cluster_spec(doc)["rayVersion"] == ray.__version__


def test_everything_lives_in_the_namespace() -> None:
    one("Namespace", NAMESPACE)
    for name, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, _id((name, doc))


def mlflow_uri() -> str:
    """The in-cluster URL of the MLflow Service in mlflow.yaml."""
    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    return f"http://mlflow.{service['metadata']['namespace']}.svc.cluster.local:{port}"


@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_ray_pods_share_identity_tracking_and_shared_memory(item: tuple[str, Doc]) -> None:
    _, doc = item
    spec = cluster_spec(doc)
    assert spec.get("authOptions", {}).get("mode") == "token", "the dashboard runs any code"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "training must not land on the head"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert gpus(head) == 0
    ports = {p["name"]: p["containerPort"] for p in ray_container(head).get("ports", [])}
    assert ports.get("dashboard", 8265) == 8265
    envs = []
    for name, group in groups(doc):
        pod = group["template"]["spec"]
        container = ray_container(group)
        account = one("ServiceAccount", pod["serviceAccountName"])
        assert account["metadata"].get("annotations"), f"{name}: no cloud identity"
        assert env_value(container, "MLFLOW_TRACKING_URI") == mlflow_uri()
        assert container.get("workingDir") == WORKDIR, f"{name}: drivers resolve configs/ here"
        mounts = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        shm = [v for v in pod["volumes"] if v["name"] in mounts]
        assert len(shm) == 1 and shm[0]["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm"
        envs.append(container["env"])
    assert all(env == envs[0] for env in envs), "the Ray containers' env differ"


@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_gpu_pods_ask_for_whole_gpus_consistently(item: tuple[str, Doc]) -> None:
    for name, group in groups(item[1]):
        count = gpus(group)
        assert gpus(group, "requests") in (0, count), f"{name}: GPU requests must equal limits"
        declared = group.get("rayStartParams", {}).get("num-gpus")
        assert declared is None or int(declared) == count, f"{name}: num-gpus != {GPU}"
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        if count:
            assert GPU in tolerated, f"{name}: GPU pods must tolerate the GPU nodes' taint"


def test_the_long_lived_cluster_autoscales_gpu_groups_from_zero() -> None:
    spec = cluster_spec(one("RayCluster", "cmray"))
    assert spec["enableInTreeAutoscaling"] is True
    sizes = {g["groupName"]: gpus(g) for g in spec["workerGroupSpecs"]}
    assert sizes["gpu-8x"] == 8 and sizes["gpu-1x"] == 1
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"], group["groupName"]


# --------------------------------------------------------------------------- RayJobs


def entrypoint(job: Doc) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"pipelines/\w+\.py", argv[1]), argv
    return argv


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict, each value read as YAML (as ``--set`` reads it)."""
    return {key: yaml.safe_load(value) for key, _, value in (p.partition("=") for p in pairs)}


def set_options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]


def read_yaml(relative: str) -> Doc:
    return yaml.safe_load((REPO / relative).read_text())


def training_run(job: Doc) -> Doc:
    """The ``run`` section of the training config a job runs: its --config with the
    entrypoint's --set, or for a search the ``base`` config with the search's ``overrides``."""
    argv = entrypoint(job)
    config = read_yaml(option(argv, "--config"))
    if "base" in config:
        run, changes = read_yaml(config["base"])["run"], overrides(config.get("overrides", []))
    else:
        run, changes = config["run"], overrides(set_options(argv))
    return {**run, **{k[4:]: v for k, v in changes.items() if k.startswith("run.")}}


def python(*commands: list[str]) -> list[tuple[int, str]]:
    """Run ``python ARGS`` for each command at once, from the repository root; (exit status,
    stderr) of each."""
    options: dict[str, Any] = {"cwd": REPO, "stdout": subprocess.DEVNULL, "text": True}
    procs = [
        subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, **options)
        for args in commands
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    return [(proc.returncode, stderr) for proc, stderr in zip(procs, errors, strict=True)]


@pytest.mark.parametrize("item", JOBS, ids=_id)
def test_job_entrypoint_runs_a_pipeline_with_a_config_that_exists(item: tuple[str, Doc]) -> None:
    argv = entrypoint(item[1])
    script = REPO / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    config = option(argv, "--config")
    commands = [[argv[1], "--help"]]
    if config is not None:
        assert config.startswith("configs/") and (REPO / config).is_file(), config
        # The config and every --set resolve and validate, as the driver will before Ray starts.
        commands.append([*argv[1:], "--print-config"])
    for command, (status, stderr) in zip(commands, python(*commands), strict=True):
        assert status == 0, f"python {shlex.join(command)}: {stderr}"
    if config is None:  # prepare_data.py takes flags: they must parse
        spec = importlib.util.spec_from_file_location("entry", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(argv[2:])


@pytest.mark.parametrize("item", JOBS, ids=_id)
def test_job_lifecycle_and_runtime_env(item: tuple[str, Doc]) -> None:
    spec = item[1]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["backoffLimit"] >= 1, "a failed job is retried on a fresh cluster (and resumes)"
    # The head has num-cpus 0: a job that reserved CPUs for its driver would never start.
    assert "entrypointNumCpus" not in spec and "entrypointNumGpus" not in spec
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}")) or {}
    assert isinstance(runtime_env, dict) and set(runtime_env) <= RUNTIME_ENV_KEYS
    assert runtime_env.get("working_dir", WORKDIR) == WORKDIR
    env_vars = runtime_env.get("env_vars", {})
    assert all(isinstance(v, str) for v in env_vars.values()), "env_vars values are strings"
    assert not [k for k in env_vars if SECRET_NAME.search(k)], "secrets go by reference"


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
def test_the_gpu_pod_holds_a_whole_run(script: str) -> None:
    job = job_running(script)
    run, group = training_run(job), gpu_group(job)
    assert run["use_gpu"] is True
    assert gpus(group) >= run["num_workers"], f"{run['num_workers']} GPU workers, one pod"
    assert cpus(group) >= run["num_workers"] * run["cpus_per_worker"]
    assert group["maxReplicas"] >= 1


def test_the_search_names_as_many_trials_at_once_as_gpu_pods() -> None:
    job = job_running("tune.py")
    argv = entrypoint(job)
    search = read_yaml(option(argv, "--config"))
    # 0 would size the search from the GPUs present at the start: none in an autoscaled group.
    configured = search["run"].get("max_concurrent_trials", 0)
    at_once = int(overrides(set_options(argv)).get("run.max_concurrent_trials", configured))
    assert 1 <= at_once <= gpu_group(job)["maxReplicas"]
    assert cluster_spec(job)["enableInTreeAutoscaling"] is True


def test_prepare_data_writes_what_training_reads() -> None:
    job = job_running("prepare_data.py")
    argv = entrypoint(job)
    train = read_yaml(option(entrypoint(job_running("train.py")), "--config"))
    assert f"{option(argv, '--out').rstrip('/')}/manifest.json" == train["data"]["manifest"]
    assert [gpus(group) for _, group in groups(job)] == [0] * len(groups(job)), "CPU only"
    source = option(argv, "--source")
    if source.startswith("lmdb:"):  # read in place by the driver and every task
        for name, group in groups(job):
            mounts = ray_container(group)["volumeMounts"]
            assert any(source[5:].startswith(m["mountPath"]) for m in mounts), name


# --------------------------------------------------------------------------- MLflow server


def test_mlflow_server_stays_inside_the_cluster() -> None:
    deployment, service = one("Deployment", "mlflow"), one("Service", "mlflow")
    one("ServiceAccount", "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 5000
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == "mlflow"
    (container,) = pod["spec"]["containers"]
    # MLflow's own image must run the server version the clients are locked at.
    assert container["image"] in (IMAGE, f"ghcr.io/mlflow/mlflow:v{locked_version('mlflow')}")
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    host = mlflow_uri().removeprefix("http://")
    assert host in option(args, "--allowed-hosts").split(","), "pods would get 403"
    assert option(args, "--default-artifact-root").startswith("s3://YOUR-BUCKET/")
    assert ("--serve-artifacts" in args) != ("--no-serve-artifacts" in args)
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] in ("http", 5000), probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 5000


def test_mlflow_backend_store_is_on_a_volume_or_from_a_secret() -> None:
    deployment = one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    uri = option(container["args"], "--backend-store-uri")
    match = re.fullmatch(r"\$\((\w+)\)", uri)
    value = env_value(container, match.group(1)) if match else uri
    if isinstance(value, dict):  # a database URL, by reference
        assert value["secretKeyRef"]["name"] and value["secretKeyRef"]["key"]
        return
    assert value.startswith("sqlite:////"), value
    # SQLite: the file on a PersistentVolumeClaim, one pod, the old one gone before the new.
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    path = value.removeprefix("sqlite:///")
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert len(mounts) == 1 and mounts[0]["name"] in claims
    one("PersistentVolumeClaim", claims[mounts[0]["name"]])
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# --------------------------------------------------------------------------- exposure, secrets


def test_nothing_is_exposed_outside_the_cluster() -> None:
    assert not of_kind("Ingress", "Route", "Gateway", "HTTPRoute")
    for name, doc in DOCS:
        for node in walk(doc):
            if not isinstance(node, dict):
                continue
            where = _id((name, doc))
            assert node.get("type") not in ("LoadBalancer", "NodePort"), where
            assert node.get("serviceType", "ClusterIP") == "ClusterIP", where
            assert not node.get("enableIngress") and not node.get("hostNetwork"), where
            assert "hostPort" not in node, where


def test_no_literal_secrets() -> None:
    for path in sorted(KUBERAY.glob("*.yaml")):
        text = path.read_text()
        assert "aws_secret_access_key" not in text, path.name
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS key"
    assert not of_kind("Secret"), "Secrets are created out of band, never committed"
    for name, doc in DOCS:
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and "value" in node:
                assert not SECRET_NAME.search(node["name"]), f"{_id((name, doc))}: {node['name']}"
            if isinstance(node, dict) and "secretKeyRef" in node:
                assert node["secretKeyRef"]["name"] and node["secretKeyRef"]["key"]
