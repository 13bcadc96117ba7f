"""The training objectives as step functions of (online, target, x0, k): pure PyTorch.

Each draws its random numbers from the ``Draws`` it is given (per batch for the 2D toy; per
sample, keyed by the sample's place in the global batch and the step, for image training), so
a run is a function of the seed, and derives its curriculum from the step k, so a resumed run
needs no extra state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cmray.core import losses, schedules, trigflow
from cmray.core.metrics import Metric
from cmray.core.seeds import rank_seed
from cmray.core.tensors import per_sample
from cmray.models.config import NoiseConfig
from cmray.train.config import CDConfig, CTConfig, ECTConfig, EDMConfig, SCMConfig
from cmray.train.curriculum import ct_curriculum, ct_indices

Draw = Callable[[int, torch.Generator], torch.Tensor]  # (count, generator) -> count values


class Draws(Protocol):
    """Where a loss's random numbers come from."""

    def indices(self, draw: Draw, batch: int) -> torch.Tensor:
        """``draw(count, generator)`` (grid indices, noise levels) for ``batch`` samples."""
        ...

    def z(self, x0: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x0``, on its device."""
        ...

    def split(self, sizes: list[int]) -> list[Draws]:
        """The draws of consecutive chunks of the batch (microbatches)."""
        ...


@dataclass
class Generators:
    """Whole-batch draws from two streams: ``index`` (CPU) draws grid indices and noise levels;
    ``noise`` draws z on the device."""

    index: torch.Generator
    noise: torch.Generator

    def indices(self, draw: Draw, batch: int) -> torch.Tensor:
        return draw(batch, self.index)

    def z(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.randn(x0.shape, generator=self.noise, device=x0.device, dtype=x0.dtype)

    def split(self, sizes: list[int]) -> list[Draws]:
        return [self] * len(sizes)


@dataclass
class SampleDraws:
    """Per-sample draws: sample i's values come from generators seeded by (seed, step, its
    place in the global batch, purpose), so they do not depend on which rank holds it, how
    many ranks there are, or how the rank splits its share into microbatches."""

    seed: int
    step: int
    positions: list[int]

    def _generator(self, position: int, purpose: str, device: torch.device) -> torch.Generator:
        key = rank_seed(self.seed, position, f"{self.step}/{purpose}")
        return torch.Generator(device=device).manual_seed(key)

    def indices(self, draw: Draw, batch: int) -> torch.Tensor:
        if batch != len(self.positions):
            raise ValueError(f"{batch} draws asked of a batch of {len(self.positions)} samples")
        cpu = torch.device("cpu")
        return torch.cat([draw(1, self._generator(p, "index", cpu)) for p in self.positions])

    def z(self, x0: torch.Tensor) -> torch.Tensor:
        one = (1, *x0.shape[1:])
        return torch.cat(
            [
                torch.randn(
                    one,
                    generator=self._generator(p, "noise", x0.device),
                    device=x0.device,
                    dtype=x0.dtype,
                )
                for p in self.positions
            ]
        )

    def split(self, sizes: list[int]) -> list[Draws]:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [
            SampleDraws(self.seed, self.step, self.positions[a : a + n])
            for a, n in zip(starts, sizes, strict=True)
        ]


# A network as the losses call it, f(x, t): a module, or one with class labels bound.
Net = nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(Protocol):
    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Draws,
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


def edm_sigmas(P_mean: float, P_std: float) -> Draw:
    """EDM's lognormal noise levels as a draw of ``count`` from a generator."""
    return lambda count, generator: losses.edm_sigma(count, P_mean, P_std, generator)


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
        gen: Draws,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sigmas = karras_grid(self.noise, self.cfg.N)
        n = gen.indices(functools.partial(schedules.sample_uniform_indices, self.cfg.N), len(x0))
        # An unconditional teacher can distil a class-conditional student: it gets no labels.
        teacher = conditioned(self.teacher, labels if self.teacher_classes else None)
        return losses.cd_loss(
            online,
            target,
            teacher,
            x0,
            gen.z(x0),
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
        gen: Draws,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        N, _ = ct_curriculum(self.cfg, k, self.K)
        sigmas = karras_grid(self.noise, N)
        n = gen.indices(functools.partial(ct_indices, self.cfg.curriculum, sigmas), len(x0))
        return losses.ct_loss(online, target, x0, gen.z(x0), n, sigmas, self.metric, self.weighting)

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
        gen: Draws,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sigma = gen.indices(edm_sigmas(self.cfg.P_mean, self.cfg.P_std), len(x0))
        return losses.edm_loss(online, x0, sigma, gen.z(x0), self.sigma_data)

    def target_mu(self, k: int) -> float | None:
        return None

    def schedule(self, k: int) -> dict[str, float]:
        return {}


def ect_stage(cfg: ECTConfig, k: int, steps: int) -> int:
    """ECT's stage s at step k: one more every ``stage_steps`` (default: ``stages`` equal
    stages over the run), held at the last, ``stages - 1``, where the final gap is reached."""
    return min(k // (cfg.stage_steps or max(steps // cfg.stages, 1)), cfg.stages - 1)


@dataclass
class ECTObjective:
    """Easy Consistency Tuning: t lognormal, r from the mapping function at stage s, the online
    net itself (stop-gradient, same dropout mask) as the target; no EMA target network."""

    cfg: ECTConfig
    sigma_data: float
    steps: int

    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Draws,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.cfg
        t = gen.indices(edm_sigmas(c.P_mean, c.P_std), len(x0))
        r = losses.ect_r(t, ect_stage(c, k, self.steps), c.q, c.k, c.b)
        z = gen.z(x0)
        return losses.ect_loss(online, target, x0, z, t, r, c.c, self.sigma_data, c.weighting)

    def target_mu(self, k: int) -> float | None:
        return None

    def schedule(self, k: int) -> dict[str, float]:
        return {"stage": ect_stage(self.cfg, k, self.steps)}


@dataclass
class SCMObjective:
    """sCT / sCD in TrigFlow: the tangent g from a JVP of the stop-gradient net along the
    trajectory, normalised and warmed up, under the learned adaptive weight w_phi(t)."""

    cfg: SCMConfig
    sigma_data: float
    teacher: nn.Module | None = None
    teacher_classes: int = 0

    def loss(
        self,
        online: Net,
        target: Net | None,
        x0: torch.Tensor,
        k: int,
        gen: Draws,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c, sd = self.cfg, self.sigma_data
        sigma = gen.indices(edm_sigmas(c.P_mean, c.P_std), len(x0))
        t = trigflow.time_of(sigma, sd).to(device=x0.device, dtype=x0.dtype)
        z = gen.z(x0) * sd
        x_t = trigflow.x_t(x0, z, t)
        dxdt = self._velocity(x0, z, x_t, t, labels)
        rng = losses.capture_rng_state(x0.device)
        F, logvar = online(x_t, t, trigflow=True)
        jvp = self._jvp(target if target is not None else online, x_t, t, dxdt, rng)
        r = trigflow.tangent_warmup(k, c.tangent_warmup)
        g = trigflow.tangent(F.detach(), jvp, x_t, dxdt, t, sd, r)
        g = trigflow.normalize_tangent(g, c.tangent_c)
        prior = 1.0 / sigma.to(device=x0.device, dtype=x0.dtype) if c.prior_weight else None
        return trigflow.scm_loss(F, F.detach(), g, logvar, prior)

    def _velocity(
        self,
        x0: torch.Tensor,
        z: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """dx_t/dt: from the data and noise (sCT), or the teacher's sigma_d F (sCD)."""
        if self.cfg.mode == "ct":
            return trigflow.velocity(x0, z, t)
        teacher = conditioned(self.teacher, labels if self.teacher_classes else None)
        with torch.no_grad():
            return self.sigma_data * teacher(x_t, t, trigflow=True)[0]

    def _jvp(
        self,
        net: Net,
        x_t: torch.Tensor,
        t: torch.Tensor,
        dxdt: torch.Tensor,
        rng: losses.RNGState,
    ) -> torch.Tensor:
        """cos t sin t dF-/dt along the trajectory, with the online call's dropout masks."""

        def F_minus(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            losses.restore_rng_state(rng)
            return net(x, time, trigflow=True)[0]

        v = torch.cos(t) * torch.sin(t)
        v_x = per_sample(v, x_t) * dxdt
        with torch.no_grad():
            return trigflow.directional_derivative(
                F_minus, x_t, t, v_x, v, self.cfg.jvp, self.cfg.fd_eps
            )

    def target_mu(self, k: int) -> float | None:
        return None

    def schedule(self, k: int) -> dict[str, float]:
        return {"tangent_warmup": trigflow.tangent_warmup(k, self.cfg.tangent_warmup)}
