"""The loop on Ray Train: DDP workers, shards split by rank, reports and checkpoints in storage.

Re-running with the same ``run.name`` and ``run.storage_path`` continues from the newest
checkpoint (Ray Train restores its checkpoint list from storage); a worker that dies is
restarted by Ray, up to ``run.max_failures`` times, and continues from the same place.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmray.config import ConfigError, from_dict, to_dict
from cmray.data.stream import ShardStream
from cmray.eval.config import FRECHET_NAMES
from cmray.eval.images import grid_array, save_grid
from cmray.models import ModelSourceError, locate_model
from cmray.models.checkpoints import read_checkpoint_file
from cmray.storage import absolute, url_to_fs
from cmray.tracking import resolve_tracking_uri
from cmray.tracking.config import is_mlflow_uri
from cmray.train import state as ckpt
from cmray.train.config import RayConfig, TrainConfig
from cmray.train.loop import (
    Hooks,
    PreemptedError,
    Trainer,
    build_trainer,
    check_resume,
    quality_hook,
    run_loop,
)
from cmray.train.step import global_sum
from cmray.train.tracking import finish_tracking, start_tracking

SAMPLE_FILE = "samples.png"
# Chaos testing: the worker of rank 0 kills its own process once after each of these steps
# (comma-separated), so a cluster's (or a test's) recovery path can be exercised on demand. The
# file records each kill, so a restarted group does not repeat it. Set in the driver's
# environment, they reach the run's workers (and only that run's).
FAULT_STEP_ENV, FAULT_ONCE_ENV = "CMRAY_KILL_AT_STEP", "CMRAY_KILL_ONCE_FILE"
# The signal it sends itself, one for all the steps or one per step: KILL (a crash: back to the
# last periodic checkpoint) or TERM (a shutdown: the step is checkpointed first, as on a
# preemption notice).
FAULT_SIGNAL_ENV = "CMRAY_KILL_SIGNAL"
FAULT_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
# Elastic drills: while this file exists, a group running below run.num_workers' maximum
# waits after each report (up to HOLD_LIMIT_S), so that a run cannot end before the capacity
# a drill has just added lets Ray Train grow it back: the drill waits on the event, not on
# the run's having enough steps left.
HOLD_ENV = "CMRAY_HOLD_SHRUNK_FILE"
HOLD_LIMIT_S = 300.0


def _fault_env() -> dict[str, str]:
    """The chaos and drill variables set in the driver, for the run's workers: a worker's
    environment is the cluster's, fixed when Ray started, so they travel in the run's worker
    runtime env."""
    names = (FAULT_STEP_ENV, FAULT_ONCE_ENV, FAULT_SIGNAL_ENV, HOLD_ENV)
    env = {k: os.environ[k] for k in names if k in os.environ}
    if FAULT_STEP_ENV in env:  # checked here, where a mistake is one line, not a dead worker
        signals = env.get(FAULT_SIGNAL_ENV, "KILL")
        try:
            faults = _faults(env[FAULT_STEP_ENV], signals)
        except ValueError:
            faults = {}
        if not faults or not set(faults.values()) <= FAULT_SIGNALS.keys():
            raise ConfigError(
                f"{FAULT_STEP_ENV}={env[FAULT_STEP_ENV]} with {FAULT_SIGNAL_ENV}={signals}: "
                "accepted: steps like 6 or 6,9, and one signal (KILL or TERM) or one per step"
            )
    return env


def _resume(trainer: Trainer) -> None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = ckpt.load_checkpoint(trainer.state, directory, trainer.rank)
        say(f"rank {trainer.rank}: resumed at step {step}")


def _report(
    trainer: Trainer, metrics: dict[str, float], save: bool, grid: list, wait: ReportWait
) -> None:
    import ray.train

    if not save:
        tick = time.perf_counter()
        ray.train.report(metrics)
        warning = wait.observe(time.perf_counter() - tick)
        if warning and trainer.rank == 0:
            say(warning)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(trainer.state, tmp, trainer.rank, trainer.world_size)
        if trainer.rank == 0 and grid:
            save_grid(grid.pop(), Path(tmp) / SAMPLE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@dataclass
class ReportWait:
    """How long ``ray.train.report`` held the training thread. Ray Train keeps one unread
    report per worker and its controller reads one per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    2 s by default), so reports more frequent than that pace training to the poll. Once that
    costs more than ``share`` of the time over ``reports`` reports, rank 0 says so, once."""

    log_every: int
    share: float = 0.25
    reports: int = 10
    waited: float = 0.0
    seen: int = 0
    start: float = field(default_factory=time.perf_counter)
    told: bool = False

    def observe(self, seconds: float) -> str | None:
        """Adds one report's wait; the warning, the first time it is due."""
        self.waited, self.seen = self.waited + seconds, self.seen + 1
        elapsed = time.perf_counter() - self.start
        if self.told or self.seen < self.reports or self.waited <= self.share * elapsed:
            return None
        self.told = True
        return (
            f"[cmray] {100 * self.waited / elapsed:.0f}% of the time went waiting for Ray "
            f"Train's controller to read reports (one per poll, "
            f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): raise loop.log_every (now {self.log_every})"
        )


