"""Build a trainer from a config and run its loop; no Ray in this file.

``cmray.train.worker`` runs the same loop inside Ray Train workers (DDP, reports, checkpoints
in Ray's storage); ``run_local`` runs it in this process with checkpoints under a directory.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmray.config import to_dict
from cmray.core import losses
from cmray.core.ema import EMABank, frozen_copy
from cmray.core.metrics import get_metric
from cmray.core.parametrization import ConsistencyFunction
from cmray.core.sampling import sample_onestep, sample_teacher_ode
from cmray.core.seeds import rank_seed
from cmray.data.stream import ShardStream
from cmray.eval.images import grid_array
from cmray.models import ModelConfig, build_model, load_model, write_model_file
from cmray.train import state as ckpt
from cmray.train.config import TrainConfig
from cmray.train.objectives import (
    CDObjective,
    CTObjective,
    ECTObjective,
    EDMObjective,
    Objective,
    SampleDraws,
    SCMObjective,
    conditioned,
    karras_grid,
)
from cmray.train.state import TrainState, data_position, unwrap
from cmray.train.step import Share, train_step

Log = Callable[[str], None]


@dataclass
class Trainer:
    cfg: TrainConfig
    state: TrainState
    objective: Objective
    device: torch.device
    rank: int = 0
    world_size: int = 1


def build_net(cfg: TrainConfig) -> ConsistencyFunction:
    """f_theta (Eq. 5) around the U-Net, or the EDM denoiser D for an ``edm`` run."""
    return build_model(cfg.model_config())


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    optim = cfg.optim
    cls = torch.optim.RAdam if optim.name == "radam" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def sampling_model(trainer: Trainer) -> nn.Module:
    """The model samples come from: the first EMA copy, or the online net without EMA."""
    state = trainer.state
    return state.ema.copies[0] if state.ema.rates else unwrap(state.online)


def save_model_file(trainer: Trainer, path: str | Path) -> Path:
    """The sampling model, its config and the run's config in one file (MLflow, ``cmray fetch``)."""
    cfg = trainer.cfg
    weights = sampling_model(trainer).state_dict()
    return write_model_file(path, cfg.model_config(), weights, training=to_dict(cfg))


def load_edm(source: str, cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, ModelConfig]:
    """An EDM denoiser D from any model source (a teacher run, an imported model), frozen, and
    its config; checked against the student's classes."""
    import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources

    teacher, model = load_model(source, device)
    if model.kind != "edm":
        raise ValueError(f"{source} is a {model.kind} model, not an EDM teacher")
    if model.net.num_classes and model.net.num_classes != cfg.net.num_classes:
        raise ValueError(
            f"{source} is conditional on {model.net.num_classes} classes; the student needs "
            f"net.num_classes = {model.net.num_classes}"
        )
    return teacher, model


def load_teacher(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, ModelConfig]:
    """The CD (or sCD) teacher D, frozen, and its config."""
    obj = cfg.objective
    return load_edm(obj.scm.teacher if obj.kind == "scm" else obj.cd.teacher, cfg, device)


Loaded = tuple[nn.Module, ModelConfig]


def initialise_from(online: ConsistencyFunction, cfg: TrainConfig) -> Loaded | None:
    """A student starts from a diffusion model's network when ``objective.init`` names one (ECT
    and sCM always; CD as the paper's code does, from its teacher; CT optionally): its U-Net
    weights, which must have the student's shape; sCM's w_phi starts fresh. CD/CT's target and
    EMA copies are made from the loaded weights. Returns the model read (on the CPU), which a
    CD or sCD run started from its teacher uses as the teacher."""
    source = cfg.objective.init
    if not source:
        return None
    model, model_cfg = load_edm(source, cfg, torch.device("cpu"))
    theirs, ours = _shape(model_cfg.net), _shape(cfg.net)
    if theirs != ours:
        wrong = {k: v for k, v in ours.items() if theirs[k] != v}
        raise ValueError(
            f"{source} has net {theirs}; the student's differs in {wrong} "
            "(set net: to that model's network)"
        )
    theirs_scale, ours_scale = model_cfg.noise.c_noise_scale, cfg.objective.noise.c_noise_scale
    if theirs_scale != ours_scale:
        # The weights read the time input they were trained on; another scale is another input.
        raise ValueError(
            f"{source} takes the time input {theirs_scale:g} ln sigma; the student's "
            f"objective.noise.c_noise_scale = {ours_scale:g} (set it to {theirs_scale:g})"
        )
    online.net.load_state_dict(model.net.state_dict())
    return model, model_cfg


