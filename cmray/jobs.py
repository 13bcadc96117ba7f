"""``cmray submit``: a pipeline as a Ray job, with its config checked before anything is sent.

The job runs ``python pipelines/<pipeline>.py --config FILE [--set ...]`` in the uploaded
working directory (the repository root by default; Ray leaves out what ``.gitignore`` lists), so
the config file and the code the job runs are the ones checked here.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cmray.config import ConfigError, load_config
from cmray.data.config import PrepareConfig
from cmray.experiments.reproduce_config import ReproduceConfig
from cmray.train.config import TrainConfig
from cmray.tune.config import TuneConfig, plan_search


@dataclass(frozen=True)
class Pipeline:
    script: str
    config_class: type


PIPELINES = {
    "train": Pipeline("pipelines/train.py", TrainConfig),
    "tune": Pipeline("pipelines/tune.py", TuneConfig),
    "prepare-data": Pipeline("pipelines/prepare_data.py", PrepareConfig),
    "reproduce": Pipeline("pipelines/reproduce.py", ReproduceConfig),
}
# Never uploaded, even from a directory git does not know: outputs, environments, caches.
EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]


def check_config(kind: str, config: str, overrides: Sequence[str], working_dir: str) -> str:
    """Validate the job's config here (as the pipeline will) and return its path relative to
    ``working_dir``, where the job reads it; ConfigError names any problem."""
    path = Path(config).resolve()
    root = Path(working_dir).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"--config {config}: the job reads its config from the uploaded working directory "
            f"{root}; put the file inside it",
            key="config",
        )
    cfg = load_config(PIPELINES[kind].config_class, path, overrides)
    if kind == "tune":  # its base config is named relative to the working directory, as in the job
        plan_search(replace(cfg, base=str(root / cfg.base)))
    if kind == "reproduce":
        _plan_study(cfg, root)
    return path.relative_to(root).as_posix()


def _plan_study(cfg: ReproduceConfig, root: Path) -> None:
    """A study's teacher, rows and ring configs checked as the job will read them."""
    from cmray.experiments.reproduce import plan_study
    from cmray.experiments.reproduce_ring import plan_ring

    teacher = replace(cfg.teacher, config=str(root / cfg.teacher.config))
    students = replace(cfg.students, config=str(root / cfg.students.config))
    ring = replace(cfg.ring, config=str(root / cfg.ring.config))
    located = replace(cfg, teacher=teacher, students=students, ring=ring)
    (plan_ring if cfg.suite == "ring" else plan_study)(located)


def entrypoint(kind: str, config: str, overrides: Sequence[str]) -> str:
    """The shell command the job runs."""
    words = ["python", PIPELINES[kind].script, "--config", config]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; ConfigError for an item without ``=``."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r} needs the form KEY=VALUE")
        env[key] = value
    return env


def submit(
    kind: str,
    address: str,
    config: str,
    overrides: Sequence[str] = (),
    working_dir: str = ".",
    env: dict[str, str] | None = None,
) -> str:
    """Check the config, then submit the pipeline as a Ray job; returns the job's ID."""
    from cmray.cluster import use_cluster_token

    use_cluster_token()  # before anything imports Ray, which reads the auth mode once
    relative = check_config(kind, config, overrides, working_dir)
    from ray.job_submission import JobSubmissionClient

    runtime_env: dict[str, Any] = {"working_dir": working_dir, "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    client = JobSubmissionClient(address)
    return client.submit_job(
        entrypoint=entrypoint(kind, relative, overrides), runtime_env=runtime_env
    )


def follow_hint(address: str, job_id: str) -> str:
    return (
        f"follow its logs:  ray job logs --address {address} --follow {job_id}\n"
        f"its status:       ray job status --address {address} {job_id}\n"
        f"stop it:          ray job stop --address {address} {job_id}"
    )
