"""The CT curriculum shared by the 2D and the image experiments: settings and N(k), mu(k)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cmray.config import ConfigError, param
from cmray.core import schedules


@dataclass
class CurriculumConfig:
    """Consistency training (paper Eq. 10, Algorithm 3) with an adaptive curriculum."""

    curriculum: Literal["ct", "ict"] = param(
        "ict",
        help="ict (recommended): iCT's doubling N(k), lognormal indices, no EMA target; ct: "
        "paper Appendix C N(k), mu(k)",
    )
    s0: int = param(0, help="initial discretisation (0: published, ict 10, ct 2)", ge=0)
    s1: int = param(0, help="final discretisation (0: published, ict 1280, ct 150)", ge=0)
    mu0: float = param(0.95, help="ct: EMA rate at k = 0 (LSUN, ImageNet 0.95)", ge=0, lt=1)
    mu_variant: Literal["official", "paper"] = param(
        "official", help="official: mu divides by N - 1 (published runs); paper: by N"
    )

    @property
    def bounds(self) -> tuple[int, int]:
        """(s0, s1), each 0 replaced by the curriculum's published value."""
        return schedules.ct_bounds(self.curriculum, self.s0, self.s1)

    def __post_init__(self) -> None:
        s0, s1 = self.bounds
        if s1 < s0:
            raise ConfigError(f"ct.s1 = {s1} must be >= ct.s0 = {s0}", key="ct.s1")


def ct_curriculum(ct: CurriculumConfig, k: int, K: int) -> tuple[int, float]:
    """(N(k), mu(k)): paper Appendix C, or iCT's exponential N(k) with mu = 0.

    Past K the curriculum stays at its final value rather than extrapolating beyond s1.
    """
    k, (s0, s1) = min(k, K), ct.bounds
    if ct.curriculum == "ict":
        return schedules.ict_N(k, K, s0, s1), 0.0
    return schedules.ct_schedule(k, K, s0, s1, ct.mu0, ct.mu_variant)


def ct_indices(
    curriculum: str, sigmas: torch.Tensor, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Interval indices n: uniform (Algorithm 3), or iCT's discretised lognormal (iCT Sec. 3.5)."""
    if curriculum == "ict":
        probs = schedules.lognormal_index_probs(sigmas)
        return schedules.sample_indices_from_probs(probs, batch, generator)
    return schedules.sample_uniform_indices(sigmas.numel(), batch, generator)
