"""The consistency function f_theta and its boundary-respecting parametrization.

Paper Eq. 5 and Appendix C: f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(c_in(t) x, c_noise(t)),
with c_skip(eps) = 1 and c_out(eps) = 0, so f_theta(x, eps) = x for every network F.
The EDM teacher's denoiser D_phi uses the same scalings without the eps shift (sigma_min = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from cmray.core.tensors import per_sample

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def c_skip(t: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002) -> torch.Tensor:
    """Paper Appendix C: c_skip(t) = sigma_data^2 / ((t - eps)^2 + sigma_data^2)."""
    return sigma_data**2 / ((t - sigma_min) ** 2 + sigma_data**2)


def c_out(t: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002) -> torch.Tensor:
    """Paper Appendix C: c_out(t) = sigma_data (t - eps) / sqrt(sigma_data^2 + t^2)."""
    return sigma_data * (t - sigma_min) / torch.sqrt(sigma_data**2 + t**2)


def c_in(t: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Paper Appendix C (EDM Table 1): c_in(t) = 1 / sqrt(t^2 + sigma_data^2)."""
    return 1.0 / torch.sqrt(t**2 + sigma_data**2)


# The official consistency-models code's c_noise scale, 1000 * 1/4 (EDM Table 1 has 1/4).
OFFICIAL_C_NOISE_SCALE = 250.0


def c_noise(t: torch.Tensor, scale: float = OFFICIAL_C_NOISE_SCALE) -> torch.Tensor:
    """EDM Table 1 (network time input): c_noise(t) = scale * ln(t + 1e-44), scale 1/4 in EDM
    and 1000/4 in the official consistency-models code.

    sCM (Lu & Song 2024, Sec. 4.1) differentiates F in t, and the sinusoidal time features
    at frequency w then move w * scale per unit ln t: a fast time input makes dF/dt the
    derivative of the highest frequencies, not of the function.
    """
    return scale * torch.log(t + 1e-44)


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> Scalings:
    """Paper Eq. 5 / Appendix C: (c_skip, c_out, c_in) with the sigma_min shift."""
    return c_skip(t, sigma_data, sigma_min), c_out(t, sigma_data, sigma_min), c_in(t, sigma_data)


def linear_scalings(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Scalings:
    """Tutorial Eq. 18: s = clamp((t - eps) / (T - eps), 0, 1), c_skip = 1 - s, c_out = s.

    c_in = 1: the tutorial's network sees the raw input.
    """
    s = ((t - sigma_min) / (sigma_max - sigma_min)).clamp(0.0, 1.0)
    return 1.0 - s, s, torch.ones_like(t)


class Network(Protocol):
    """Any F(x_in, noise_cond) -> output shaped like x_in."""

    def __call__(self, x: torch.Tensor, noise_cond: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Parametrization:
    """Which scalings wrap F, and the noise range they live on.

    kind "edm":    paper Appendix C scalings; c_noise = c_noise_scale * ln t (official code:
                   250).
    kind "linear": tutorial Eq. 18 blend; the network sees raw x and raw t.
    sigma_min = 0 turns "edm" into the EDM teacher's denoiser preconditioning.
    """

    kind: Literal["edm", "linear"] = "edm"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    c_noise_scale: float = OFFICIAL_C_NOISE_SCALE

    def scalings(self, t: torch.Tensor) -> Scalings:
        if self.kind == "edm":
            return boundary_scalings(t, self.sigma_data, self.sigma_min)
        return linear_scalings(t, self.sigma_min, self.sigma_max)

    def noise_cond(self, t: torch.Tensor) -> torch.Tensor:
        return c_noise(t, self.c_noise_scale) if self.kind == "edm" else t


class ConsistencyFunction(nn.Module):
    """f_theta(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)), paper Eq. 5.

    Wraps any network F. Because c_skip(eps) == 1 and c_out(eps) == 0 hold exactly in floating
    point, f_theta(x, eps) == x bit for bit, whatever F outputs (as long as it is finite).
    The same wrapper with ``Parametrization(sigma_min=0)`` is the EDM denoiser D_phi; that
    one network is also TrigFlow's F (:meth:`trigflow`), so an sCM student, its EDM teacher and
    an ECT student share one module. ``logvar`` is sCM's adaptive weight w_phi, when trained.
    """

    def __init__(
        self, net: nn.Module, parametrization: Parametrization, logvar: nn.Module | None = None
    ):
        super().__init__()
        self.net = net
        self.parametrization = parametrization
        self.logvar = logvar

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        *,
        trigflow: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """f(x, t) with t the noise level sigma; ``trigflow=True`` reads (x, t) as TrigFlow's
        (x_t, t) and returns :meth:`trigflow`'s (F, w_phi) instead (through ``forward``, so a
        DistributedDataParallel wrapper sees the call)."""
        if trigflow:
            return self.trigflow(x, t, class_labels)
        t = per_sample(t, x)
        skip, out, inp = self.parametrization.scalings(t)
        cond = self.parametrization.noise_cond(t.reshape(-1))
        return skip * x + out * self.net(inp * x, cond, **_labels(class_labels))

    def trigflow(
        self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sCM App. B.2 (TrigFlow from EDM): F(x_t / sigma_d, t) = -F_net(x_t / sigma_d,
        c_noise(sigma_d tan t)), and w_phi(t) (None without a weight head).

        With sigma = sigma_d tan t and x_sigma = x_t / cos t, EDM's scalings become
        c_skip = cos^2 t, c_out = sigma_d sin t, c_in x_sigma = x_t / sigma_d, so
        D(x_sigma, sigma) = cos t x_t - sin t sigma_d F: TrigFlow's f with this F, no division.
        """
        p = self.parametrization
        if p.kind != "edm" or p.sigma_min != 0:
            raise ValueError("TrigFlow needs EDM scalings without the eps shift (sigma_min = 0)")
        t = per_sample(t, x_t).reshape(-1)
        cond = p.noise_cond(p.sigma_data * torch.tan(t))
        F = -self.net(x_t / p.sigma_data, cond, **_labels(class_labels))
        return F, None if self.logvar is None else self.logvar(cond)


def _labels(class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    # Only class-conditional networks take labels; the rest keep F(x, c_noise).
    return {} if class_labels is None else {"class_labels": class_labels}


class ScoreDenoiser(nn.Module):
    """D_phi(x, t) = x + t^2 s_phi(x, t): a score network seen as a denoiser (Tweedie).

    Lets the tutorial's score-MLP teacher drive the same Euler/Heun steps as an EDM denoiser,
    since d(x, t) = (x - D(x, t)) / t = -t s(x, t) (paper Eq. 4).
    """

    def __init__(self, score_net: nn.Module):
        super().__init__()
        self.score_net = score_net

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = per_sample(t, x)
        return x + t**2 * self.score_net(x, t.reshape(-1))