def say(line: str) -> None:
    """A line on the worker's console. Ray Train's print() in workers both logs and echoes
    the line, so the job log showed every print twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(metrics: dict[str, float], steps: int, saved: bool) -> str:
    """One short line per report for people watching the job's log."""
    keys = ("loss", "N", "mu", "world_size", "images_per_s", *FRECHET_NAMES.values())
    keys += ("skipped_steps",)
    keys += ("data_decode_errors",)
    shown = " ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
    note = " (checkpoint on the preemption notice)" if metrics.get("preempted") else ""
    return f"[cmray] step {int(metrics['step'])}/{steps} {shown}" + (
        note or (" (checkpoint)" if saved else "")
    )


def _maybe_kill_self(trainer: Trainer) -> None:
    steps, once = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_ONCE_ENV)
    if trainer.rank != 0 or steps is None or once is None:
        return
    faults = _faults(steps, os.environ.get(FAULT_SIGNAL_ENV, "KILL"))
    name, line = faults.get(trainer.state.step), f"killed at step {trainer.state.step}\n"
    if name is None or (os.path.exists(once) and line in Path(once).read_text()):
        return
    with open(once, "a") as fh:
        fh.write(line)
    os.kill(os.getpid(), FAULT_SIGNALS[name])
    if name == "TERM":  # taken on the main thread before the next step, for a fixed drill
        _SIGTERM.wait(10.0)


def _maybe_hold_shrunk(trainer: Trainer, max_workers: int) -> None:
    path = os.environ.get(HOLD_ENV)
    if path is None or trainer.world_size >= max_workers:
        return
    deadline = time.monotonic() + HOLD_LIMIT_S
    # A SIGTERM ends the hold: the loop must reach its next step to checkpoint and stop.
    while os.path.exists(path) and not _SIGTERM.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)


@functools.cache  # read after every report: parsed once a worker
def _faults(steps: str, signals: str) -> dict[int, str]:
    """``{step: signal name}`` from the chaos variables: "6,9" with "TERM,KILL", or one name."""
    at = [int(v) for v in steps.split(",")]
    names = signals.split(",")
    return dict(zip(at, names * len(at) if len(names) == 1 else names, strict=True))


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
    wait = ReportWait(cfg.loop.log_every)
    tracker = start_tracking(cfg, run_key=cfg.run.location) if rank == 0 else None

    def sample(step: int, images: torch.Tensor) -> None:
        grid[:] = [images.cpu()]
        if tracker is not None:
            tracker.log_image(grid_array(images), "samples", step)

    def report(metrics: dict[str, float], save: bool) -> None:
        if rank == 0:
            say(progress_line(metrics, cfg.loop.steps, save))
        if tracker is not None:
            tracker.log_metrics(metrics, trainer.state.step)
        _report(trainer, metrics, save, grid, wait)
        _maybe_kill_self(trainer)
        _maybe_hold_shrunk(trainer, cfg.run.max_workers)

    notice = RayPreemption(device) if cfg.run.preemption_checkpoint else None
    hooks = Hooks(report, sample if rank == 0 else None, quality_hook(trainer), notice)
    try:
        while True:
            try:
                run_loop(trainer, stream, hooks)
                break
            except PreemptedError:  # checkpointed: Ray restarts the group from that step
                notice.hold(rank)
    finally:
        if notice is not None:
            notice.close()
    finish_tracking(tracker, trainer)