def _shape(net: Any) -> dict[str, Any]:
    # Dropout and checkpointing are how a net trains, not what its weights are.
    return {k: v for k, v in to_dict(net).items() if k not in ("dropout", "use_checkpoint")}


def make_objective(
    cfg: TrainConfig, device: torch.device, start: Loaded | None = None
) -> Objective:
    """The run's loss; ``start`` is the model the student was initialised from, reused as the
    sCD teacher when it is the same source (read once, not twice, at LSUN size 2 GB a rank)."""
    obj = cfg.objective
    if obj.kind == "edm":
        return EDMObjective(obj.edm, obj.sigma_data)
    if obj.kind == "ect":
        return ECTObjective(obj.ect, obj.sigma_data, cfg.loop.steps)
    if obj.kind == "scm":
        if obj.scm.mode == "ct":
            return SCMObjective(obj.scm, obj.sigma_data)
        same = start is not None and obj.init == obj.scm.teacher
        teacher, model = (start[0].to(device), start[1]) if same else load_teacher(cfg, device)
        return SCMObjective(obj.scm, obj.sigma_data, teacher, model.net.num_classes)
    lpips = None
    if obj.distance == "lpips":
        from cmray.weights import load_lpips

        lpips = load_lpips("vgg", obj.lpips_weights or None).to(device)
    metric, weighting = get_metric(obj.distance, lpips), losses.LAMBDAS[obj.lambda_name]
    if obj.kind == "cd":
        same = start is not None and obj.init == obj.cd.teacher
        teacher, model = (start[0].to(device), start[1]) if same else load_teacher(cfg, device)
        classes = model.net.num_classes
        return CDObjective(obj.cd, obj.noise, teacher, metric, weighting, teacher_classes=classes)
    K = obj.ct.K or cfg.loop.steps
    return CTObjective(obj.ct, obj.noise, K, metric, weighting)


