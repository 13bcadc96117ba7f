"""Small test utilities shared by several test files."""

from __future__ import annotations

import io
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
