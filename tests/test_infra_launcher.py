"""The Ray cluster launcher configs and the container image in infra/, checked offline.

The launcher configs go through the JSON schema shipped in the installed ray wheel, the check
`ray up` makes before it contacts a cloud. The other tests hold the configs to what they claim:
the one image tag, each instance type's real GPUs and CPUs, credentials from instance
identities only, and an image tagged with the versions it installs from the lock (uv.lock).
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from test_lock import locked_version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LAUNCHER = {name: INFRA / "ray-cluster" / f"{name}.yaml" for name in ("aws", "gcp")}

# The one image every infra config runs: <cmray version>-ray<Ray version>-cu<CUDA version>.
IMAGE = "ghcr.io/cmray/cmray:0.1.0-ray2.60.0-cu132"
# Where the image keeps the project, and where the launcher syncs the checkout.
PROJECT_DIR = "/home/ray/cmray"

# Instance type -> (NVIDIA GPUs, vCPUs), as the providers publish them.
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    # AWS
    "m6i.2xlarge": (0, 8),
    "m6i.8xlarge": (0, 32),
    "g5.2xlarge": (1, 8),  # A10G 24GB
    "g6e.xlarge": (1, 4),  # L40S 48GB
    "p4d.24xlarge": (8, 96),  # A100 40GB
    "p5.48xlarge": (8, 192),  # H100 80GB
    # Google Cloud
    "n2-standard-8": (0, 8),
    "n2-standard-32": (0, 32),
    "g2-standard-8": (1, 8),  # L4 24GB
    "a2-highgpu-1g": (1, 12),  # A100 40GB
    "a2-highgpu-8g": (8, 96),  # A100 40GB
    "a3-highgpu-8g": (8, 208),  # H100 80GB
}

# The names AWS keys are stored under. The launcher and the image must not mention them at all
# (instance identities only); elsewhere in infra/ they may name a Secret's keys, never a value.
AWS_KEY_NAMES = re.compile(
    r"aws_secret_access_key|aws_access_key_id|aws_session_token", re.IGNORECASE
)
# Credentials that must never sit in a file: one of those names given a literal value (not a
# placeholder like ... or $VAR), AWS key ids, 40-character secret keys (mixed case and digits,
# as AWS issues them) and private keys.
SECRET_PATTERNS = [
    re.compile(
        rf"(?:{AWS_KEY_NAMES.pattern})[\"']?\s*[:=]\s*[\"']?(?!\.\.\.|\$|YOUR-)[A-Za-z0-9/+=]{{8,}}",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(
        r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[0-9])(?=[A-Za-z0-9/+]*[a-z])"
        r"(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
    ),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:"),
]


@functools.cache
def _schema() -> dict[str, Any]:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER[name].read_text())


def _instance_type(cfg: dict[str, Any], node_type: str) -> str:
    node_config = cfg["available_node_types"][node_type]["node_config"]
    return node_config["InstanceType" if cfg["provider"]["type"] == "aws" else "machineType"]


def _gpu_worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and spec["resources"].get("GPU", 0) > 0
    }


def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def _tag_parts() -> tuple[str, str, str]:
    match = re.fullmatch(r"ghcr\.io/cmray/cmray:(.+)-ray(.+)-cu(\d+)", IMAGE)
    assert match
    return match[1], match[2], match[3]


def _infra_files() -> list[Path]:
    return sorted(path for path in INFRA.rglob("*") if path.is_file())


def _find_secret(text: str) -> str | None:
    for pattern in SECRET_PATTERNS:
        match = pattern.search(text)
        if match:
            return match[0]
    return None


# --- the launcher configs against Ray's schema ------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_matches_the_ray_schema(name: str) -> None:
    jsonschema.validate(_launcher(name), _schema())


def _unknown_top_level_key(cfg: dict[str, Any]) -> None:
    cfg["max_worker"] = 4


def _max_workers_as_words(cfg: dict[str, Any]) -> None:
    cfg["max_workers"] = "many"


def _gpu_count_as_text(cfg: dict[str, Any]) -> None:
    next(iter(_gpu_worker_types(cfg).values()))["resources"]["GPU"] = "8"


def _unknown_docker_option(cfg: dict[str, Any]) -> None:
    cfg["docker"]["gpus"] = "all"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
@pytest.mark.parametrize(
    "breakage",
    [_unknown_top_level_key, _max_workers_as_words, _gpu_count_as_text, _unknown_docker_option],
)
def test_the_schema_rejects_a_broken_copy(
    name: str, breakage: Callable[[dict[str, Any]], None]
) -> None:
    cfg = copy.deepcopy(_launcher(name))
    breakage(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _schema())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_rays_own_preparation(name: str) -> None:
    """What `ray up` runs before it contacts the cloud: defaults merged in, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher(name)))