# Ray Train's own wait for a preemption without a deadline (DEFAULT_PREEMPTION_DEADLINE_S).
PREEMPTION_DEADLINE_S = 120.0
# Past the deadline, a group still alive was not torn down: the drain was withdrawn.
HOLD_MARGIN_S = 30.0
# After a SIGTERM's checkpoint, the signalled rank waits this long past the moment the
# controller took its report before it exits, so the checkpoint is registered first.
REPORT_GRACE_S = 2.0

# Set by this process's SIGTERM handler (on the main thread); read by the training thread.
_SIGTERM = threading.Event()
_RAY_SIGTERM: list[Any] = []  # Ray's own handler, restored once the step is checkpointed


def _flag_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM flags the step for a checkpoint; a second one, with the first not yet acted on
    (a loop stuck in a collective), goes to Ray's handler, which ends the worker."""
    if _SIGTERM.is_set() and callable(_RAY_SIGTERM[0]):
        _RAY_SIGTERM[0](signum, frame)
    _SIGTERM.set()


def _catch_sigterm(_worker: Any) -> None:
    """On the worker's main thread, the only one that may set handlers."""
    _RAY_SIGTERM[:] = [signal.signal(signal.SIGTERM, _flag_sigterm)]


def _release_sigterm(_worker: Any) -> None:
    """On the main thread: SIGTERM back to Ray's handler, which ends the worker."""
    signal.signal(signal.SIGTERM, _RAY_SIGTERM[0])


def _exit_on_sigterm(worker: Any) -> None:
    """On the main thread: the worker ends as Ray ends one that is told to stop."""
    _release_sigterm(worker)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_main_thread(fn: Any) -> Any:
    """Runs ``fn(worker)`` on this Ray worker's main thread: Ray Train runs the training
    function on a thread of its own, and its actor takes calls on the main one."""
    import ray

    return ray.get_runtime_context().current_actor.__ray_call__.remote(fn)


class RayPreemption:
    """``Hooks.preempted`` on Ray Train: True once per notice that this worker group is about
    to lose a node, that is

    - Ray's preemption notice, for a node that drains (a spot reclaim, ``ray drain-node``),
      which Ray's PreemptionWatcher hands to every worker;
    - SIGTERM to any rank's process (a pod or VM shutting down), which reaches only the
      processes of one node.

    Every rank asks Ray for the first every step, as Ray requires (the answer is rank 0's,
    broadcast); they agree on the second through one scalar all-reduce a step. Neither made a
    step slower in benchmarks/preemption.py (benchmarks/RESULTS.md).

    After the checkpoint the ranks ``hold``. On a drain, Ray Train tears the group down when
    the node goes or the deadline passes and restarts it from that checkpoint on the nodes
    that stay (its preemption budget, not ``max_failures``). On SIGTERM, the signalled rank
    exits once the controller has the checkpoint, as Ray's own handler would have exited it,
    and Ray restarts the group from that checkpoint (a worker failure: ``max_failures``). A
    rank that trained on would train steps the restart repeats."""

    def __init__(self, device: torch.device) -> None:
        import ray

        self.info: Any = None
        self.device = device
        self.signalled = self.terminating = False
        ray.get(_on_main_thread(_catch_sigterm))

    def close(self) -> None:
        """Training is over: SIGTERM ends the worker again, as Ray has it."""
        import ray

        ray.get(_on_main_thread(_release_sigterm))

    def __call__(self) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()
        drained = info is not None and info != self.info
        self.info = info if drained else self.info
        self.signalled = _SIGTERM.is_set()
        flag = global_sum(torch.tensor([float(self.signalled)], device=self.device))
        self.terminating = bool(flag.item() > 0)
        return drained or self.terminating

    def hold(self, rank: int) -> None:
        if self.terminating:
            self._hold_for_sigterm(rank)
            return
        info, now = self.info, time.time()
        deadline = info.deadline_ms / 1000 if info.deadline_ms else now + PREEMPTION_DEADLINE_S
        if rank == 0:
            say(
                f"[cmray] preemption notice (ranks {info.preempted_ranks} draining): "
                f"checkpointed step; waiting up to {deadline - now:.0f} s for Ray to restart"
            )
        _sleep_until(deadline + HOLD_MARGIN_S)
        if rank == 0:
            say("[cmray] no restart came (the drain was withdrawn?): training goes on")

    def _hold_for_sigterm(self, rank: int) -> None:
        if self.signalled:
            say(f"[cmray] rank {rank} got SIGTERM: checkpointed step; exiting for Ray to restart")
            _report_taken()
            time.sleep(REPORT_GRACE_S)
            _on_main_thread(_exit_on_sigterm)
        # Ray tears the group down once the signalled worker is gone.
        _sleep_until(time.time() + PREEMPTION_DEADLINE_S)
        raise RuntimeError("SIGTERM: checkpointed, but Ray did not restart the worker group")


