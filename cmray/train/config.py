"""Typed configuration of image training: CD, CT, ECT, sCM or an EDM teacher, on Ray Train or
directly.

``configs/*.yaml`` fill it; ``cmray config train --config FILE`` checks one without running it.
Everything is validated when the config is built, before Ray or any data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from cmray.config import ConfigError, flatten, param, to_dict
from cmray.data.config import StreamConfig
from cmray.eval.config import QualityConfig
from cmray.models.config import ModelConfig, NoiseConfig
from cmray.nets.unet import UNetConfig
from cmray.tracking.config import TrackingConfig
from cmray.train.curriculum import CurriculumConfig


@dataclass
class CDConfig:
    """Consistency distillation (paper Eq. 7, Algorithm 2) from an EDM teacher."""

    teacher: str = param(
        "",
        help="the EDM teacher: checkpoint directory or URL, model file, or models:/NAME@ALIAS",
    )
    N: int = param(40, help="points on the Karras grid (LSUN: 40)", ge=2)
    mu: float = param(0.95, help="target EMA rate (LSUN: 0.95)", ge=0, lt=1)
    solver: Literal["euler", "heun"] = param("heun", help="teacher ODE step")
    init: str = param(
        "",
        help="model the student starts from ('': fresh weights); the paper's code starts "
        "CD students from the teacher's weights",
    )


@dataclass
class CTConfig(CurriculumConfig):
    """Consistency training (paper Eq. 10, Algorithm 3) with an adaptive curriculum."""

    K: int = param(0, help="curriculum length in steps (0: loop.steps)", ge=0)
    init: str = param(
        "",
        help="model the student starts from ('': fresh weights, training from data alone; "
        "the released LSUN CT commands start from the EDM teacher)",
    )


@dataclass
class EDMConfig:
    """Training the EDM teacher (Karras et al. 2022, Table 1)."""

    P_mean: float = param(-1.2, help="mean of ln sigma")
    P_std: float = param(1.2, help="std of ln sigma", gt=0)


@dataclass
class ECTConfig:
    """Easy Consistency Tuning (Geng et al. 2024): a diffusion model tuned into f_theta.

    The defaults are one upstream set-up, locuslab/ect's main branch (its CIFAR-10 runs): q = 2
    over 8 stages, w = 1 / (t - r), c = 0, ln t ~ N(-1.1, 2.0^2). Its ImageNet 64 branch is
    q = 4 over 4 stages, w = snrpk, c = 0.06, ln t ~ N(-0.8, 1.6^2). Both end at the gap
    t - r = t n(t) / q^stages = t n(t) / 256.
    """

    init: str = param(
        "", help="the diffusion model the student starts from (any model source; EDM kind)"
    )
    P_mean: float = param(-1.1, help="mean of ln t (locuslab/ect main: -1.1; imgnet: -0.8)")
    P_std: float = param(2.0, help="std of ln t (main: 2.0; imgnet: 1.6)", gt=0)
    q: float = param(
        2.0,
        help="each stage shrinks t - r by this factor (main: 2 with 8 stages; imgnet: 4 with 4)",
        gt=1,
    )
    stages: int = param(8, help="stages over the run; the last ends at t n(t) / q^stages", ge=1)
    k: float = param(8.0, help="n(t) = 1 + k sigmoid(-b t)", ge=0)
    b: float = param(1.0, help="n(t) = 1 + k sigmoid(-b t)", ge=0)
    c: float = param(
        0.0, help="pseudo-Huber c on the whole image (main: 0, the l2 norm; imgnet: 0.06)", ge=0
    )
    weighting: Literal["gap", "snrpk"] = param(
        "gap", help="w: gap 1 / (t - r) (main) or snrpk 1 / t^2 + 1 / sigma_d^2 (imgnet)"
    )
    stage_steps: int = param(
        0, help="steps per stage (0: loop.steps / stages); the stage stops at stages - 1", ge=0
    )


@dataclass
class SCMConfig:
    """Continuous-time consistency models in TrigFlow (sCM; Lu & Song 2024)."""

    mode: Literal["ct", "cd"] = param("ct", help="ct: dx/dt from data and noise; cd: teacher")
    init: str = param("", help="model the student starts from ('': fresh; cd: the teacher)")
    teacher: str = param("", help="cd: the EDM teacher (any model source)")
    P_mean: float = param(-0.8, help="mean of ln sigma, t = arctan(sigma / sigma_d)")
    P_std: float = param(1.6, help="std of ln sigma (ImageNet 64: -0.8, 1.6)", gt=0)
    tangent_warmup: int = param(10000, help="steps over which r rises to 1 (0: none)", ge=0)
    tangent_c: float = param(0.1, help="tangent normalisation g / (||g|| + c)", gt=0)
    jvp: Literal["jvp", "fd"] = param(
        "jvp", help="dF/dt by torch.func.jvp (exact) or a central finite difference"
    )
    fd_eps: float = param(
        1e-4,
        help="fd: step along the tangent (the default c_noise, 250 ln sigma, moves fast)",
        gt=0,
    )
    prior_weight: bool = param(False, help="multiply the loss by 1/sigma (sCM's prior weight)")


@dataclass
class ObjectiveConfig:
    """What is learned and how its loss is measured."""

    kind: Literal["cd", "ct", "ect", "scm", "edm"] = param(
        "ct", help="cd, ct, ect, scm, or edm (teacher training)"
    )
    metric: Literal["auto", "l2", "l1", "lpips", "pseudo_huber"] = param(
        "auto",
        help="distance d of cd and ct (ect: ect.c; scm: its own loss); auto: iCT's "
        "pseudo_huber for ct with the ict curriculum, l2 otherwise",
    )
    lpips_weights: str = param(
        "", help="VGG16 backbone file path or URL for lpips ('' = the torch hub cache)"
    )
    weighting: Literal["auto", "uniform", "ict"] = param(
        "auto", help="lambda(t_n); auto: ict for ct with the ict curriculum, uniform otherwise"
    )
    sigma_data: float = param(0.5, help="data std in the scalings (Appendix C)", gt=0)
    noise: NoiseConfig = param(default_factory=NoiseConfig, help="noise range and grid")
    cd: CDConfig = param(default_factory=CDConfig, help="cd settings")
    ct: CTConfig = param(default_factory=CTConfig, help="ct settings")
    edm: EDMConfig = param(default_factory=EDMConfig, help="edm settings")
    ect: ECTConfig = param(default_factory=ECTConfig, help="ect settings")
    scm: SCMConfig = param(default_factory=SCMConfig, help="scm settings")

    def __post_init__(self) -> None:
        needs = {
            "cd": ("cd.teacher", self.cd.teacher, "a teacher"),
            "ect": ("ect.init", self.ect.init, "a diffusion model to start from"),
            "scm": ("scm.teacher", self.scm.teacher or self.scm.mode == "ct", "a teacher (cd)"),
        }
        if self.kind in needs and not needs[self.kind][1]:
            key, _, what = needs[self.kind]
            raise ConfigError(
                f"objective.{key} is empty; {self.kind} needs {what} (a model source)",
                key=f"objective.{key}",
            )

    @property
    def is_ict(self) -> bool:
        return self.kind == "ct" and self.ct.curriculum == "ict"

    @property
    def distance(self) -> str:
        """The metric d in use: ``metric``, with auto resolved (iCT: pseudo_huber; else l2)."""
        return self.metric if self.metric != "auto" else ("pseudo_huber" if self.is_ict else "l2")

    @property
    def lambda_name(self) -> str:
        """lambda(t_n) in use: ``weighting``, with auto resolved (iCT: ict; else uniform)."""
        return self.weighting if self.weighting != "auto" else ("ict" if self.is_ict else "uniform")

    # Fields that name a model source; ``sources()`` says which this kind reads.
    SOURCE_FIELDS: ClassVar[tuple[str, ...]] = (
        "cd.teacher",
        "cd.init",
        "ct.init",
        "ect.init",
        "scm.init",
        "scm.teacher",
    )

    def sources(self) -> dict[str, str]:
        """The model sources this objective reads, by their key under ``objective``."""
        used = {
            "cd": {"cd.teacher": self.cd.teacher, "cd.init": self.cd.init},
            "ct": {"ct.init": self.ct.init},
            "ect": {"ect.init": self.ect.init},
            "scm": {"scm.init": self.scm.init, "scm.teacher": self.scm.teacher},
        }.get(self.kind, {})
        return {key: source for key, source in used.items() if source}

    @property
    def init(self) -> str:
        """The model source whose weights the student starts from ('' for fresh weights)."""
        if self.kind in ("cd", "ct", "ect"):
            return getattr(self, self.kind).init
        if self.kind == "scm":
            return self.scm.init or (self.scm.teacher if self.scm.mode == "cd" else "")
        return ""


@dataclass
class OptimConfig:
    """The optimiser (reference: RAdam, no weight decay, constant learning rate)."""

    name: Literal["radam", "adam"] = param("radam", help="radam (reference) or adam")
    lr: float = param(5e-5, help="learning rate (LSUN: CD 1e-5, CT 5e-5)", gt=0)
    weight_decay: float = param(0.0, help="weight decay", ge=0)
    grad_clip: float = param(0.0, help="clip the gradient norm to this (0: no clipping)", ge=0)


@dataclass
class LoopConfig:
    """Steps, precision and what happens every K steps."""

    steps: int = param(1000, help="optimiser steps in the whole run", ge=1)
    microbatch: int = param(
        0,
        help="images per forward pass on one rank; a rank's share of the global batch "
        "accumulates over as many passes as it needs (0: the whole share in one pass)",
        ge=0,
    )
    precision: Literal["fp32", "bf16", "fp16"] = param(
        "fp32", help="bf16 autocast, or fp16 autocast with loss scaling"
    )
    ema_rates: list[float] = param(
        default_factory=lambda: [0.9999, 0.99994, 0.9999432189950708],
        help="EMA copies kept for sampling (reference LSUN rates)",
    )
    ema_rampup: float = param(
        0.0,
        help="EMA warm-up: each copy's half-life at most this fraction of the steps so far "
        "(EDM: 0.05; 0: off, as in openai/consistency_models, whose runs start from a teacher "
        "or run 800k steps)",
        ge=0,
        lt=1,
    )
    seed: int = param(0, help="seed of weights, noise and data order", ge=0)
    log_every: int = param(10, help="report metrics every K steps", ge=1)
    checkpoint_every: int = param(500, help="save a checkpoint every K steps", ge=1)
    sample_every: int = param(0, help="save a sample grid every K steps (0: at the end only)", ge=0)
    sample_count: int = param(16, help="images in a sample grid", ge=1)
    nonfinite_limit: int = param(
        10, help="stop after this many consecutive steps with a NaN/inf loss or gradient", ge=1
    )

    def __post_init__(self) -> None:
        bad = [r for r in self.ema_rates if not 0 <= r < 1]
        if bad:
            raise ConfigError(f"loop.ema_rates {bad} must be in [0, 1)", key="loop.ema_rates")


@dataclass
class RayConfig:
    """Where and how the run executes."""

    name: str = param("cmray", help="run name; the same name resumes the same run")
    storage_path: str = param("runs/train", help="local directory or s3:// URL for checkpoints")
    num_workers: int | tuple[int, int] = param(
        2,
        help="Ray Train workers (one per GPU on GPU clusters); [min, max]: elastic, the run "
        "continues on as few as min and grows back to max as resources come and go",
        ge=1,
    )
    use_gpu: bool = param(False, help="one GPU per worker")
    cpus_per_worker: float = param(1.0, help="CPUs reserved per worker", gt=0)
    max_failures: int = param(3, help="worker failures tolerated before the run fails", ge=-1)
    keep_checkpoints: int = param(3, help="checkpoints kept (the newest)", ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = param(
        "WARNING", help="Ray Train's own console lines (INFO: every report of every rank)"
    )
    preemption_checkpoint: bool = param(
        True,
        help="on a preemption notice (a draining node) or SIGTERM to a worker, checkpoint at "
        "once and restart from there (false: Ray restarts at the deadline or on the worker's "
        "death, from the last periodic checkpoint)",
    )
    resize_check_s: float = param(
        60.0, help="elastic runs: seconds between checks for more workers", gt=0
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, list):  # a YAML list, as Ray takes a tuple
            self.num_workers = tuple(self.num_workers)
        if isinstance(self.num_workers, tuple) and self.num_workers[0] > self.num_workers[1]:
            raise ConfigError(
                f"run.num_workers = {list(self.num_workers)}: min must not exceed max; "
                "accepted: an int, or [min, max] with 1 <= min <= max",
                key="run.num_workers",
            )

    @property
    def location(self) -> str:
        """The run's directory (or URL): Ray Train's checkpoints, or ``--local``'s."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def max_workers(self) -> int:
        """The most workers the run uses (all of them, when not elastic)."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


# What a resumed run must share with the run it continues, as dotted key prefixes.
RESUME_FIXED = ("net.", "objective.", "optim.", "loop.ema_rates", "loop.ema_rampup", "loop.seed")
MODEL_LOCATIONS = (".teacher", ".init", "_weights")


@dataclass
class TrainConfig:
    """A whole training run."""

    data: StreamConfig = param(default_factory=StreamConfig, help="the shard stream")
    net: UNetConfig = param(default_factory=UNetConfig, help="the U-Net")
    objective: ObjectiveConfig = param(default_factory=ObjectiveConfig, help="the loss")
    optim: OptimConfig = param(default_factory=OptimConfig, help="the optimiser")
    loop: LoopConfig = param(default_factory=LoopConfig, help="the loop")
    run: RayConfig = param(default_factory=RayConfig, help="execution and storage")
    tracking: TrackingConfig = param(default_factory=TrackingConfig, help="MLflow")
    quality: QualityConfig = param(
        default_factory=QualityConfig, help="sample quality measured during training"
    )

    def worker_batch(self) -> int:
        """Images a step on one worker at the full worker count (its share of the global batch)."""
        return self.data.batch_size // self.run.max_workers

    def resume_changes(self, saved: TrainConfig) -> list[str]:
        """The settings that decide what a run learns which differ from ``saved``'s, as
        ``key: old -> new`` (the run's length, workers, data location and where its teacher is
        kept may change on a resume; the net, the objective, the optimiser and the EMA may not)."""
        old, new = flatten(saved), flatten(self)
        return [
            f"{key}: {old.get(key)} -> {value}"
            for key, value in new.items()
            if key.startswith(RESUME_FIXED)
            and not key.endswith(MODEL_LOCATIONS)
            and old.get(key) != value
        ]

    def model_config(self) -> ModelConfig:
        """The model this run trains, as every reader of its checkpoints and model file sees it."""
        return ModelConfig.from_training(to_dict(self))

    def __post_init__(self) -> None:
        if not self.data.manifest:
            raise ConfigError(
                "data.manifest is empty; give the dataset's manifest URL", key="data.manifest"
            )
        if self.data.batch_size < self.run.max_workers:
            raise ConfigError(
                f"data.batch_size = {self.data.batch_size} is the global batch; it leaves some "
                f"of run.num_workers = {self.run.max_workers} without an image; accepted: at "
                f"least {self.run.max_workers}",
                key="data.batch_size",
            )
