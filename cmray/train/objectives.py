"""The three training objectives as step functions of (online, target, x0, k): pure PyTorch.

Each draws its own noise from the generators it is given, so a run is a function of the seed,
and derives its curriculum from the step k, so a resumed run needs no extra state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cmray.core import losses, schedules
from cmray.core.metrics import Metric
from cmray.models.config import NoiseConfig
from cmray.train.config import CDConfig, CTConfig, EDMConfig
from cmray.train.curriculum import ct_curriculum, ct_indices


@dataclass
class Generators:
    """``index`` (CPU) draws grid indices and noise levels; ``noise`` draws z on the device."""

    index: torch.Generator
    noise: torch.Generator


# A network as the losses call it, f(x, t): a module, or one with class labels bound.
Net = nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(Protocol):
    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Generators,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def target_mu(self, k: int) -> float | None: ...

    def schedule(self, k: int) -> dict[str, float]: ...


def karras_grid(noise: NoiseConfig, N: int) -> torch.Tensor:
    return schedules.karras_sigmas(N, noise.sigma_min, noise.sigma_max, noise.rho)


def conditioned(net: Any, labels: torch.Tensor | None) -> Any:
    """``net`` with these class labels bound (a class-conditional network), or ``net`` itself:
    the losses call every network as ``f(x, t)``."""
    if net is None or labels is None:
        return net
    return functools.partial(net, class_labels=labels)


def draw_z(x0: torch.Tensor, gen: Generators) -> torch.Tensor:
    return torch.randn(x0.shape, generator=gen.noise, device=x0.device, dtype=x0.dtype)


@dataclass
class CDObjective:
    """Paper Algorithm 2: a fixed grid of N points, fixed mu, one teacher ODE step."""

    cfg: CDConfig
    noise: NoiseConfig
    teacher: nn.Module
    metric: Metric
    weighting: losses.Weighting = losses.lambda_uniform
    teacher_classes: int = 0

    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Generators,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sigmas = karras_grid(self.noise, self.cfg.N)
        n = schedules.sample_uniform_indices(self.cfg.N, x0.shape[0], gen.index)
        # An unconditional teacher can distil a class-conditional student: it gets no labels.
        teacher = conditioned(self.teacher, labels if self.teacher_classes else None)
        return losses.cd_loss(
            online,
            target,
            teacher,
            x0,
            draw_z(x0, gen),
            n,
            sigmas,
            self.metric,
            self.cfg.solver,
            self.weighting,
        )

    def target_mu(self, k: int) -> float | None:
        return self.cfg.mu

    def schedule(self, k: int) -> dict[str, float]:
        return {"N": self.cfg.N, "mu": self.cfg.mu}


@dataclass
class CTObjective:
    """Paper Algorithm 3 with N(k), mu(k) from Appendix C (or iCT's curriculum)."""

    cfg: CTConfig
    noise: NoiseConfig
    K: int
    metric: Metric
    weighting: losses.Weighting = losses.lambda_uniform

    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Generators,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        N, _ = ct_curriculum(self.cfg, k, self.K)
        sigmas = karras_grid(self.noise, N)
        n = ct_indices(self.cfg.curriculum, sigmas, x0.shape[0], gen.index)
        return losses.ct_loss(
            online, target, x0, draw_z(x0, gen), n, sigmas, self.metric, self.weighting
        )

    def target_mu(self, k: int) -> float | None:
        return ct_curriculum(self.cfg, k, self.K)[1]

    def schedule(self, k: int) -> dict[str, float]:
        N, mu = ct_curriculum(self.cfg, k, self.K)
        return {"N": N, "mu": mu}


@dataclass
class EDMObjective:
    """EDM teacher training (Karras et al. 2022, Eq. 2 and Table 1); no target network."""

    cfg: EDMConfig
    sigma_data: float

    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Generators,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sigma = losses.edm_sigma(x0.shape[0], self.cfg.P_mean, self.cfg.P_std, gen.index)
        return losses.edm_loss(online, x0, sigma, draw_z(x0, gen), self.sigma_data)

    def target_mu(self, k: int) -> float | None:
        return None

    def schedule(self, k: int) -> dict[str, float]:
        return {}
