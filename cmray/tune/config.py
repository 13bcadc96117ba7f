"""Typed configuration of a hyperparameter search (``pipelines/tune.py``, ``configs/tune_*.yaml``).

A search names a base config (an image training config, or the 2D experiment's), the dotted keys
of it to vary and how, and the early-stopping settings. :func:`plan_search` checks every bound
and choice against the base config's own validation before Ray starts, so a bad value is
reported once, by name, instead of failing trials one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cmray.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    param,
    to_dict,
    with_values,
)
from cmray.eval.config import FRECHET_NAMES
from cmray.eval.toy import TOY_METRIC
from cmray.tracking.config import TrackingConfig
from cmray.train.toy import student_settings, total_steps
from cmray.train.toy_config import ToyTrialConfig


@dataclass
class SearchParam:
    """One dimension of the search space: a dotted key of the base config and its values."""

    key: str = param("", help="dotted key in the base config, e.g. objective.ct.s0")
    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"] = param(
        "choice",
        help="choice: sample from values; grid: every value (multiplies num_samples); "
        "uniform/loguniform: a float in [low, high]; randint: an int in [low, high)",
    )
    values: list[Any] = param(default_factory=list, help="choice/grid: the values")
    low: float = param(0.0, help="uniform/loguniform/randint: the lower bound")
    high: float = param(0.0, help="uniform/loguniform: the upper bound; randint: exclusive")

    def __post_init__(self) -> None:
        if not self.key:
            raise ConfigError("space: an entry has no key; give the dotted key it varies")
        if self.kind in ("choice", "grid") and not self.values:
            raise ConfigError(f"space {self.key}: {self.kind} needs values", key=self.key)
        if self.kind in ("uniform", "loguniform", "randint") and not self.low < self.high:
            raise ConfigError(
                f"space {self.key}: low = {self.low} must be below high = {self.high}",
                key=self.key,
            )
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"space {self.key}: loguniform needs low > 0", key=self.key)

    def extremes(self) -> list[Any]:
        """The values a trial can take at the edges: every choice, or both bounds."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


VARIANT_KEY = "variant"
TRIAL_PREFIX = "toy."  # a toy2d variant's settings of the search's trial section (its method)