def _report_taken() -> None:
    """Blocks until Ray Train's controller has taken this worker's last report (its queue's
    task is done), so the checkpoint is registered before the process goes."""
    from ray.train.v2._internal.execution.context import get_train_context

    get_train_context().get_result_queue().join()


def _sleep_until(deadline: float) -> None:
    while time.time() < deadline:
        time.sleep(1.0)


def ray_storage(path: str) -> tuple[str, Any]:
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
    cfg.data.manifest = absolute(cfg.data.manifest)
    for key in cfg.objective.SOURCE_FIELDS:
        section, name = key.split(".")
        owner = getattr(cfg.objective, section)
        setattr(owner, name, absolute(getattr(owner, name)))
    cfg.objective.lpips_weights = absolute(cfg.objective.lpips_weights)
    cfg.run.storage_path = absolute(cfg.run.storage_path)
    cfg.quality.weights = absolute(cfg.quality.weights)
    if cfg.tracking.enabled:  # the driver's MLFLOW_TRACKING_URI or local store, for every worker
        cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    return cfg


def preflight(cfg: TrainConfig) -> None:
    """Checks that need the data or the model sources (teacher, initial weights), run on the
    driver before any worker starts."""
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
    if cfg.net.num_classes and not 0 < manifest.classes <= cfg.net.num_classes:
        raise ConfigError(
            f"net.num_classes = {cfg.net.num_classes} but the data has {manifest.classes} "
            "classes; class-conditional training needs shards with labels (.cls)",
            key="net.num_classes",
        )
    for key, source in cfg.objective.sources().items():
        if is_mlflow_uri(source):  # fetched by the workers
            continue
        try:
            locate_model(source)
        except ModelSourceError as exc:
            raise ConfigError(f"objective.{key}: {exc}", key=f"objective.{key}") from None


def prepare(cfg: TrainConfig) -> TrainConfig:
    """What the driver does before any worker starts: absolute paths, the data and teacher
    checked, the quality figure's reference statistics made if missing (on Ray actors)."""
    cfg = absolute_paths(cfg)
    preflight(cfg)
    check_resume(cfg, cfg.run.location)
    if cfg.quality.every:
        from cmray.eval.quality import ensure_ref_stats

        ensure_ref_stats(cfg.quality, cfg.data.manifest)
    return cfg


