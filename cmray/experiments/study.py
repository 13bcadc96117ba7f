"""What both suites of the reproduction study share: the teacher's convergence rule, the
study's small files, phase timings, and the rows' names on disk."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmray.experiments.reproduce_config import ReproduceConfig
from cmray.storage import write_bytes_atomic
from cmray.tune.config import (
    VARIANT_KEY,
    SchedulerConfig,
    SearchParam,
    SearchRunConfig,
    TuneConfig,
    VariantConfig,
)

Log = Callable[[str], None]
STUDENTS_RUN = "students"  # the rows' search, under the study's directory


def rows_search(
    cfg: ReproduceConfig,
    experiment: str,
    base: str,
    overrides: list[str],
    rows: list[VariantConfig],
    out: Path,
) -> TuneConfig:
    """The rows as one grid search over named variants, each drawn once, none stopped early:
    every row runs to the same budget."""
    return TuneConfig(
        experiment=experiment,  # type: ignore[arg-type]
        base=base,
        overrides=overrides,
        space=[SearchParam(VARIANT_KEY, "grid", [r.name for r in rows])],
        variants=rows,
        num_samples=1,
        seed=cfg.eval.seed,
        scheduler=SchedulerConfig(enabled=False),
        run=SearchRunConfig(
            name=STUDENTS_RUN,
            storage_path=str(out),
            max_concurrent_trials=cfg.students.concurrent,
            max_failures=cfg.students.max_failures,
        ),
        tracking=cfg.tracking,
    )


def converged(curve: list[dict[str, float]], tolerance: float, metric: str) -> bool | None:
    """Whether the figure improved by less than ``tolerance`` over the last quarter of the
    training so far; None when no measurement sits at three quarters of the last one."""
    if not curve:
        return None
    end = curve[-1]
    quarter = [c for c in curve if c["step"] * 4 == end["step"] * 3]
    if not quarter:
        return None
    before = quarter[0][metric]
    return (before - end[metric]) / before < tolerance


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(str(path), (json.dumps(data, indent=2) + "\n").encode())


def slug(name: str) -> str:
    """A row's name as a directory name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "row"


def timer(
    timings: dict[str, float], path: Path, log: Log
) -> Callable[[str, Callable[[], Any]], Any]:
    """``timed(phase, fn)``: run fn and add its seconds to ``phase`` in ``timings`` and in the
    file at ``path``, so a resumed study reports the time spent over all its runs."""
    timings.update(read_json(path) or {})

    def timed(phase: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        timings[phase] = round(timings.get(phase, 0.0) + seconds, 1)
        write_json(path, timings)
        log(f"{phase}: {seconds:.0f} s")
        return result

    return timed


def in_order(names: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's rows in the config's order (the search sorts them by figure)."""
    return sorted(rows, key=lambda r: names.index(r[VARIANT_KEY]))


def error_line(search_root: Path, trial: str) -> str:
    """The first named error line of a failed row, from Tune's record of its trial."""
    found = sorted(search_root.glob(f"*{trial}*/error.txt"))
    if not found:
        return "the trial failed"
    lines = [line for line in found[0].read_text().splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line]
    return (named[-1] if named else lines[-1]).strip()[:300]


def method_name(kind: str, mode: str = "", curriculum: str = "") -> str:
    """A row's method as the targets name it: cd, ct (the paper's), ict, ect, sct or scd."""
    if kind == "scm":
        return "s" + mode
    if kind == "ct" and curriculum == "ict":
        return "ict"
    return kind


def family_of(method: str) -> str:
    """cd for the distilled rows (CD, sCD), ct for the CT family (CT, iCT, ECT, sCT)."""
    return "cd" if method in ("cd", "scd") else "ct"
