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
from helpers import free_port


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


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """A real local Ray with two CPUs; its workers get the S3 endpoint as AWS workers would."""
    import ray

    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()


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


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A module's tracking server, with MLFLOW_S3_ENDPOINT_URL set for the test's clients."""
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
