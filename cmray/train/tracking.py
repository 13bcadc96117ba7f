"""What a training run records in MLflow, from rank 0: params, metrics, grids, the model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cmray.config import flatten, to_dict
from cmray.tracking import Tracker
from cmray.train.config import TrainConfig
from cmray.train.loop import Trainer, save_model_file


def start_tracking(cfg: TrainConfig, run_key: str) -> Tracker | None:
    """Rank 0's run (resumed when ``run_key`` already has one), with the config recorded."""
    if not cfg.tracking.enabled:
        return None
    tracker = Tracker(cfg.tracking, cfg.run.name, run_key, flatten(cfg))
    tracker.log_dict(to_dict(cfg), "config.yaml")
    return tracker


def finish_tracking(tracker: Tracker | None, trainer: Trainer) -> str | None:
    """Log the final EMA model (registered when a registry name is set) and end the run."""
    if tracker is None:
        return None
    cfg = trainer.cfg
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.tracking.log_model and trainer.state.step >= cfg.loop.steps:
            path = save_model_file(trainer, Path(tmp) / "model.pt")
            shape = (cfg.net.in_channels, cfg.net.resolution, cfg.net.resolution)
            registry = cfg.tracking.registry_name

            def log_model(_client: object, run_id: str) -> None:
                from cmray.tracking.models import log_consistency_model

                log_consistency_model(run_id, path, shape, registry)

            tracker.submit(log_model, essential=True)
        return tracker.close()  # waits for the queue, so the temporary file is still there
