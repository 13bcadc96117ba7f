"""A search in MLflow: after the trials, the best one's model gets an alias, and runs of trials
that early stopping cut short are marked as killed rather than left RUNNING forever."""

from __future__ import annotations

from typing import Any

from cmray.tracking.config import TrackingConfig
from cmray.tracking.tracker import find_run, resolve_tracking_uri

CHAMPION = "champion"


def _client(cfg: TrackingConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(resolve_tracking_uri(cfg.tracking_uri))


def run_id_of(cfg: TrackingConfig, run_key: str) -> str | None:
    """The MLflow run a cmray run (keyed by its storage path and name) logs to, if any."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    return find_run(client, experiment.experiment_id, run_key)


def crown(cfg: TrackingConfig, run_key: str, alias: str = CHAMPION) -> str | None:
    """Point ``alias`` of ``cfg.registry_name`` at the newest version the run registered;
    returns that version, or None when the run registered none."""
    run_id = run_id_of(cfg, run_key)
    if run_id is None or not cfg.registry_name:
        return None
    client = _client(cfg)
    found = client.search_model_versions(f"name = '{cfg.registry_name}' and run_id = '{run_id}'")
    if not found:
        return None
    version = str(max(int(v.version) for v in found))
    client.set_registered_model_alias(cfg.registry_name, alias, version)
    return version


def end_unfinished_children(cfg: TrackingConfig, parent_run_id: str) -> int:
    """Mark the parent's child runs still RUNNING (trials stopped early, whose processes were
    ended without a goodbye) as KILLED; returns how many."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return 0
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([experiment.experiment_id], query)
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(runs)
