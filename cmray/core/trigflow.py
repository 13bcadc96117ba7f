"""Continuous-time consistency models in TrigFlow (sCM: Lu & Song 2024): pure PyTorch.

TrigFlow: x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2], and
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t). An EDM model at sigma = sigma_d tan t
sees x_sigma = x_t / cos t, so one network serves both (``ConsistencyFunction.trigflow``), and
a TrigFlow model is sampled with the EDM-time samplers at sigma_min = 0 (see :func:`sigma_of`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmray.core.tensors import mean_flat, per_sample

# sCM's two-step sampler evaluates at t = pi/2 and then at t_mid = 1.1.
T_MID = 1.1
TrigFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
JVPMethod = Literal["jvp", "fd"]


def time_of(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """sCM App. B.2, Eq. 30 (EDM to TrigFlow): t = arctan(sigma / sigma_d)."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_data))


def sigma_of(t: torch.Tensor | float, sigma_data: float) -> torch.Tensor | float:
    """sCM App. B.2, Eq. 30 inverted (TrigFlow to EDM): sigma = sigma_d tan t.

    A TrigFlow step to t, x_t = cos(t) x + sin(t) sigma_d z', is the EDM step x + sigma z' at
    this sigma seen through x_sigma = x_t / cos t, so Algorithm 1 at sigma_d tan(1.1) with no
    eps shift is sCM's two-step sampler.
    """
    return sigma_data * (torch.tan(t) if isinstance(t, torch.Tensor) else math.tan(t))


def x_t(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sCM Sec. 3 (TrigFlow diffusion process): x_t = cos(t) x_0 + sin(t) z."""
    t = per_sample(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sCM Eq. 4's v_t (sCT): dx_t/dt = cos(t) z - sin(t) x_0, from the data and the noise."""
    t = per_sample(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


def f_trigflow(
    x: torch.Tensor, t: torch.Tensor, F: torch.Tensor, sigma_data: float
) -> torch.Tensor:
    """sCM Eq. 5: f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)."""
    t = per_sample(t, x)
    return torch.cos(t) * x - torch.sin(t) * sigma_data * F


def tangent(
    F_minus: torch.Tensor,
    jvp: torch.Tensor,
    x: torch.Tensor,
    dxdt: torch.Tensor,
    t: torch.Tensor,
    sigma_data: float,
    r: float = 1.0,
) -> torch.Tensor:
    """sCM Eq. 6 times cos t (Algorithm 1): g = -cos^2 t (sigma_d F- - dx_t/dt)
    - r (cos t sin t x_t + sigma_d jvp),

    with ``jvp`` = cos t sin t dF-/dt (the JVP along tangents cos t sin t (dx_t/dt, 1)) and r the
    warm-up factor. At r = 1, g = cos(t) df-/dt: the consistency function's drift along the ODE.
    """
    t = per_sample(t, x)
    cos, sin = torch.cos(t), torch.sin(t)
    return -(cos**2) * (sigma_data * F_minus - dxdt) - r * (cos * sin * x + sigma_data * jvp)


def normalize_tangent(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """sCM Sec. 4.2 (tangent normalisation): g / (||g|| + c), each sample on its own."""
    norm = g.reshape(g.shape[0], -1).norm(dim=1)
    return g / per_sample(norm + c, g)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM Sec. 4.2 (tangent warm-up): r = min(1, step / warmup_steps)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_loss(
    F: torch.Tensor,
    F_minus: torch.Tensor,
    g: torch.Tensor,
    logvar: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """sCM Eq. 8 (adaptive weighting): ||F_theta - F- - g||^2 / (exp(w_phi(t)) D) + w_phi(t).

    ``logvar`` is w_phi(t) (None: weight 1, no log term); ``prior`` an optional extra weight
    per sample (sCM's 1/sigma). The mean over dimensions is the division by D.
    """
    loss = mean_flat((F - F_minus - g) ** 2)
    if prior is not None:
        loss = prior * loss
    if logvar is None:
        return loss
    return loss * torch.exp(-logvar) + logvar


def directional_derivative(
    fn: TrigFn,
    x: torch.Tensor,
    t: torch.Tensor,
    v_x: torch.Tensor,
    v_t: torch.Tensor,
    method: JVPMethod = "jvp",
    eps: float = 1e-4,
) -> torch.Tensor:
    """d/ds fn(x + s v_x, t + s v_t) at s = 0: forward-mode AD, or a central difference.

    ``jvp`` is exact; every operation carries a tangent beside its value, and SDPA's fused CPU
    and CUDA attention kernels have no forward-mode derivative, so the slower math backend
    runs inside it (``benchmarks/objective_cost.py`` measures the step). ``fd`` (step ``eps``
    along the tangent) needs two plain forwards, for networks forward AD cannot run.
    """
    if method == "jvp":
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, (x, t), (v_x, v_t))[1]
    plus = fn(x + eps * v_x, t + eps * v_t)
    minus = fn(x - eps * v_x, t - eps * v_t)
    return (plus - minus) / (2 * eps)
