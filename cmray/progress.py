"""Progress of long work: a tqdm bar on a terminal, a plain line every half minute in logs.

Ray job logs and CI are not terminals; tqdm's carriage-return redraws would arrive there as one
endless line (or, with tqdm's default, not at all), so they get newline-terminated updates.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class Progress:
    """``with Progress(total, "reference images") as p: p.update(n)``."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "img",
        every_s: float = 30.0,
        file: TextIO = sys.stderr,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s, self.file = total, desc, unit, every_s, file
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=file) if file.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every_s or self.done >= self.total:
            self.last = time.perf_counter()
            self._line()

    def _line(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        print(
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
            f"{elapsed:.0f}s)",
            file=self.file,
            flush=True,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.close()
