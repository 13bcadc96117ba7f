"""Small test utilities shared by several test files."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO


class DropAfter(io.RawIOBase):
    """A real stream whose connection "resets" after ``limit`` bytes, like a dropped S3 read."""

    def __init__(self, fh: IO[bytes], limit: int) -> None:
        super().__init__()
        self.fh, self.left = fh, limit

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = self.fh.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data


def set_args(values: dict[str, object]) -> list[str]:
    """``--set key=value`` arguments for a pipeline, one pair per item."""
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class RayHead:
    """A ``ray start --head --block`` process on loopback and its addresses."""

    proc: subprocess.Popen
    gcs: str  # 127.0.0.1:PORT, for ray.init(address=...)
    dashboard: str  # http://127.0.0.1:PORT, for the job and State APIs

    def stop(self) -> None:
        """SIGTERM to `ray start` alone: it drains the node through its GCS (2 s at most, above)
        and then stops what it started. Signalled as a group, the GCS went first and the drain
        waited its full time for it. Whatever of the group is left then goes at once."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def start_ray_head(log: Path, num_cpus: int, env: dict[str, str]) -> RayHead:
    """Start a head with ``num_cpus`` CPUs and wait until its job server answers.

    Every port that has a fixed default is chosen free here, so this head, a second one and
    a local ``ray.init`` in a pipeline never contend for one (the dashboard agent's 52365
    and the client server's 10001 would)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    # On SIGTERM the head drains before it stops, waiting (30 s by default) for what still
    # runs there: detached actors of finished runs keep it busy for all of it.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    command = [f"{bin_dir}/ray", "start", "--head", "--block", "--num-cpus", str(num_cpus)]
    command += ["--port", str(port), "--dashboard-host", "127.0.0.1"]
    command += ["--dashboard-port", str(dashboard)]
    for flag in ("dashboard-agent-listen-port", "ray-client-server-port", "metrics-export-port"):
        command += [f"--{flag}", str(free_port())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}")
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2).read()
            return head
        except urllib.error.HTTPError:  # it answers (asking for Ray's auth token): up
            return head
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                head.stop()
                tail = log.read_text()[-3000:]
                raise RuntimeError(f"ray start did not come up:\n{tail}") from None
            time.sleep(1)