@dataclass
class VariantConfig:
    """A named bundle of settings: a search over ``variant`` compares whole methods (CD, CT,
    ECT, ...), which differ in several keys at once."""

    name: str = param("", help="the variant's name (a value of the space's variant entry)")
    set: list[str] = param(
        default_factory=list,
        help="its KEY=VALUE settings of the base config (toy2d: toy.KEY sets the trial's, "
        "e.g. toy.method=ect)",
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("variants: an entry has no name", key="variants")


@dataclass
class SchedulerConfig:
    """ASHA early stopping (Li et al. 2020) on the sample-quality figure."""

    enabled: bool = param(True, help="stop poor trials early (false: every trial runs out)")
    grace_period: int = param(
        1000, help="training steps every trial gets before it can be stopped", ge=1
    )
    reduction_factor: float = param(2.0, help="keep the best 1/this at each rung", gt=1)


@dataclass
class SearchRunConfig:
    """Where the search keeps its state, and how many trials run at once."""

    name: str = param("cmray-search", help="search name; the same name resumes the search")
    storage_path: str = param("runs/tune", help="local directory or s3:// URL")
    max_concurrent_trials: int = param(
        0, help="trials at once (0: as many as the cluster's CPUs and GPUs hold)", ge=0
    )
    max_failures: int = param(2, help="times a failed trial is retried, resuming its run", ge=0)


@dataclass
class TuneConfig:
    """A whole search."""

    experiment: Literal["train", "toy2d"] = param(
        "train", help="train: image CD/CT on Ray Train; toy2d: the 2D ring experiment"
    )
    base: str = param("", help="the YAML config every trial starts from")
    overrides: list[str] = param(
        default_factory=list, help="KEY=VALUE settings applied to the base config first"
    )
    space: list[SearchParam] = param(default_factory=list, help="what varies, and how")
    variants: list[VariantConfig] = param(
        default_factory=list,
        help=f"named bundles of settings; a space entry with key {VARIANT_KEY!r} picks by name",
    )
    num_samples: int = param(4, help="trials drawn (each grid point is drawn this often)", ge=1)
    seed: int = param(0, help="seed of the search's draws")
    scheduler: SchedulerConfig = param(default_factory=SchedulerConfig, help="early stopping")
    toy: ToyTrialConfig = param(default_factory=ToyTrialConfig, help="toy2d trials")
    run: SearchRunConfig = param(default_factory=SearchRunConfig, help="state and concurrency")
    tracking: TrackingConfig = param(
        default_factory=TrackingConfig,
        help="MLflow for the search's parent run and every trial (replaces the base's)",
    )

    def __post_init__(self) -> None:
        if not self.base:
            raise ConfigError("base is empty; name the config every trial starts from", key="base")
        if not self.space:
            raise ConfigError("space is empty; give at least one key to vary", key="space")
        keys = [p.key for p in self.space]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ConfigError(f"space names {repeated} more than once", key="space")
        self._check_variants()

    def _check_variants(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: names {names} repeat", key="variants")
        for p in self.space:
            if p.key != VARIANT_KEY:
                continue
            if p.kind not in ("grid", "choice"):
                raise ConfigError(f"space {VARIANT_KEY}: use grid or choice", key=VARIANT_KEY)
            unknown = [v for v in p.values if v not in names]
            if unknown:
                raise ConfigError(
                    f"space {VARIANT_KEY} = {unknown[0]!r} is not a variant; accepted: "
                    + ", ".join(names),
                    key=VARIANT_KEY,
                )

    def _chosen(self, params: dict[str, Any]) -> list[str]:
        if VARIANT_KEY not in params:
            return []
        return list(next(v for v in self.variants if v.name == params[VARIANT_KEY]).set)

    def variant_settings(self, params: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """A trial's params split into its variant's KEY=VALUE settings of the base config and
        the other keys."""
        rest = {k: v for k, v in params.items() if k != VARIANT_KEY}
        return [s for s in self._chosen(params) if not s.startswith(TRIAL_PREFIX)], rest

    def trial_settings(self, params: dict[str, Any]) -> ToyTrialConfig:
        """A toy2d trial's own settings: ``toy``, with its variant's ``toy.KEY`` settings."""
        chosen = self._chosen(params)
        own = [s.removeprefix(TRIAL_PREFIX) for s in chosen if s.startswith(TRIAL_PREFIX)]
        return from_dict(ToyTrialConfig, apply_overrides(to_dict(self.toy), own))

    def toy_methods(self) -> set[str]:
        """Every method a toy2d search's trials can train."""
        return {self.trial_settings({VARIANT_KEY: v.name}).method for v in self.variants} | {
            self.toy.method
        }


@dataclass
class SearchPlan:
    """A checked search: the base config as a dict and what every trial needs to know."""

    cfg: TuneConfig
    base: dict[str, Any]
    metric: str
    max_t: int
    trial_cpus: float
    trial_gpus: float
    parent_run: str = ""

    @property
    def root(self) -> str:
        """The search's directory: Tune's state, the trials' Train runs, the results."""
        return f"{self.cfg.run.storage_path.rstrip('/')}/{self.cfg.run.name}"

    @property
    def trials_path(self) -> str:
        """Where the trials' Train runs (checkpoints) live, beside Tune's own state."""
        return f"{self.root}/train"

    @property
    def teacher_path(self) -> str:
        """Where a toy CD search keeps the one teacher all its trials distil."""
        return f"{self.root}/teacher.pt"

    def trial_run_key(self, trial_id: str) -> str:
        """A trial's run key (its Train storage path and name), as image training uses it
        for the MLflow run."""
        return f"{self.trials_path}/{trial_name(trial_id)}"

    def trial_config(self, params: dict[str, Any]) -> Any:
        """The full, validated config of a trial with these params (a variant's settings
        first, then the other keys)."""
        settings, rest = self.cfg.variant_settings(params)
        data = with_values(apply_overrides(self.base, settings), rest)
        return from_dict(base_class(self.cfg.experiment), data)


def trial_name(trial_id: str) -> str:
    """A trial's Train run name: from the Tune trial ID, so a restarted trial finds its run."""
    return f"trial_{trial_id}"


def base_class(experiment: str) -> type:
    if experiment == "toy2d":
        from cmray.train.toy_config import Toy2DConfig

        return Toy2DConfig
    from cmray.train.config import TrainConfig

    return TrainConfig


def _check_space(cfg: TuneConfig, base: dict[str, Any]) -> None:
    """Every value at the edge of every dimension must give a valid base config."""
    cls = base_class(cfg.experiment)
    for entry in cfg.space:
        for value in entry.extremes():
            settings, rest = cfg.variant_settings({entry.key: value})
            try:
                from_dict(cls, with_values(apply_overrides(base, settings), rest))
                cfg.trial_settings({entry.key: value})
            except ConfigError as exc:
                reason = str(exc).removeprefix("config error: ")
                message = f"space {entry.key} = {value!r}: {reason}"
                raise ConfigError(message, key=entry.key) from None


def plan_search(cfg: TuneConfig) -> SearchPlan:
    """Load and check the base config and the space; name the metric and the trial's size."""
    if not Path(cfg.base).is_file():
        raise ConfigError(f"base = {cfg.base!r}: no such config file", key="base")
    base_cfg = load_config(base_class(cfg.experiment), cfg.base, cfg.overrides)
    base = to_dict(base_cfg)
    _check_space(cfg, base)
    if cfg.experiment == "toy2d":
        steps = max(
            total_steps(base_cfg.ring.train_points, student_settings(base_cfg, m).optim)
            for m in cfg.toy_methods()
        )
        return SearchPlan(cfg, base, TOY_METRIC, steps, cfg.toy.cpus, 0.0)
    if not base_cfg.quality.every:
        raise ConfigError(
            "quality.every = 0 in the base config; early stopping needs a sample-quality "
            "figure during training: set quality.every (and quality.features)",
            key="quality.every",
        )
    run = base_cfg.run
    gpus = float(run.max_workers) if run.use_gpu else 0.0
    metric = FRECHET_NAMES[base_cfg.quality.features]
    return SearchPlan(
        cfg, base, metric, base_cfg.loop.steps, run.max_workers * run.cpus_per_worker, gpus
    )