# --- node types, resources, image, credentials ------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_head_node_type_exists_and_has_no_gpu(name: str) -> None:
    cfg = _launcher(name)
    head = cfg["head_node_type"]
    assert head in cfg["available_node_types"]
    assert cfg["available_node_types"][head]["resources"].get("GPU", 0) == 0
    assert INSTANCE_TYPES[_instance_type(cfg, head)][0] == 0


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_node_types_declare_their_real_gpus_and_cpus(name: str) -> None:
    cfg = _launcher(name)
    for node_type, spec in cfg["available_node_types"].items():
        instance = _instance_type(cfg, node_type)
        assert instance in INSTANCE_TYPES, f"{instance}: add its GPUs and vCPUs to the table"
        gpus, vcpus = INSTANCE_TYPES[instance]
        resources = spec["resources"]
        assert resources.get("GPU", 0) == gpus, node_type
        if node_type == cfg["head_node_type"]:
            assert resources.get("CPU", vcpus) <= vcpus, node_type
        else:
            assert resources.get("CPU") == vcpus, node_type
        run_options = spec.get("docker", {}).get("worker_run_options", [])
        assert ("--gpus all" in run_options) == (gpus > 0), node_type


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_there_is_an_eight_gpu_and_a_one_gpu_worker_type(name: str) -> None:
    cfg = _launcher(name)
    offered = {
        spec["resources"]["GPU"]
        for spec in _gpu_worker_types(cfg).values()
        if spec.get("max_workers", 0) > 0
    }
    assert {1, 8} <= offered


@pytest.mark.parametrize("name", sorted(LAUNCHER))
@pytest.mark.parametrize(
    "train_config", sorted(p.name for p in (ROOT / "configs").glob("lsun_bedroom256_*.yaml"))
)
def test_an_lsun_run_fits_on_one_gpu_node(name: str, train_config: str) -> None:
    run = yaml.safe_load((ROOT / "configs" / train_config).read_text())["run"]
    assert run["use_gpu"]
    gpus, cpus = run["num_workers"], run["num_workers"] * run["cpus_per_worker"]
    assert any(
        spec["resources"]["GPU"] >= gpus and spec["resources"]["CPU"] >= cpus
        for spec in _gpu_worker_types(_launcher(name)).values()
    )


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_every_node_runs_the_image(name: str) -> None:
    cfg = _launcher(name)
    docker = cfg["docker"]
    assert docker["image"] == IMAGE
    assert docker["container_name"]
    assert docker.get("head_image", IMAGE) == docker.get("worker_image", IMAGE) == IMAGE
    for spec in cfg["available_node_types"].values():
        assert spec.get("docker", {}).get("worker_image", IMAGE) == IMAGE


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_storage_access_comes_from_instance_identities(name: str) -> None:
    cfg = _launcher(name)
    for node_type, spec in cfg["available_node_types"].items():
        node_config = spec["node_config"]
        if cfg["provider"]["type"] == "aws":
            profile = node_config["IamInstanceProfile"]
            assert profile.get("Arn") or profile.get("Name"), node_type
        else:
            (account,) = node_config["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), node_type
            assert account["scopes"], node_type


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_setup_installs_the_synced_checkout(name: str) -> None:
    cfg = _launcher(name)
    assert cfg["file_mounts"]
    for remote, local in cfg["file_mounts"].items():
        assert remote.startswith(PROJECT_DIR + "/"), remote
        assert (ROOT / local).is_dir(), local  # a directory: bind-mounted files go stale
    assert any(
        "pip install --no-deps" in command and f"-e {PROJECT_DIR}" in command
        for command in cfg["setup_commands"]
    )
    assert re.search(rf"^WORKDIR {PROJECT_DIR}$", _dockerfile(), re.MULTILINE)


# --- the image ----------------------------------------------------------------------------


def test_the_image_tag_names_the_project_ray_and_cuda_versions() -> None:
    project, ray_version, cuda = _tag_parts()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(project)}"$', pyproject, re.MULTILINE)
    assert ray_version == locked_version("ray") == ray.__version__
    # torch's Linux wheels get CUDA from the cuda-toolkit wheels the lock pins beside them.
    assert "".join(locked_version("cuda-toolkit").split(".")[:2]) == cuda
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.", _dockerfile(), re.MULTILINE)
    assert base and base[1] + base[2] == cuda
    major, minor = cuda[:-1], cuda[-1]
    assert f"assert torch.version.cuda == '{major}.{minor}'" in _dockerfile()


