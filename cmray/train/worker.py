"""The loop on Ray Train: DDP workers, shards split by rank, reports and checkpoints in storage.

Re-running with the same ``run.name`` and ``run.storage_path`` continues from the newest
checkpoint (Ray Train restores its checkpoint list from storage); a worker that dies is
restarted by Ray, up to ``run.max_failures`` times, and continues from the same place.
"""

from __future__ import annotations

import copy
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from cmray.config import from_dict, to_dict
from cmray.data.stream import ShardStream
from cmray.eval.images import grid_array, save_grid
from cmray.storage import url_to_fs
from cmray.tracking import resolve_tracking_uri
from cmray.tracking.config import is_mlflow_uri
from cmray.train import state as ckpt
from cmray.train.config import TrainConfig
from cmray.train.loop import Hooks, Trainer, build_trainer, checkpoint_state, run_loop
from cmray.train.tracking import finish_tracking, start_tracking

SAMPLE_FILE = "samples.png"
# Chaos testing: the worker of rank 0 kills its own process once, after this step, so a cluster's
# (or a test's) recovery path can be exercised on demand. The file records that it happened.
FAULT_STEP_ENV, FAULT_ONCE_ENV = "CMRAY_KILL_AT_STEP", "CMRAY_KILL_ONCE_FILE"


def _resume(trainer: Trainer) -> None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = ckpt.load_checkpoint(trainer.state, directory, trainer.rank)
        print(f"rank {trainer.rank}: resumed at step {step}", flush=True)


def _report(trainer: Trainer, metrics: dict[str, float], save: bool, grid: list) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(trainer.state, tmp, trainer.rank, trainer.world_size)
        if trainer.rank == 0 and grid:
            save_grid(grid.pop(), Path(tmp) / SAMPLE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def progress_line(metrics: dict[str, float], steps: int, saved: bool) -> str:
    """One short line per report for people watching the job's log."""
    keys = ("loss", "N", "mu", "images_per_s", "skipped_steps", "data_decode_errors")
    shown = " ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
    return f"[cmray] step {int(metrics['step'])}/{steps} {shown}" + (
        " (checkpoint)" if saved else ""
    )


def _maybe_kill_self(trainer: Trainer) -> None:
    step, once = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_ONCE_ENV)
    if trainer.rank != 0 or step is None or once is None or trainer.state.step != int(step):
        return
    if not os.path.exists(once):
        Path(once).write_text(f"killed at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trainer = build_trainer(cfg, device, rank, world, wrap=ray.train.torch.prepare_model)
    _resume(trainer)
    stream = ShardStream(cfg.data, rank, world, device=device)
    grid: list[torch.Tensor] = []
    key = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    tracker = start_tracking(cfg, run_key=key) if rank == 0 else None

    def sample(step: int, images: torch.Tensor) -> None:
        grid[:] = [images.cpu()]
        if tracker is not None:
            tracker.log_image(grid_array(images), "samples", step)

    def report(metrics: dict[str, float], save: bool) -> None:
        if rank == 0:
            print(progress_line(metrics, cfg.loop.steps, save), flush=True)
        if tracker is not None:
            tracker.log_metrics(metrics, trainer.state.step)
        _report(trainer, metrics, save, grid)
        _maybe_kill_self(trainer)

    run_loop(trainer, stream, Hooks(report, sample if rank == 0 else None))
    finish_tracking(tracker, trainer)


def _storage(path: str) -> tuple[str, Any]:
    """Ray's storage_path and filesystem: local paths made absolute, S3 endpoints honoured."""
    if "://" not in path:
        return str(Path(path).resolve()), None
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if path.startswith("s3://") and endpoint:
        import pyarrow.fs

        scheme, _, host = endpoint.partition("://")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme, region=region)
        return path.removeprefix("s3://"), fs
    return path, None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy whose local paths are absolute: Ray workers do not share the driver's cwd."""
    cfg = copy.deepcopy(cfg)

    def fix(path: str) -> str:
        return path if not path or "://" in path else str(Path(path).resolve())

    cfg.data.manifest = fix(cfg.data.manifest)
    cfg.objective.cd.teacher = fix(cfg.objective.cd.teacher)
    cfg.objective.lpips_weights = fix(cfg.objective.lpips_weights)
    cfg.run.storage_path = fix(cfg.run.storage_path)
    if cfg.tracking.enabled:  # the driver's MLFLOW_TRACKING_URI or local store, for every worker
        cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    return cfg


def preflight(cfg: TrainConfig) -> None:
    """Checks that need the data or the teacher, run on the driver before any worker starts."""
    from cmray.config import ConfigError
    from cmray.data.manifest import read_manifest

    try:
        manifest = read_manifest(cfg.data.manifest)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.manifest: {exc}", key="data.manifest") from None
    if manifest.resolution != cfg.net.resolution:
        raise ConfigError(
            f"net.resolution = {cfg.net.resolution} but the data is "
            f"{manifest.resolution}x{manifest.resolution}",
            key="net.resolution",
        )
    teacher = cfg.objective.cd.teacher
    if cfg.objective.kind == "cd" and not is_mlflow_uri(teacher):  # MLflow: fetched by workers
        try:
            if teacher.endswith(".pt"):
                fs, path = url_to_fs(teacher)
                if not fs.isfile(path):
                    raise FileNotFoundError(f"no model file at {teacher}")
            else:
                checkpoint_state(teacher)
        except FileNotFoundError as exc:
            raise ConfigError(f"objective.cd.teacher: {exc}", key="objective.cd.teacher") from None


def launch(cfg: TrainConfig) -> Any:
    """Run ``train_worker`` on ``cfg.run.num_workers`` workers; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    preflight(cfg)
    run = cfg.run
    storage_path, storage_fs = _storage(run.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={
                "CPU": run.cpus_per_worker,
                **({"GPU": 1} if run.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=run.max_failures),
        ),
    )
    return trainer.fit()
