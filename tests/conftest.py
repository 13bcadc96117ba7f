"""Real services on loopback, started by the tests themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RayHead, free_port, start_ray_head


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1; s3fs reaches it exactly as it reaches AWS.

    The endpoint and credentials go in the standard AWS environment variables, which also
    reach DataLoader processes and the Ray workers a test starts.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test: ``s3://<name>``."""
    import s3fs

    name = f"cmray-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


# Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s;
# each run waits up to one such period to notice that training ended, and the suite launches
# about twenty runs on two cores. Every Ray the tests start (in this process, in pipelines run
# as subprocesses, and `ray start`) inherits these shorter periods; behaviour is unchanged.
for _name, _seconds in [
    ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    ("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5"),
]:
    os.environ.setdefault(_name, _seconds)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Ray with two CPUs for the whole session, its workers given the S3 endpoint as
    AWS workers would be. It runs as `ray start` with every fixed-default port chosen free, so
    the local Rays that pipelines start as subprocesses, and test_ray_job's head, run beside it
    without contending for a port; this process connects as a driver, as on a cluster.
    Disconnected once, after every other fixture (pytest_sessionfinish), and then stopped.
    Yields its GCS address: a pipeline run as a subprocess with RAY_ADDRESS set to it joins
    this Ray, as a job joins a cluster, instead of paying for a Ray of its own."""
    import ray

    from cmray.cluster import announce_local_cluster

    # Token authentication off for this cluster: a driver reads its auth mode once, and this
    # one should not depend on what a test set before it connected (test_ray_job tests tokens).
    log = tmp_path_factory.mktemp("ray") / "head.log"
    head = start_ray_head(log, 2, {**os.environ, "RAY_AUTH_MODE": "disabled"})
    _HEADS.append(head)
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    ray.init(address=head.gcs, runtime_env={"env_vars": env})
    announce_local_cluster()
    yield head.gcs


_HEADS: list[RayHead] = []


@pytest.fixture(autouse=True)
def _session_ray_is_current(request: pytest.FixtureRequest) -> None:
    """Before each test on the session's Ray, that Ray is recorded again as the machine's
    current cluster: a pipeline run as a subprocess overwrites the record with its own cluster,
    dead once it exits, and Ray Train's State API calls would time out on it. Tests on another
    cluster (a `ray start` head) keep that cluster's record, or its runs would ask ours."""
    if "ray_cluster" in request.fixturenames:
        from cmray.cluster import announce_local_cluster

        announce_local_cluster()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Ray goes last and once: the driver disconnects after every fixture is finalized, then
    the session's head stops, so no Ray thread outlives the fixtures or the interpreter."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    while _HEADS:
        _HEADS.pop().stop()


@pytest.fixture(scope="session")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled digits as 16x16 shards, the training tests' small real image set."""
    from cmray.data.config import PrepareConfig
    from cmray.data.prepare import prepare

    out = tmp_path_factory.mktemp("d16")
    prepare(
        PrepareConfig(source="digits", out=str(out), resolution=16, shard_count=300, workers=-1),
        log=lambda _: None,
    )
    return str(out)


@pytest.fixture(scope="session")
def digits_model(digits16: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CT model trained two steps on ``digits16``: a run directory, as users pass one."""
    from test_train import tiny_config

    from cmray.train.loop import run_local

    out = tmp_path_factory.mktemp("digits-model")
    run_local(tiny_config(digits16, steps=2, checkpoint_every=2), out, log=lambda _: None)
    return str(out / "checkpoints")  # the newest checkpoint is used


@dataclasses.dataclass
class MlflowServer:
    uri: str
    proc: Any

    def kill(self) -> None:
        """SIGKILL the server and its workers (its own process group), as a crash would."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifacts: str, endpoint: str) -> Iterator[MlflowServer]:
    """A real ``mlflow server``: SQLite backend, artifacts in S3 (moto) written by clients
    through MLFLOW_S3_ENDPOINT_URL, as with an S3-compatible store in production."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--default-artifact-root", artifacts, "--no-serve-artifacts", "--workers", "1"]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy in 120 s")
        yield MlflowServer(uri, proc)
    finally:
        MlflowServer(uri, proc).kill()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's tracking server, with MLFLOW_S3_ENDPOINT_URL set for the test's clients;
    tests keep apart by experiment and registered-model names."""
    import s3fs

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    root = tmp_path_factory.mktemp("mlflow")
    try:
        with running_mlflow_server(root, f"s3://{bucket}/artifacts", s3_endpoint) as server:
            yield server.uri
    finally:
        os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
