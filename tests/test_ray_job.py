"""Pipelines submitted as Ray jobs (``ray job submit --working-dir .``) to a real
``ray start --head`` cluster on loopback, as researchers submit them to a cloud cluster."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import start_ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head node with 2 CPUs and the job server; yields the dashboard address.

    Token authentication on, as on a real cluster: ``ray start`` with RAY_AUTH_MODE=token
    needs a token already there (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
    and clients send the same. A fresh machine has none, so the module makes its own file
    rather than write into the home directory.
    """
    root = tmp_path_factory.mktemp("head")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ["RAY_AUTH_MODE"] = "token"
    default = Path.home() / ".ray" / "auth_token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or saved["RAY_AUTH_TOKEN_PATH"] or default.is_file()):
        (root / "auth_token").write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(root / "auth_token")
    try:
        head = start_ray_head(root / "head.log", 2, dict(os.environ))
        try:
            yield head.dashboard
        finally:
            head.stop()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit`` from the repository root, waiting for the job and its logs."""
    command = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", "."]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [*command, "--", "python", *entrypoint],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_tune_runs_as_a_ray_job(ray_head: str, tmp_path: Path) -> None:
    space = [
        {"key": "ct.optim.lr", "kind": "grid", "values": [1.0e-5, 3.0e-3]},
    ]
    result = submit(
        ray_head,
        "pipelines/tune.py",
        "--config",
        "configs/tune_toy2d.yaml",
        "--set",
        "overrides=[ring.train_points=2048, ct.optim.epochs=20, ct.net.hidden=32]",
        "--set",
        f"space={json.dumps(space)}",
        "--set",
        "num_samples=1",
        "--set",
        "toy.quality_every=40",
        "--set",
        "toy.quality_samples=500",
        "--set",
        "scheduler.enabled=false",
        "--set",
        f"run.storage_path={tmp_path}",
        "--set",
        "tracking.enabled=false",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout
    best = json.loads((tmp_path / "tune-toy2d" / "best.json").read_text())
    assert best["metric"] == "energy_distance"
    assert best["best"]["ct.optim.lr"] == 3.0e-3 and best["best"]["step"] == 80


def _cmray(*args: str) -> subprocess.CompletedProcess:
    """``cmray`` as a user runs it: RAY_AUTH_MODE unset, so ``cmray submit`` must find the
    token that ``ray start`` wrote and send it itself."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return subprocess.run(
        [sys.executable, "-m", "cmray.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


_JOBS = """
import json, sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
out = {"count": len(client.list_jobs())}
if len(sys.argv) > 2:
    status = client.get_job_status(sys.argv[2])
    out.update(status=status.value, done=status.is_terminal())
    out.update(logs=client.get_job_logs(sys.argv[2])[-3000:])
print(json.dumps(out))
"""


def _jobs(address: str, *job_id: str) -> dict:
    """The head's job count, and a job's status and logs, asked from a fresh process: Ray reads
    its auth mode (RAY_AUTH_MODE, set by the fixture) once per process, and an earlier test in
    this one may have read it first."""
    proc = subprocess.run(
        [sys.executable, "-c", _JOBS, address, *job_id], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cmray_submit_checks_the_config_then_runs_the_job(
    ray_head: str, digits16: str, tmp_path: Path
) -> None:
    """A bad config is refused before anything is sent; a good one trains as a job."""
    before = _jobs(ray_head)["count"]
    bad = _cmray(
        "submit", "prepare-data", "--address", ray_head,
        "--config", "configs/prepare_digits16.yaml", "--set", "resolution=0",
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "config error: resolution = 0 is out of range; accepted: 1 <= value <= 8192"
    )
    assert _jobs(ray_head)["count"] == before  # nothing was sent

    runs = tmp_path / "runs"
    good = _cmray(
        "submit", "train", "--address", ray_head,
        "--config", "configs/digits_ct.yaml",  # read from the uploaded working directory
        "--set", f"data.manifest={digits16}/manifest.json", "--set", "loop.steps=4",
        "--set", "loop.checkpoint_every=2", "--set", "run.num_workers=1",
        "--set", f"run.storage_path={runs}", "--set", "tracking.enabled=false",
    )  # fmt: skip
    assert good.returncode == 0, good.stderr[-2000:]
    job_id = good.stdout.split("Ray job ")[1].split()[0]
    assert f"ray job logs --address {ray_head} --follow {job_id}" in good.stdout
    deadline = time.monotonic() + 600
    while not (job := _jobs(ray_head, job_id))["done"]:
        assert time.monotonic() < deadline, "the job did not finish in 600 s"
        time.sleep(2)
    assert job["status"] == "SUCCEEDED", job["logs"]
    assert "finished at step 4" in job["logs"]
    assert sorted(p.name for p in (runs / "digits_ct").glob("checkpoint_*"))  # on the cluster
