"""Noise-level grids and training curricula.

Paper: Song et al., "Consistency Models", ICML 2023 (Sec. 4, Appendix C).
iCT:   Song & Dhariwal, "Improved Techniques for Training Consistency Models", 2023 (Sec. 3.4-3.5).

Conventions: grids are ascending, t_1 = sigma_min < ... < t_N = sigma_max, stored 0-based, so the
paper's pair (t_n, t_{n+1}) is ``(sigmas[n], sigmas[n + 1])`` with ``n`` in ``0 .. N - 2``. The
official code indexes the same grid descending (index 0 = sigma_max); ``karras_sigma_at_index``
converts those indices.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MuVariant = Literal["official", "paper"]


def karras_sigmas(
    N: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Karras grid, paper Sec. 4 / Appendix C (EDM Eq. 5), ascending.

    t_i = (eps^(1/rho) + (i - 1) / (N - 1) * (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N.
    """
    if N < 2:
        raise ValueError(f"N = {N}: a Karras grid needs N >= 2 points")
    ramp = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    # Pin the ends so the boundary t_1 == sigma_min holds exactly, not to pow() rounding.
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.to(dtype)


def karras_sigma_at_index(
    i: int | torch.Tensor,
    N: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> float | torch.Tensor:
    """Grid value at the official code's descending index i (0 = sigma_max, N - 1 = sigma_min).

    Same grid as ``karras_sigmas`` (Appendix C), read from the other end, as the official
    multistep sampler's ``ts`` lists (e.g. LSUN CD two-step: 0, 17, 39 of N = 40) are given.
    """
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i / (N - 1) * (lo - hi)) ** rho


def ct_N(k: int, K: int, s0: int, s1: int) -> int:
    """Adaptive discretisation N(k), paper Appendix C (CT schedule function).

    N(k) = ceil(sqrt(k/K * ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, with the official code's
    clamp of the inner term to >= 1.
    """
    inner = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(inner, 1) + 1


def ct_mu(N: int, s0: int, mu0: float, variant: MuVariant = "official") -> float:
    """Adaptive target-EMA rate mu(k), paper Appendix C.

    paper:    mu(k) = exp(s0 * ln(mu0) / N(k))
    official: mu(k) = exp(s0 * ln(mu0) / (N(k) - 1)), which produced the published results.
    """
    if variant == "official":
        denominator = N - 1
    elif variant == "paper":
        denominator = N
    else:
        raise ValueError(f"mu variant {variant!r}: choose 'official' or 'paper'")
    if mu0 == 0:
        return 0.0  # the limit: no EMA target (the target is the online net, as in iCT)
    return math.exp(s0 * math.log(mu0) / denominator)


def ct_schedule(
    k: int, K: int, s0: int, s1: int, mu0: float, variant: MuVariant = "official"
) -> tuple[int, float]:
    """CT curriculum (N(k), mu(k)) at training step k of K, paper Appendix C."""
    N = ct_N(k, K, s0, s1)
    return N, ct_mu(N, s0, mu0, variant)


# Each curriculum's published discretisation (s0, s1): iCT (Song and Dhariwal 2023, Sec. 3.4,
# 10 doubling to 1280) and the paper's CT (openai/consistency_models' CIFAR-10 and LSUN launch
# commands, 2 to 150).
CT_PUBLISHED = {"ict": (10, 1280), "ct": (2, 150)}


def ct_bounds(curriculum: str, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """(s0, s1) of a curriculum, where 0 stands for its published value."""
    published = CT_PUBLISHED[curriculum]
    return s0 or published[0], s1 or published[1]


def ict_N(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT exponential curriculum, Song & Dhariwal 2023 Sec. 3.4.

    N(k) = min(s0 * 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)).
    """
    # A run shorter than the number of doublings (K' = 0 by the formula) doubles every step.
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** math.floor(k / K_prime), s1) + 1


def lognormal_index_probs(
    sigmas: torch.Tensor, P_mean: float = -1.1, P_std: float = 2.0
) -> torch.Tensor:
    """Discretised lognormal p(n) over the N - 1 grid intervals, iCT Sec. 3.5.

    p(n) ∝ erf((ln t_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln t_n - P_mean) / (sqrt2 P_std)).
    """
    cdf = torch.erf((torch.log(sigmas.double()) - P_mean) / (math.sqrt(2.0) * P_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def sample_uniform_indices(N: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """n ~ U{1, ..., N-1} (paper Alg. 2/3), returned 0-based in 0 .. N - 2."""
    return torch.randint(0, N - 1, (batch,), generator=generator)


def sample_indices_from_probs(
    probs: torch.Tensor, batch: int, generator: torch.Generator | None
) -> torch.Tensor:
    """n ~ p(n) over grid intervals (iCT Sec. 3.5), 0-based in 0 .. N - 2."""
    return torch.multinomial(probs, batch, replacement=True, generator=generator)
