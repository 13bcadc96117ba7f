"""What a model is: its network, its parametrization and the noise range it works on.

A training run's config says how a model was made; :class:`ModelConfig` says only what anyone
needs to use it (sample, edit, evaluate, distil from it, export it), so models made elsewhere,
such as openai's released checkpoints, carry one too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from cmray.config import ConfigError, from_dict, param
from cmray.core.parametrization import OFFICIAL_C_NOISE_SCALE
from cmray.core.schedules import ct_bounds
from cmray.core.trigflow import T_MID as TRIGFLOW_T_MID
from cmray.nets.unet import UNetConfig


@dataclass
class NoiseConfig:
    """The noise range shared by teacher and students (paper Sec. 4 / Appendix C)."""

    sigma_min: float = param(0.002, help="eps: the smallest noise level", gt=0)
    sigma_max: float = param(80.0, help="T: the largest noise level", gt=0)
    rho: float = param(7.0, help="Karras grid curvature", gt=0)
    c_noise_scale: float = param(
        OFFICIAL_C_NOISE_SCALE,
        help="the network's time input c_noise = scale * ln sigma (official CM code and its "
        "checkpoints: 250; EDM: 0.25)",
        gt=0,
    )

    def __post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(
                f"noise.sigma_min = {self.sigma_min} must be below noise.sigma_max = "
                f"{self.sigma_max}",
                key="noise.sigma_min",
            )


Kind = Literal["edm", "cd", "ct", "ect", "scm"]
# Kinds whose boundary is sigma = 0 (EDM scalings without the eps shift): f(x, 0) = x.
ZERO_BOUNDARY = ("edm", "ect", "scm")
# The Karras grid that multistep noise levels (and the ternary search) index for kinds that
# train on continuous noise levels (ECT, sCM): the CD grid.
CONTINUOUS_GRID = 40
# Default two-step middle noise levels: sCM's t_mid = 1.1 as sigma_d tan(1.1) (computed per
# model), and ECT's released CIFAR-10 sampler's 0.821.
ECT_TWO_STEP_SIGMA = 0.821
CT_KEYS = ("curriculum", "s0", "s1")


@dataclass
class ModelConfig:
    """A U-Net model: called ``model(x, sigma)``, it is the denoiser D for kind ``edm`` and the
    consistency function f_theta for the others: Eq. 5 with f(x, sigma_min) = x for ``cd`` and
    ``ct``; EDM's scalings with f(x, 0) = x for ``ect`` and ``scm``. An ``scm`` model is TrigFlow
    (sCM), read in sigma = sigma_d tan t, and carries its adaptive weight w_phi."""

    kind: Kind = param(
        "cd", help="edm: a diffusion teacher's denoiser D; cd, ct, ect, scm (TrigFlow): f_theta"
    )
    net: UNetConfig = param(default_factory=UNetConfig, help="the network's shape")
    noise: NoiseConfig = param(default_factory=NoiseConfig, help="noise range and grid")
    sigma_data: float = param(0.5, help="data std in the scalings (Appendix C)", gt=0)
    N: int = param(
        0,
        help="Karras grid points that multistep noise levels index (CD's N, CT's s1 + 1; "
        "0 for a teacher)",
        ge=0,
    )

    @property
    def is_consistency(self) -> bool:
        return self.kind != "edm"

    @property
    def boundary(self) -> float:
        """The noise level where f(x, .) = x: eps for CD/CT, 0 for EDM, ECT and sCM; the
        samplers' eps (Algorithm 1 adds sqrt(tau^2 - eps^2) z)."""
        return 0.0 if self.kind in ZERO_BOUNDARY else self.noise.sigma_min

    def two_step_sigma(self) -> float | None:
        """The published two-step middle noise level where one is fixed (sCM, ECT); None for
        CD/CT, whose middle is an index of their grid."""
        if self.kind == "scm":
            return self.sigma_data * math.tan(TRIGFLOW_T_MID)
        return ECT_TWO_STEP_SIGMA if self.kind == "ect" else None

    @classmethod
    def from_training(cls, config: dict[str, Any]) -> ModelConfig:
        """The model that a training run with this resolved config (a ``TrainConfig`` as a
        dict, as checkpoints store it) trains."""
        objective = config["objective"]
        kind = objective["kind"]
        grid = {
            "cd": lambda: objective["cd"]["N"],
            "ct": lambda: ct_bounds(**{k: objective["ct"][k] for k in CT_KEYS})[1] + 1,
            "ect": lambda: CONTINUOUS_GRID,
            "scm": lambda: CONTINUOUS_GRID,
        }
        spec = {
            "kind": kind,
            "net": config["net"],
            "noise": objective["noise"],
            "sigma_data": objective["sigma_data"],
            "N": grid[kind]() if kind in grid else 0,
        }
        return from_dict(cls, spec)
