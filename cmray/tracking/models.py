"""The consistency model as an MLflow model: logged, registered, aliased, fetched.

The MLflow model is a pyfunc whose one artifact is cmray's model file (the EMA weights and the
resolved training config, read back with ``weights_only=True``), so fetching a model never
unpickles weights. ``predict`` maps unit noise z [B, C, H, W] to one-step samples in [-1, 1].
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

MODEL_ARTIFACT = "model"  # the name= of the logged model and the key of its artifact


class ConsistencyPyfunc(mlflow.pyfunc.PythonModel):
    """One-step generation, x = f(T z, T), for MLflow serving and ``mlflow.pyfunc.load_model``."""

    def load_context(self, context: Any) -> None:
        from cmray.models import load_model

        self.model, self.cfg = load_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        import torch

        from cmray.core.sampling import class_labels, in_batches, sample_onestep
        from cmray.models import MODEL_BATCH

        z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        sigma_max = self.cfg.noise.sigma_max
        # A class-conditional model samples uniformly drawn classes, the same for the same z.
        draw = torch.Generator().manual_seed(0)
        labels = class_labels(self.cfg.net.num_classes, z.shape[0], None, draw)
        f = in_batches(self.model, MODEL_BATCH, labels)
        return sample_onestep(f, z, sigma_max, clip=(-1.0, 1.0)).x.numpy()


def log_consistency_model(
    run_id: str, model_file: str | os.PathLike[str], shape: tuple[int, ...], registry_name: str
) -> str | None:
    """Log ``model_file`` as the run's MLflow model (with an input example and a signature) and
    register it under ``registry_name`` when given; returns the registered version."""
    from mlflow.models import infer_signature

    z = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    pyfunc = ConsistencyPyfunc()
    pyfunc.load_context(_Context({MODEL_ARTIFACT: str(model_file)}))
    signature = infer_signature(z, pyfunc.predict(None, z))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=pyfunc,
            artifacts={MODEL_ARTIFACT: str(model_file)},
            input_example=z,
            signature=signature,
            registered_model_name=registry_name or None,
        )
    version = getattr(info, "registered_model_version", None)
    return None if version is None else str(version)


class _Context:
    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def set_alias(name: str, alias: str, version: str, tracking_uri: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)


def fetch_model(uri: str, dst: str | os.PathLike[str] | None = None) -> Path:
    """Download an MLflow model (``models:/NAME@ALIAS``, ``models:/NAME/3``, ``runs:/ID/model``)
    and return the path of its cmray model file. The tracking store is the one set in this
    process or $MLFLOW_TRACKING_URI, else cmray's local default (not MLflow's ./mlflow.db); a
    failed download leaves no ``dst`` that it created behind."""
    from cmray.tracking.tracker import resolve_tracking_uri

    store = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else resolve_tracking_uri("")
    db = store.removeprefix("sqlite:///")
    if store.startswith("sqlite:///") and not Path(db).is_file():  # a lookup makes no store
        raise FileNotFoundError(
            f"no MLflow tracking store at {db}; set MLFLOW_TRACKING_URI to the one that holds it"
        )
    made = dst is not None and not Path(dst).exists()
    try:
        root = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=store)
        )
    except BaseException:
        if made:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    found = sorted(root.rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{uri} holds no cmray model file (downloaded to {root})")
    return found[0]