def make_trainer(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Any:
    """Ray's TorchTrainer running ``train_worker`` for a :func:`prepare`-d config."""
    return _torch_trainer(train_worker, to_dict(cfg), cfg.run, callbacks)


def _torch_trainer(
    fn: Any, loop_config: dict[str, Any], run: RayConfig, callbacks: Sequence[Any]
) -> Any:
    """A TorchTrainer of ``fn`` on ``run``'s workers, named and stored as ``run`` says."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = ray_storage(run.storage_path)
    return TorchTrainer(
        functools.partial(_at_log_level, fn, run.log_level),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker=worker_resources(run),
            elastic_resize_monitor_interval_s=run.resize_check_s,
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=run.max_failures),
            logging_config=LoggingConfig(log_level=run.log_level),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": env} if (env := _fault_env()) else None,
        ),
    )


# Libraries' INFO lines in a worker's log that say nothing a user acts on (MLflow's system
# metrics monitor starting and stopping, its model-signature check): shown from DEBUG/INFO only.
CHATTY_LOGGERS = ("mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models")


def _at_log_level(fn: Any, level: str, config: dict[str, Any]) -> None:
    """Run a worker function with Ray Train's per-report line at ``level`` too: Ray logs it
    under a logger named by its file path, which LoggingConfig's level does not reach. Other
    libraries' chatter goes below ``level`` with it; their warnings stay."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the line stays
        context = None
    if context is not None:
        logging.getLogger(context.__file__).setLevel(level)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if logging.getLevelName(level) > logging.INFO:  # MLflow's download bars, one per model
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    fn(config)


def worker_resources(run: RayConfig) -> dict[str, float]:
    """What one Ray Train worker of the run reserves."""
    return {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}


def launch(cfg: TrainConfig) -> Any:
    """Run ``train_worker`` on ``cfg.run.num_workers`` workers; returns Ray's Result."""
    return make_trainer(prepare(cfg)).fit()


# --------------------------------------------------------------------------- the 2D toy


STUDENT_FILE = "student.pt"


def _toy_teacher(toy: Any, path: str) -> torch.nn.Module:
    from cmray.train.toy import make_teacher

    state = read_checkpoint_file(*url_to_fs(path))
    teacher = make_teacher(toy)
    teacher.load_state_dict(state)
    return teacher.eval().requires_grad_(False)


def toy_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function for a search's 2D trial: a student of any method (CD, CT,
    or ECT, sCT, sCD tuned from the teacher), scored by the energy distance of its one-step
    samples to fresh draws from the true ring."""
    import ray.train

    from cmray.config import flatten
    from cmray.eval.toy import TOY_METRIC, one_step_probe
    from cmray.tracking import Tracker, TrackingConfig
    from cmray.train.toy import Student, ring_of, training_data
    from cmray.train.toy_config import Toy2DConfig, ToyTrialConfig

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    toy = from_dict(Toy2DConfig, config["toy"])
    trial = from_dict(ToyTrialConfig, config["trial"])
    data, _ = training_data(toy)
    teacher = _toy_teacher(toy, config["teacher"]) if trial.method != "ct" else None
    student = Student(toy, trial.method, data, teacher)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            student.load_state_dict(torch.load(Path(directory) / STUDENT_FILE, weights_only=True))
    ring, sigma_max = ring_of(toy), toy.noise.sigma_max
    probe = one_step_probe(
        ring, sigma_max, toy.seed, trial.quality_samples, trial.reference_samples
    )
    tracking = from_dict(TrackingConfig, config["tracking"])
    tracker = None
    if tracking.enabled:
        params = {**flatten(toy), "method": trial.method}
        tracker = Tracker(tracking, config["name"], config["run_key"], params)
    while student.step < student.K:
        loss = student.train_step()
        if student.step % trial.quality_every and student.step < student.K:
            continue
        N, mu = student.schedule(student.step - 1)
        metrics = {"step": student.step, "loss": loss, "N": N, "mu": mu}
        metrics[TOY_METRIC] = probe(student.sampler)
        if tracker is not None:
            tracker.log_metrics(metrics, student.step)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(student.state_dict(), Path(tmp) / STUDENT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if tracker is not None:
        tracker.close()


def make_toy_trainer(
    job: dict[str, Any], storage: str, cpus: float, callbacks: Sequence[Any] = ()
) -> Any:
    """A one-worker TorchTrainer running :func:`toy_worker` on ``job``, named ``job["name"]``."""
    # Failures resume from the newest checkpoint, so a few retries cost little.
    run = RayConfig(
        name=job["name"],
        storage_path=storage,
        num_workers=1,
        cpus_per_worker=cpus,
        max_failures=3,
        keep_checkpoints=2,
    )
    return _torch_trainer(toy_worker, job, run, callbacks)