def test_the_dockerfile_names_the_image_it_builds() -> None:
    text = _dockerfile()
    assert f"docker build -f infra/docker/Dockerfile -t {IMAGE} ." in text
    assert f"docker push {IMAGE}" in text


def test_the_dockerfile_base_image_is_pinned() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", _dockerfile(), re.MULTILINE)
    assert bases
    for base in bases:
        if "@sha256:" in base:  # a digest pins it exactly
            continue
        name, _, tag = base.rpartition(":")
        assert name and tag and "/" not in tag, f"{base}: no tag"
        assert tag != "latest", base


def test_the_image_suits_the_launcher() -> None:
    """The launcher copies files in with rsync and reads HOME from the image's config."""
    text = _dockerfile()
    assert re.search(r"apt-get install[^\n]*\\\n[^\n]*\brsync\b", text)
    assert re.search(r"^USER 1000(?::1000)?$", text, re.MULTILINE)  # ray, non-root
    assert "--uid 1000" in text
    assert "HOME=/home/ray" in text


def test_the_build_context_leaves_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", "runs", "**/*.pt", "!cmray/eval/assets/*.pt"} <= set(lines)
    assert lines.index("!cmray/eval/assets/*.pt") > lines.index("**/*.pt")


# --- everything under infra/ --------------------------------------------------------------


def test_no_ray_ml_image_under_infra() -> None:
    """The deprecated rayproject/ray-ml images (a whole word: cmray-mlflow is fine)."""
    ray_ml = re.compile(r"(?<![\w-])ray-ml(?!\w)")
    assert ray_ml.search("image: rayproject/ray-ml:2.9.0-gpu")
    assert not ray_ml.search("name: cmray-mlflow")
    for path in _infra_files():
        assert not ray_ml.search(path.read_text(errors="replace")), path


def test_the_secret_check_catches_keys() -> None:
    rng = random.Random(0)
    secret = "Ab1" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(37))
    key_id = "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    assert _find_secret(f"secret: {secret}\n") == secret
    assert _find_secret(f"id: {key_id}\n") == key_id
    assert _find_secret("aws_secret_access_key = hunter2hunter2\n") is not None
    assert _find_secret('AWS_ACCESS_KEY_ID: "abcd1234efgh"\n') is not None
    # Naming a key, or a placeholder for its value, is not a credential.
    assert _find_secret("--from-literal=AWS_SECRET_ACCESS_KEY=... \\\n") is None
    assert _find_secret("key: AWS_ACCESS_KEY_ID\n") is None


def test_no_credentials_under_infra() -> None:
    for path in _infra_files():
        found = _find_secret(path.read_text(errors="replace"))
        assert found is None, f"{path.relative_to(ROOT)}: {found!r}"


def test_the_launcher_and_the_image_never_name_aws_keys() -> None:
    for path in [*LAUNCHER.values(), DOCKERFILE]:
        assert not AWS_KEY_NAMES.search(path.read_text()), path
