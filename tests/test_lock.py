"""The one lock (uv.lock) against the files that use it, checked offline.

Every install (make, CI, the image) runs `uv sync --frozen` from uv.lock, so these tests compare
files in the repository with each other, and the environment the tests run in with the lock.
None of them asks a registry anything: a new release somewhere cannot turn them red.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "uv.lock"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
BOOTSTRAP = ROOT / "infra" / "locked_requirement.py"
_spec = importlib.util.spec_from_file_location("locked_requirement", BOOTSTRAP)
BOOTSTRAP_MODULE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BOOTSTRAP_MODULE)


@functools.cache
def lock() -> dict[str, Any]:
    return tomllib.loads(LOCK.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def locked_versions() -> dict[str, set[str]]:
    """{canonical name: the versions the lock holds} (two where it forks on Python version)."""
    versions: dict[str, set[str]] = {}
    for package in lock()["package"]:
        versions.setdefault(canonicalize_name(package["name"]), set()).add(package["version"])
    return versions


def locked_version(name: str) -> str:
    """The one version of `name` in the lock."""
    (only,) = locked_versions()[canonicalize_name(name)]
    return only


def _filename(artifact: dict[str, Any]) -> str:
    return artifact["url"].rsplit("/", 1)[-1]


def _requirements(entries: list[str], extra: str | None = None) -> set[tuple]:
    """Comparable (name, extras, specifier, extra) tuples of pyproject requirement strings."""
    out = set()
    for entry in entries:
        req = Requirement(entry)
        name = canonicalize_name(req.name)
        out.add((name, tuple(sorted(req.extras)), SpecifierSet(str(req.specifier)), extra))
    return out


def _locked_requirements(entries: list[dict[str, Any]]) -> set[tuple]:
    out = set()
    for entry in entries:
        marker = entry.get("marker", "")
        extra = re.fullmatch(r"extra == '([^']+)'", marker)
        assert not marker or extra, f"unexpected marker in the lock's manifest: {marker}"
        out.add(
            (
                canonicalize_name(entry["name"]),
                tuple(sorted(entry.get("extras", []))),
                SpecifierSet(entry.get("specifier", "")),
                extra[1] if extra else None,
            )
        )
    return out


def _groups() -> dict[str, list[str]]:
    return pyproject().get("dependency-groups", {})


def _commands(text: str) -> str:
    """A Makefile's or Dockerfile's text without its comment lines."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _root() -> dict[str, Any]:
    (root,) = [p for p in lock()["package"] if p.get("source") == {"editable": "."}]
    return root


# --- the lock is current and well-formed ---------------------------------------------------


def test_the_lock_was_resolved_from_this_pyproject() -> None:
    """pyproject's ranges, extras and groups are exactly what the lock was resolved from."""
    project = pyproject()["project"]
    wanted = _requirements(project["dependencies"])
    for extra, entries in project["optional-dependencies"].items():
        wanted |= _requirements(entries, extra)
    metadata = _root()["metadata"]
    assert _locked_requirements(metadata["requires-dist"]) == wanted, "run `make lock`"
    groups = {group: _requirements(entries) for group, entries in _groups().items()}
    locked_groups = {
        group: _locked_requirements(entries)
        for group, entries in metadata.get("requires-dev", {}).items()
    }
    assert locked_groups == groups, "run `make lock`"
    assert lock()["requires-python"] == project["requires-python"]


def test_pyproject_ranges_admit_the_locked_versions() -> None:
    project = pyproject()["project"]
    entries = list(project["dependencies"])
    for group in [*project["optional-dependencies"].values(), *_groups().values()]:
        entries += group
    versions = locked_versions()
    for entry in entries:
        req = Requirement(entry)
        for locked in versions[canonicalize_name(req.name)]:
            assert req.specifier.contains(locked, prereleases=True), f"{req} excludes {locked}"


def test_every_locked_version_matches_its_files() -> None:
    problems = BOOTSTRAP_MODULE.version_mismatches(lock())
    assert not problems, "\n".join(problems)


