"""Progress lines where no terminal is attached (Ray job logs, CI)."""

from __future__ import annotations

import io

from cmray.progress import Progress


def test_logs_get_newline_terminated_lines_up_to_the_total() -> None:
    out = io.StringIO()
    with Progress(10, "reference images", every_s=0.0, file=out) as progress:
        for _ in range(5):
            progress.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[-1].startswith("reference images: 10/10 img (")


def test_lines_are_rate_limited() -> None:
    out = io.StringIO()
    with Progress(100, "shards", every_s=3600.0, file=out) as progress:
        for _ in range(99):
            progress.update(1)
        assert out.getvalue() == ""  # nothing before the interval, unless finished
        progress.update(1)
    assert out.getvalue().count("\n") == 1
