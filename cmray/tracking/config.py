"""Typed MLflow settings; importing this does not import mlflow."""

from __future__ import annotations

from dataclasses import dataclass

from cmray.config import param

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow/mlflow.db"
DEFAULT_ARTIFACTS = "runs/mlflow/artifacts"
MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str) -> bool:
    """Whether ``source`` names a model in MLflow rather than a checkpoint or file."""
    return source.startswith(MODEL_URI_SCHEMES)


@dataclass
class TrackingConfig:
    """Where runs, metrics, sample grids and models are recorded."""

    enabled: bool = param(True, help="record the run in MLflow (rank 0 only)")
    tracking_uri: str = param(
        "",
        help="MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, else the local store "
        f"{DEFAULT_TRACKING_URI})",
    )
    experiment: str = param("cmray", help="MLflow experiment name")
    registry_name: str = param(
        "", help="register the final EMA model under this name (empty: log it, no registry)"
    )
    log_model: bool = param(True, help="log the final EMA consistency model as an MLflow model")
    system_metrics: bool = param(True, help="record CPU, memory (and GPU) use with the run")
    parent_run: str = param(
        "", help="MLflow run ID this run nests under (a search sets it for each trial)"
    )
