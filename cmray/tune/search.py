"""The search driver: Ray Tune over trials of image CD/CT or the 2D toy, with ASHA, MLflow and
a results table.

Run again with the same ``run.name`` and ``run.storage_path`` after the driver died, and
``Tuner.restore`` continues the search: finished trials stay finished, interrupted ones resume
their Train runs from their checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmray.config import ConfigError, dump_yaml, flatten
from cmray.storage import absolute, join_url, url_to_fs, write_bytes_atomic
from cmray.tracking.config import TrackingConfig
from cmray.tune.config import SearchPlan

Log = Callable[[str], None]


def localize(plan: SearchPlan) -> SearchPlan:
    """Paths absolute and the tracking URI resolved: trials run in other processes and nodes."""
    from cmray.tracking import resolve_tracking_uri

    run = dataclasses.replace(plan.cfg.run, storage_path=absolute(plan.cfg.run.storage_path))
    tracking = plan.cfg.tracking
    if tracking.enabled:
        uri = resolve_tracking_uri(tracking.tracking_uri)
        tracking = dataclasses.replace(tracking, tracking_uri=uri)
    base = plan.base
    if plan.cfg.experiment == "train":
        from cmray.config import to_dict
        from cmray.train.worker import prepare

        base = to_dict(prepare(plan.trial_config({})))  # checked data, reference statistics
    cfg = dataclasses.replace(plan.cfg, run=run, tracking=tracking)
    return dataclasses.replace(plan, cfg=cfg, base=base)


def max_concurrent(plan: SearchPlan, resources: dict[str, float]) -> int:
    """``run.max_concurrent_trials``, or as many trials as the cluster's CPUs and GPUs hold
    (``resources``: its capacity, counting the nodes an autoscaler may still start)."""
    if plan.cfg.run.max_concurrent_trials:
        return plan.cfg.run.max_concurrent_trials
    fits = [resources.get("CPU", 0.0) / plan.trial_cpus]
    if plan.trial_gpus:
        fits.append(resources.get("GPU", 0.0) / plan.trial_gpus)
    count = math.floor(min(fits) + 1e-9)
    if count < 1:
        raise ConfigError(
            f"a trial needs {plan.trial_cpus:g} CPUs and {plan.trial_gpus:g} GPUs but the "
            f"cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; "
            "use fewer or smaller workers per trial, or set run.max_concurrent_trials (an "
            "autoscaling cluster may not have started its GPU nodes yet)",
            key="run.max_concurrent_trials",
        )
    return count


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """What a search found: one row per trial (best first) and the winner."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: str
    champion: str | None = None


def _status(result: Any, plan: SearchPlan) -> str:
    if result.error is not None:
        return "error"
    step = (result.metrics or {}).get("step", 0)
    return "finished" if step >= plan.max_t else "stopped early"