def build_trainer(
    cfg: TrainConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Trainer:
    """Fresh state; every rank builds the same initial weights from ``loop.seed``."""
    torch.manual_seed(cfg.loop.seed)
    online = build_net(cfg)
    start = initialise_from(online, cfg)
    # Channels-last like the batches: gradients then match DDP's bucket layout (no per-step
    # copy or stride warning), and cuDNN runs its NHWC kernels.
    online = online.to(device, memory_format=torch.channels_last)
    # Only CD and CT keep an EMA target network; ECT and sCM use stopgrad(theta) itself.
    target = frozen_copy(online) if cfg.objective.kind in ("cd", "ct") else None
    ema = EMABank(online, cfg.loop.ema_rates, cfg.loop.ema_rampup)
    online = wrap(online)
    scaler = torch.amp.GradScaler(device.type) if cfg.loop.precision == "fp16" else None
    optimizer = make_optimizer(cfg, online.parameters())
    state = TrainState(online, target, ema, optimizer, scaler, config=to_dict(cfg))
    # The step's global RNG draws (dropout) differ per rank; the noise and noise levels are
    # drawn per sample (``SampleDraws``), the same at any world size.
    torch.manual_seed(rank_seed(cfg.loop.seed, rank, "torch"))
    objective = make_objective(cfg, device, start)
    return Trainer(cfg, state, objective, device, rank, world_size)


def batch_draws(trainer: Trainer, count: int) -> SampleDraws:
    """The draws of a step whose batch of ``count`` is all of the global batch (one process:
    benchmarks, a single step)."""
    return SampleDraws(trainer.cfg.loop.seed, trainer.state.step, list(range(count)))


def quality_hook(trainer: Trainer) -> Callable[[], dict[str, float]] | None:
    """Rank 0's sample-quality measurement (``quality.every`` > 0), for :class:`Hooks`."""
    cfg = trainer.cfg
    if not cfg.quality.every or trainer.rank != 0:
        return None
    from cmray.eval.quality import QualityProbe  # the feature network, only when asked for

    probe = QualityProbe(cfg.quality, cfg.data.manifest, trainer.device)
    return lambda: probe(sampling_model(trainer), cfg.model_config())


@torch.no_grad()
def sample_grid(trainer: Trainer, count: int, seed: int = 0) -> torch.Tensor:
    """Samples from the first EMA copy, in [-1, 1]: one step (Algorithm 1) for CD/CT runs;
    a class-conditional run's grid cycles through the classes."""
    cfg = trainer.cfg
    model = sampling_model(trainer)
    shape = (count, cfg.net.in_channels, cfg.net.resolution, cfg.net.resolution)
    g = torch.Generator(device=trainer.device).manual_seed(seed)
    z = torch.randn(shape, generator=g, device=trainer.device)
    classes = cfg.net.num_classes
    labels = torch.arange(count, device=trainer.device) % classes if classes else None
    f = conditioned(model, labels)
    was_training = model.training
    model.eval()
    if cfg.objective.kind == "edm":  # a teacher: EDM's 18-point Heun solve (35 NFE)
        grid = karras_grid(cfg.objective.noise, 18)
        x = sample_teacher_ode(f, z, grid, "heun", to_zero=True).x
    else:
        x = sample_onestep(f, z, cfg.objective.noise.sigma_max).x
    model.train(was_training)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------- loop


def class_batch(labels: torch.Tensor, classes: int, device: torch.device) -> torch.Tensor | None:
    """A class-conditional run's labels on the device (checked on the CPU, where it is free);
    None for an unconditional run, which ignores the data's labels."""
    if not classes:
        return None
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(
            f"net.num_classes = {classes} but a batch has labels {labels.min()}..{labels.max()} "
            "(-1: the shards carry no .cls); use data with labels 0..num_classes-1"
        )
    return labels.to(device, non_blocking=True)


@dataclass
class Hooks:
    """What the loop calls; Ray Train's worker and ``run_local`` each supply their own."""

    report: Callable[[dict[str, float], bool], None]  # metrics, and whether to checkpoint
    sample: Callable[[int, torch.Tensor], None] | None = None
    # Sample-quality figures, merged into the report; called on every rank that has one, at
    # the steps quality.every names (ranks without one still report then, to stay in step).
    quality: Callable[[], dict[str, float]] | None = None
    # Called after every step on every rank (they must agree): True when this group is about
    # to lose a node (a preemption notice, SIGTERM). The loop then checkpoints at once and
    # stops with ``PreemptedError``, so the step is saved and none is trained twice.
    preempted: Callable[[], bool] | None = None


class PreemptedError(RuntimeError):
    """The loop stopped on a preemption notice after checkpointing step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preemption notice: checkpointed step {step} and stopped")
        self.step = step


@dataclass
class _Clock:
    """When this process's loop started, and at which step, for the steps/s it reports."""

    start: float
    first_step: int


def _metrics(
    trainer: Trainer, result: Any, seconds: float, stream: ShardStream, clock: _Clock
) -> dict:
    cfg, state = trainer.cfg, trainer.state
    images = cfg.data.batch_size
    elapsed = time.perf_counter() - clock.start
    return {
        "step": state.step,
        "start_step": clock.first_step,  # where this worker group began: a restart shows
        "world_size": trainer.world_size,
        "global_batch": images,
        "steps_per_s": (state.step - clock.first_step) / max(elapsed, 1e-9),
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": state.optimizer.param_groups[0]["lr"],
        "images_per_s": images / max(seconds, 1e-9),
        "skipped_steps": state.skipped_steps,
        **{k: float(v) for k, v in trainer.objective.schedule(state.step - 1).items()},
        **{f"data_{k}": float(v) for k, v in stream.stats.items()},
    }


def run_loop(trainer: Trainer, stream: ShardStream, hooks: Hooks) -> None:
    """Steps from ``state.step`` to ``loop.steps``, resuming the stream where the step says."""
    cfg, state = trainer.cfg, trainer.state
    loop, batches = cfg.loop, len(stream)
    clock = _Clock(time.perf_counter(), state.step)
    while state.step < loop.steps:
        epoch, start = data_position(state.step, batches)
        stream.set_epoch(epoch, start)
        tick = time.perf_counter()
        for batch in stream:
            x0 = batch["image"].to(trainer.device, non_blocking=True)
            labels = class_batch(batch["label"], cfg.net.num_classes, trainer.device)
            draws = SampleDraws(loop.seed, state.step, batch["position"].tolist())
            share = Share(batch["global_size"], trainer.world_size)
            args = (trainer.objective, x0, loop, cfg.optim, draws, labels, share)
            result = train_step(state, *args)
            done = state.step >= loop.steps
            notice = hooks.preempted is not None and hooks.preempted() and not done
            save = state.step % loop.checkpoint_every == 0 or done or notice
            every = loop.sample_every
            if hooks.sample is not None and ((every and state.step % every == 0) or done):
                hooks.sample(state.step, sample_grid(trainer, loop.sample_count))
            measure = bool(cfg.quality.every) and (state.step % cfg.quality.every == 0 or done)
            if state.step % loop.log_every == 0 or save or measure:
                seconds = time.perf_counter() - tick
                metrics = _metrics(trainer, result, seconds, stream, clock)
                if measure and hooks.quality is not None:
                    metrics.update(hooks.quality())
                hooks.report(metrics | ({"preempted": 1.0} if notice else {}), save)
            if notice:
                raise PreemptedError(state.step)
            tick = time.perf_counter()
            if done:
                return


# ------------------------------------------------------------------------ one process, no Ray


@contextlib.contextmanager
def sigterm_notice() -> Iterator[Callable[[], bool]]:
    """SIGTERM as a preemption notice (``Hooks.preempted``) while the block runs: a spot VM's
    or a pod's shutdown signal checkpoints the step instead of killing the process. Only the
    main thread may take signals; elsewhere the notice never comes."""
    got = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield got.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: got.set())
    try:
        yield got.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_resume(cfg: TrainConfig, run: str) -> None:
    """Refuse to continue the run at ``run`` (a run directory or URL) when it was trained with
    other settings: resuming would report its model under this config's name."""
    from cmray.config import ConfigError, from_dict
    from cmray.models.files import ModelSourceError, read_source

    try:
        saved = from_dict(TrainConfig, read_source(run)["config"])
    except (ModelSourceError, ConfigError, KeyError, OSError):
        return  # nothing to resume (or not a training run's checkpoint)
    changed = cfg.resume_changes(saved)
    if changed:
        raise ConfigError(
            f"{run} holds a run trained with other settings ({'; '.join(changed)}); resuming "
            "it would report that model: set run.name to a new name, or delete that run",
            key="run.name",
        )


