"""Print one package of uv.lock as a hash-pinned pip requirement: `NAME==VERSION --hash=...`.

The installer itself must come from the lock too, before there is any installer that reads
it: `make` and the image bootstrap uv with

    pip install --require-hashes -r <(python3 infra/locked_requirement.py uv)

so pip fetches exactly the uv release the lock names and checks it against the lock's hashes.
It first checks the whole lock: a version edited by hand, without re-locking, still points at
the old release's files, and stops every install here with one line naming the package.
Standard library only (Python 3.11's tomllib): it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "uv.lock"


def version_mismatches(lock: dict) -> list[str]:
    """One line per package whose `version` is not the version in its files' names."""
    problems = []
    for package in lock["package"]:
        artifacts = [*package.get("wheels", []), *filter(None, [package.get("sdist")])]
        found = {_file_version(a["url"]) for a in artifacts if "url" in a}
        wrong = sorted(v for v in found if _norm(v) != _norm(package["version"]))
        if wrong:
            problems.append(
                f"uv.lock: {package['name']} is locked at {package['version']} but its files"
                f" are {', '.join(wrong)}; edited without re-locking? run `make lock`"
            )
    return problems


def _file_version(url: str) -> str:
    """The version in a wheel's or an sdist's file name (PEP 427, PEP 625)."""
    name = url.rsplit("/", 1)[-1]
    if name.endswith(".whl"):
        return name.split("-")[1]
    for ext in (".tar.gz", ".zip"):
        name = name.removesuffix(ext)
    return name.rsplit("-", 1)[1]


def _norm(version: str) -> str:
    """Enough of PEP 440's normal form to compare a lock's version with a file name's."""
    version = version.lower().removeprefix("v")
    while version.endswith(".0") and version.count(".") > 1:
        version = version.removesuffix(".0")
    return version


def locked_requirement(lock: dict, name: str) -> str:
    """The pip requirement line for `name` as the lock pins it (every artifact's hash)."""
    matches = [p for p in lock["package"] if p["name"] == name]
    if len(matches) != 1:
        raise SystemExit(f"{name}: the lock holds {len(matches)} versions of it; expected one")
    package = matches[0]
    artifacts = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
    hashes = " ".join(f"--hash={a['hash']}" for a in artifacts)
    return f"{name}=={package['version']} {hashes}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a package name as uv.lock spells it, e.g. uv")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file (default: uv.lock)")
    args = parser.parse_args(argv)
    try:
        lock = tomllib.loads(args.lock.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SystemExit(f"cannot read the lock {args.lock}: {error}") from None
    if problems := version_mismatches(lock):
        raise SystemExit("\n".join(problems))
    sys.stdout.write(locked_requirement(lock, args.name) + "\n")


if __name__ == "__main__":
    main()
