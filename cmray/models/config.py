"""What a model is: its network, its parametrization and the noise range it works on.

A training run's config says how a model was made; :class:`ModelConfig` says only what anyone
needs to use it (sample, edit, evaluate, distil from it, export it), so models made elsewhere,
such as openai's released checkpoints, carry one too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cmray.config import ConfigError, from_dict, param
from cmray.nets.unet import UNetConfig


@dataclass
class NoiseConfig:
    """The noise range shared by teacher and students (paper Sec. 4 / Appendix C)."""

    sigma_min: float = param(0.002, help="eps: the smallest noise level", gt=0)
    sigma_max: float = param(80.0, help="T: the largest noise level", gt=0)
    rho: float = param(7.0, help="Karras grid curvature", gt=0)

    def __post_init__(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(
                f"noise.sigma_min = {self.sigma_min} must be below noise.sigma_max = "
                f"{self.sigma_max}",
                key="noise.sigma_min",
            )


Kind = Literal["edm", "cd", "ct"]


@dataclass
class ModelConfig:
    """A U-Net model: called ``model(x, sigma)``, it is the denoiser D for kind ``edm`` and the
    consistency function f_theta (Eq. 5, f(x, sigma_min) = x) for ``cd`` and ``ct``."""

    kind: Kind = param("cd", help="edm: a diffusion teacher's denoiser D; cd, ct: f_theta")
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

    @classmethod
    def from_training(cls, config: dict[str, Any]) -> ModelConfig:
        """The model that a training run with this resolved config (a ``TrainConfig`` as a
        dict, as checkpoints store it) trains."""
        objective = config["objective"]
        kind = objective["kind"]
        grid = {"cd": lambda: objective["cd"]["N"], "ct": lambda: objective["ct"]["s1"] + 1}
        spec = {
            "kind": kind,
            "net": config["net"],
            "noise": objective["noise"],
            "sigma_data": objective["sigma_data"],
            "N": grid[kind]() if kind in grid else 0,
        }
        return from_dict(cls, spec)
