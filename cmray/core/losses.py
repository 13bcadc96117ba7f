"""Training objectives: consistency distillation and training, ECT, and teacher denoising.

Paper: CD Eq. 7 (Algorithm 2), CT Eq. 10 (Algorithm 3). Every function returns a per-sample
loss [B]; the caller reduces it. Randomness (data, noise z, indices n, sigmas) comes in as
arguments so every objective is a deterministic function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmray.core.metrics import Metric, pseudo_huber
from cmray.core.solvers import Denoiser, Solver, ode_step
from cmray.core.tensors import mean_flat, per_sample

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lambda_uniform(t_n: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Paper Sec. 5: lambda(t_n) = 1 in all published runs."""
    return torch.ones_like(t_n)


def lambda_ict(t_n: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """iCT Sec. 3.2: lambda(t_n) = 1 / (t_{n+1} - t_n)."""
    return 1.0 / (t_next - t_n)


LAMBDAS: dict[str, Weighting] = {"uniform": lambda_uniform, "ict": lambda_ict}


@dataclass(frozen=True)
class RNGState:
    """Generator states to replay, so two network calls draw the same dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device


def capture_rng_state(device: torch.device | str) -> RNGState:
    """Snapshot the CPU generator and, on CUDA, the device's generator too.

    The official code saved only the CPU state, so on GPUs its two calls drew different masks.
    """
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RNGState(torch.get_rng_state(), cuda, device)


def restore_rng_state(state: RNGState) -> None:
    """Rewind the generators captured by ``capture_rng_state``."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, state.device)


def consistency_loss(
    f_online: ConsistencyFn,
    f_target: ConsistencyFn,
    x_next: torch.Tensor,
    t_next: torch.Tensor,
    x_prev: torch.Tensor,
    t_prev: torch.Tensor,
    metric: Metric,
    weighting: Weighting = lambda_uniform,
) -> torch.Tensor:
    """Paper Eq. 7/10: lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_{t_n}, t_n)).

    The target branch gets no gradient (theta- = stopgrad) and replays the online branch's
    dropout masks.
    """
    rng = capture_rng_state(x_next.device)
    online = f_online(x_next, t_next)
    restore_rng_state(rng)
    with torch.no_grad():
        target = f_target(x_prev, t_prev)
    return weighting(t_prev, t_next) * metric(online, target)


def adjacent_sigmas(sigmas: torch.Tensor, n: torch.Tensor, x: torch.Tensor):
    """(t_n, t_{n+1}) for 0-based interval indices n on an ascending grid, in x's dtype."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    n = n.to(x.device)
    return sigmas[n], sigmas[n + 1]


def cd_loss(
    f_online: ConsistencyFn,
    f_target: ConsistencyFn,
    teacher: Denoiser,
    x0: torch.Tensor,
    z: torch.Tensor,
    n: torch.Tensor,
    sigmas: torch.Tensor,
    metric: Metric,
    solver: Solver = "heun",
    weighting: Weighting = lambda_uniform,
) -> torch.Tensor:
    """Consistency distillation, paper Eq. 7 / Algorithm 2 (one Euler or Heun teacher step)."""
    t_n, t_next = adjacent_sigmas(sigmas, n, x0)
    x_next = x0 + per_sample(t_next, x0) * z
    with torch.no_grad():
        x_hat = ode_step(x_next, t_next, t_n, teacher, solver)
    return consistency_loss(f_online, f_target, x_next, t_next, x_hat, t_n, metric, weighting)


def ct_loss(
    f_online: ConsistencyFn,
    f_target: ConsistencyFn,
    x0: torch.Tensor,
    z: torch.Tensor,
    n: torch.Tensor,
    sigmas: torch.Tensor,
    metric: Metric,
    weighting: Weighting = lambda_uniform,
) -> torch.Tensor:
    """Consistency training, paper Eq. 10 / Algorithm 3: the same z at both noise levels."""
    t_n, t_next = adjacent_sigmas(sigmas, n, x0)
    x_next = x0 + per_sample(t_next, x0) * z
    x_n = x0 + per_sample(t_n, x0) * z
    return consistency_loss(f_online, f_target, x_next, t_next, x_n, t_n, metric, weighting)


def ect_n(t: torch.Tensor, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT (Geng et al. 2024) mapping function, as its released code: n(t) = 1 + k sigmoid(-b t)."""
    return 1.0 + k * torch.sigmoid(-b * t)


def ect_r(t: torch.Tensor, stage: int, q: float = 4.0, k: float = 8.0, b: float = 1.0):
    """ECT mapping function: r = max(0, t (1 - q^-(s+1) n(t))); r -> t as the stage s grows."""
    return (t * (1.0 - q ** -(stage + 1) * ect_n(t, k, b))).clamp(min=0.0)


def ect_weight(t: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """ECT weighting "snrpk" (its ImageNet code, after EDM2): w(t) = 1 / t^2 + 1 / sigma_d^2."""
    return 1.0 / t**2 + 1.0 / sigma_data**2


def ect_weight_gap(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """ECT weighting w(t, r) = 1 / (t - r) (paper Sec. 3; its CIFAR-10 code, main branch):
    with the l2 norm, the loss is a finite-difference estimate of ||df/dt||."""
    return 1.0 / (t - r)


ECT_WEIGHTINGS = ("gap", "snrpk")


def ect_target(
    f_target: ConsistencyFn, x0: torch.Tensor, z: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """ECT target: stopgrad f(x_0 + r z, r), and x_0 itself where r = 0 (f(x, 0) = x)."""
    with torch.no_grad():
        target = f_target(x0 + per_sample(r, x0) * z, r)
    return torch.where(per_sample(r, x0) > 0, target, x0)


def ect_loss(
    f_online: ConsistencyFn,
    f_target: ConsistencyFn,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    c: float = 0.0,
    sigma_data: float = 0.5,
    weighting: str = "snrpk",
) -> torch.Tensor:
    """ECT loss: w (sqrt(||f(x_t, t) - stopgrad f(x_r, r)||^2 + c^2) - c), the same z for x_t
    and x_r and the same dropout mask in both calls; c = 0 is the plain l2 norm; w is
    ``weighting``: "gap" 1 / (t - r) or "snrpk" 1 / t^2 + 1 / sigma_d^2."""
    t, r = t.to(device=x0.device, dtype=x0.dtype), r.to(device=x0.device, dtype=x0.dtype)
    rng = capture_rng_state(x0.device)
    online = f_online(x0 + per_sample(t, x0) * z, t)
    restore_rng_state(rng)
    target = ect_target(f_target, x0, z, r)
    w = ect_weight_gap(t, r) if weighting == "gap" else ect_weight(t, sigma_data)
    return w * pseudo_huber(online, target, c)


def boundary_loss(
    f: ConsistencyFn, x0: torch.Tensor, z: torch.Tensor, sigma_min: float
) -> torch.Tensor:
    """Tutorial Eq. 20: L_bc = ||f(x + eps z', eps) - x||^2.

    Redundant under the Eq. 5 parametrization (f(x, eps) = x already), kept as the tutorial did.
    """
    eps = torch.full((x0.shape[0],), sigma_min, dtype=x0.dtype, device=x0.device)
    return mean_flat((f(x0 + sigma_min * z, eps) - x0) ** 2)


def edm_sigma(
    batch: int, P_mean: float, P_std: float, generator: torch.Generator | None
) -> torch.Tensor:
    """EDM Table 1 training noise: ln sigma ~ N(P_mean, P_std^2)."""
    return (torch.randn(batch, generator=generator, dtype=torch.float64) * P_std + P_mean).exp()


def edm_loss(
    D: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, sigma_data: float
) -> torch.Tensor:
    """EDM Eq. 2 / Table 1: lambda(sigma) ||D(x + sigma z, sigma) - x||^2,
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    sigma = sigma.to(device=x0.device, dtype=x0.dtype)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight * mean_flat((D(x0 + per_sample(sigma, x0) * z, sigma) - x0) ** 2)


def dsm_loss(
    score: ConsistencyFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    weighting: str = "t2",
) -> torch.Tensor:
    """Denoising score matching, tutorial Sec. 4: ||s(x + t z, t) + (x_t - x) / t^2||^2.

    weighting "none" is the tutorial's plain MSE; "t2" multiplies by t^2 (Song et al. 2021),
    which keeps the tiny-t targets (|z|/t up to 500 at eps) from swamping the loss.
    """
    t = t.to(device=x0.device, dtype=x0.dtype)
    tt = per_sample(t, x0)
    residual = score(x0 + tt * z, t) + z / tt
    weight = t**2 if weighting == "t2" else torch.ones_like(t)
    return weight * mean_flat(residual**2)
