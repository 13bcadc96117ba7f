"""One step of the empirical PF ODE, for the CD teacher and the teacher's own sampler.

Paper Eq. 4 (EDM form): dx/dt = -t s_phi(x, t) = (x - D_phi(x, t)) / t.
Paper Eq. 6 / Algorithm 2: the teacher's one-step estimate x̂_{t_n} from x_{t_{n+1}}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from cmray.core.tensors import per_sample

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Solver = Literal["euler", "heun"]


def pf_ode_derivative(x: torch.Tensor, t: torch.Tensor | float, D: Denoiser) -> torch.Tensor:
    """Paper Eq. 4: d(x, t) = (x - D_phi(x, t)) / t."""
    return (x - D(x, t)) / per_sample(t, x)


def euler_step(
    x: torch.Tensor, t_cur: torch.Tensor | float, t_next: torch.Tensor | float, D: Denoiser
) -> torch.Tensor:
    """Paper Eq. 6 with Euler: x̂_{t_n} = x_{t_{n+1}} + (t_n - t_{n+1}) d(x_{t_{n+1}}, t_{n+1})."""
    h = per_sample(t_next, x) - per_sample(t_cur, x)
    return x + h * pf_ode_derivative(x, t_cur, D)


def heun_step(
    x: torch.Tensor, t_cur: torch.Tensor | float, t_next: torch.Tensor | float, D: Denoiser
) -> torch.Tensor:
    """Paper Eq. 6 with Heun (EDM Alg. 1): Euler predictor, then trapezoidal correction."""
    h = per_sample(t_next, x) - per_sample(t_cur, x)
    d = pf_ode_derivative(x, t_cur, D)
    # Euler step.
    x_euler = x + h * d
    # Apply 2nd order correction.
    d_prime = pf_ode_derivative(x_euler, t_next, D)
    return x + h * (d + d_prime) / 2


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler_step, "heun": heun_step}
NFE_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2}


def ode_step(
    x: torch.Tensor,
    t_cur: torch.Tensor | float,
    t_next: torch.Tensor | float,
    D: Denoiser,
    solver: Solver | Callable[..., torch.Tensor] = "heun",
) -> torch.Tensor:
    """One solver step by name (paper Fig. 3b: Heun beats Euler at equal N), or any callable
    with the same signature, e.g. an exact ODE map in tests."""
    if callable(solver):
        return solver(x, t_cur, t_next, D)
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r}: choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver](x, t_cur, t_next, D)