def test_a_version_changed_by_hand_fails_with_one_line_naming_the_package(tmp_path: Path) -> None:
    """A copy of the lock with one version edited and nothing re-locked: the check that starts
    every install (make, the image) stops it with one line that names the package."""
    edited = re.sub(
        r'(\nname = "pyyaml"\nversion = ")([^"]+)"', r'\g<1>6.0.99"', LOCK.read_text(), count=1
    )
    assert edited != LOCK.read_text()
    (tmp_path / "uv.lock").write_text(edited)
    proc = subprocess.run(
        [sys.executable, str(BOOTSTRAP), "uv", "--lock", str(tmp_path / "uv.lock")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and not proc.stdout
    assert proc.stderr.strip() == (
        f"uv.lock: pyyaml is locked at 6.0.99 but its files are {locked_version('pyyaml')};"
        " edited without re-locking? run `make lock`"
    )


def test_every_registry_package_is_hash_pinned() -> None:
    for package in lock()["package"]:
        if "registry" not in package["source"]:
            continue
        artifacts = [*package.get("wheels", []), *filter(None, [package.get("sdist")])]
        assert artifacts, f"{package['name']}: no files in the lock"
        for artifact in artifacts:
            assert artifact.get("hash", "").startswith("sha256:"), f"{package['name']}: no hash"


def test_the_lock_covers_this_machine_and_the_image() -> None:
    """Linux (this machine, CI and the image) and macOS laptops, with Python 3.11."""
    markers = lock()["supported-markers"]
    assert "sys_platform == 'linux'" in markers and "sys_platform == 'darwin'" in markers
    assert SpecifierSet(lock()["requires-python"]).contains("3.11")
    torch_wheels = [
        _filename(w) for p in lock()["package"] if p["name"] == "torch" for w in p["wheels"]
    ]
    assert any("cp311-cp311-manylinux" in w and "x86_64" in w for w in torch_wheels)


# --- the tests run with the lock -----------------------------------------------------------


def test_the_environment_is_the_lock() -> None:
    """Every distribution installed here is in the lock, at a locked version: the suite runs
    with the locked stack and nothing else (make installs it with `uv sync --frozen`)."""
    versions = locked_versions()
    # Only the environment's own site-packages: Ray puts its vendored copies (colorama, ...) on
    # sys.path once its autoscaler is imported, and those are Ray's, not installs.
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    installed = [
        d for d in importlib.metadata.distributions() if Path(d.locate_file("")).resolve() in site
    ]
    assert len(installed) > 100
    for dist in installed:
        name = canonicalize_name(dist.metadata["Name"])
        assert name in versions, f"{name} {dist.version} is installed but not in uv.lock"
        public = Version(dist.version).public  # torch reports 2.15.0+cu132 for PyPI's 2.15.0
        assert public in versions[name], (
            f"{name}: installed {dist.version}, locked {', '.join(sorted(versions[name]))};"
            " run `make test` (it re-syncs from uv.lock)"
        )


# --- every install uses the lock -----------------------------------------------------------


def test_the_bootstrap_installs_the_locked_uv_with_its_hashes() -> None:
    line = subprocess.run(
        [sys.executable, str(BOOTSTRAP), "uv"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (uv,) = [p for p in lock()["package"] if p["name"] == "uv"]
    assert line.startswith(f"uv=={uv['version']} --hash=sha256:")
    assert line.count("--hash=") == len(uv["wheels"]) + ("sdist" in uv)
    missing = subprocess.run(
        [sys.executable, str(BOOTSTRAP), "no-such-package"], capture_output=True, text=True
    )
    assert missing.returncode != 0
    assert (
        missing.stderr.strip() == "no-such-package: the lock holds 0 versions of it; expected one"
    )


def test_make_installs_only_from_the_lock() -> None:
    text = _commands(MAKEFILE.read_text())
    stamp = re.search(r"^\$\(STAMP\): (.*)$", text, re.MULTILINE)
    assert stamp and "uv.lock" in stamp[1].split()  # a changed lock re-syncs the venv
    assert "infra/locked_requirement.py uv" in text and "--require-hashes" in text
    # --compile-bytecode: each Ray worker process would otherwise compile what it imports.
    assert re.search(
        r"\$\(UV\) sync --frozen --compile-bytecode --no-install-project --extra dev "
        r"--group install",
        text,
    )
    assert re.search(r"\$\(UV\) pip install --no-deps --no-build-isolation -e \.", text)
    assert not re.search(r"pip install (?!--require-hashes|--no-deps)", text), "an unlocked install"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_image_installs_the_same_lock() -> None:
    text = _commands(DOCKERFILE.read_text())
    assert "COPY --chown=ray:ray pyproject.toml uv.lock ./" in text
    assert "COPY --chown=ray:ray infra/locked_requirement.py ./infra/" in text
    assert "python infra/locked_requirement.py uv > uv-requirement.txt" in text
    assert "--require-hashes -r uv-requirement.txt" in text
    sync = re.search(r"uv sync --frozen [^\n]*--extra cloud --group install", text)
    project = re.search(r"pip install [^\n]*--no-deps[^\n]* \.(?: |$)", text, re.MULTILINE)
    assert sync and project and project.start() > sync.start()
    assert "pip check" in text
    assert not re.search(r"pip install (?!--no-cache-dir --no-deps)", text), "an unlocked install"
    assert not (ROOT / "infra" / "docker" / "requirements.txt").exists()


def test_the_image_gets_every_runtime_dependency_from_the_lock() -> None:
    """cmray goes into the image with --no-deps: its dependencies and the cloud extra must all
    be locked (the manifest test above ties the lock to exactly these)."""
    project = pyproject()["project"]
    names = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    names |= {
        canonicalize_name(Requirement(d).name) for d in project["optional-dependencies"]["cloud"]
    }
    assert names <= set(locked_versions())
    assert {"gcsfs", "boto3", "google-api-python-client", "psycopg2-binary"} <= names


@pytest.mark.parametrize("name", ["torch", "ray", "mlflow"])
def test_the_stack_is_locked_once(name: str) -> None:
    assert len(locked_versions()[name]) == 1, f"{name} forks in the lock"