def run_local(
    cfg: TrainConfig,
    out: str | Path,
    log: Log = print,
    device: str = "cpu",
    on_metrics: Callable[[dict[str, float]], None] | None = None,
) -> Trainer:
    """Train in this process; checkpoints under ``out/checkpoints``, resuming from the newest.
    SIGTERM checkpoints the current step and raises ``PreemptedError``."""
    out = Path(out)
    check_resume(cfg, str(out))
    trainer = build_trainer(cfg, torch.device(device))
    latest = ckpt.latest_checkpoint(out / ckpt.LOCAL_CHECKPOINTS)
    if latest is not None:
        ckpt.load_checkpoint(trainer.state, latest, rank=0)
        log(f"resumed from {latest} at step {trainer.state.step}")
    stream = ShardStream(cfg.data, 0, 1, device=device)
    # Imported here: cmray.train.tracking imports this module.
    from cmray.train.tracking import finish_tracking, start_tracking

    tracker = start_tracking(cfg, run_key=str(out.resolve()))
    if cfg.quality.every:
        from cmray.eval.quality import ensure_ref_stats

        ensure_ref_stats(cfg.quality, cfg.data.manifest, workers=-1, log=log)

    def report(metrics: dict[str, float], save: bool) -> None:
        log(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if on_metrics is not None:
            on_metrics(metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, trainer.state.step)
        if save:
            path = out / ckpt.LOCAL_CHECKPOINTS / ckpt.checkpoint_name(trainer.state.step)
            ckpt.save_checkpoint(trainer.state, path, rank=0, world_size=1)

    def sample(step: int, images: torch.Tensor) -> None:
        if tracker is not None:
            tracker.log_image(grid_array(images), "samples", step)

    hooks = Hooks(report, sample if tracker is not None else None, quality_hook(trainer))
    with sigterm_notice() as hooks.preempted:
        run_loop(trainer, stream, hooks)
    finish_tracking(tracker, trainer)
    return trainer