def result_rows(grid: Any, plan: SearchPlan) -> list[dict[str, Any]]:
    """One row per trial: ID, status, its params, the last quality figure and step."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
                "status": _status(result, plan),
                **{key: value for key, value in (result.config or {}).get("params", {}).items()},
                plan.metric: metrics.get(plan.metric, math.nan),
                "step": metrics.get("step", 0),
                "train_s": metrics.get("time_total_s", math.nan),
            }
        )
    return sorted(rows, key=lambda r: (math.isnan(r[plan.metric]), r[plan.metric]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table for the console."""
    if not rows:
        return "(no trials)"
    keys = list(rows[0])

    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[show(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _outcome(plan: SearchPlan, rows: list[dict[str, Any]]) -> Outcome:
    scored = [r for r in rows if not math.isnan(r[plan.metric])]
    best = scored[0] if scored else None
    params = {k: best[k] for k in (p.key for p in plan.cfg.space)} if best else {}
    best_config = dump_yaml(plan.trial_config(params)) if best else ""
    return Outcome(rows, best, best_config)


def write_outcome(plan: SearchPlan, outcome: Outcome) -> str:
    """results.csv, best.json and best_config.yaml (run it with the base's pipeline) in the
    search's directory; returns the directory."""
    out = plan.root
    write_bytes_atomic(join_url(out, "results.csv"), _csv(outcome.rows).encode())
    best = {"metric": plan.metric, "best": outcome.best, "champion": outcome.champion}
    write_bytes_atomic(join_url(out, "best.json"), (json.dumps(best, indent=2) + "\n").encode())
    if outcome.best_config:
        write_bytes_atomic(join_url(out, "best_config.yaml"), outcome.best_config.encode())
    return out


# --------------------------------------------------------------------------- the driver


def _toy_teacher(plan: SearchPlan, log: Log) -> None:
    """A toy search's one teacher (for CD, ECT, sCT, sCD trials), trained here once (kept for
    a restored search)."""
    from cmray.train.toy import train_run_teacher

    path = plan.teacher_path
    fs, local = url_to_fs(path)
    if fs.exists(local):
        return
    teacher, _, _ = train_run_teacher(plan.trial_config({}), log)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    write_bytes_atomic(path, buffer.getvalue())
    log(f"teacher for every CD trial: {path}")


def _parent(plan: SearchPlan) -> Any:
    """The search's MLflow run, resumed by the search's path; trials' runs are its children."""
    from cmray.tracking import Tracker

    cfg = plan.cfg
    return Tracker(cfg.tracking, cfg.run.name, plan.root, flatten(cfg))


def _finish_tracking(plan: SearchPlan, tracker: Any, outcome: Outcome, log: Log) -> None:
    from cmray.tracking.search import crown, end_unfinished_children

    tracking: TrackingConfig = plan.cfg.tracking
    if plan.parent_run:
        ended = end_unfinished_children(tracking, plan.parent_run)
        if ended:
            log(f"marked {ended} MLflow runs of trials stopped early as KILLED")
    if outcome.best is not None:
        tracker.log_metrics({f"best_{plan.metric}": outcome.best[plan.metric]}, 0)
        tracker.log_text(outcome.best_config, "best_config.yaml")
        if plan.cfg.experiment == "train" and tracking.registry_name:
            outcome.champion = crown(tracking, plan.trial_run_key(outcome.best["trial"]))
            log(f"{tracking.registry_name} version {outcome.champion} is now @champion")
    tracker.log_text(_csv(outcome.rows), "results.csv")
    tracker.close()


def run_search(plan: SearchPlan, log: Log = print) -> Outcome:
    """Prepare, search (or resume the search), then record and write the outcome of a plan
    from :func:`plan_search` (made before Ray starts, so config mistakes cost nothing)."""
    from cmray.cluster import capacity, ray_init

    # A trial that ASHA stops is blocked inside TorchTrainer.fit() and cannot end itself;
    # Tune kills its process (and with it the Train run's workers) only after this many
    # seconds (600 by default), holding the trial's CPUs and GPUs idle meanwhile.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "10")
    cfg = plan.cfg
    resources = capacity(ray_init())
    plan = localize(plan)
    concurrency = max_concurrent(plan, resources)
    if cfg.experiment == "toy2d" and cfg.toy_methods() != {"ct"}:
        _toy_teacher(plan, log)
    tracker = _parent(plan) if plan.cfg.tracking.enabled else None
    if tracker is not None:
        # Trials name their parent when they start, so wait for it: a busy server or a first
        # store migration can take tens of seconds. Without it the search still runs.
        plan.parent_run = tracker.started(timeout=180.0) or ""
        if not plan.parent_run:
            log("warning: the search's MLflow run did not start in 180 s; trials log unparented")
    from cmray.tune.trainable import make_tuner  # Ray Tune, only once the plan holds

    tuner, restored = make_tuner(plan, concurrency)
    where = plan.root
    verb = "resuming" if restored else "starting"
    log(f"{verb} search {where}: up to {concurrency} trials at once")
    grid = tuner.fit()
    outcome = _outcome(plan, result_rows(grid, plan))
    if tracker is not None:
        _finish_tracking(plan, tracker, outcome, log)
    write_outcome(plan, outcome)
    return outcome
