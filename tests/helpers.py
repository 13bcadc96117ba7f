"""Small test utilities shared by several test files."""

from __future__ import annotations

import io
import socket
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
