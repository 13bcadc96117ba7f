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
        "ct", help="ct: paper Appendix C N(k), mu(k); ict: exponential N(k), mu = 0"
    )
    s0: int = param(10, help="initial discretisation", ge=1)
    s1: int = param(150, help="final discretisation", ge=1)
    mu0: float = param(0.95, help="ct: EMA rate at k = 0", ge=0, lt=1)
    mu_variant: Literal["official", "paper"] = param(
        "official", help="official: mu divides by N - 1 (published runs); paper: by N"
    )

    def __post_init__(self) -> None:
        if self.s1 < self.s0:
            raise ConfigError(f"ct.s1 = {self.s1} must be >= ct.s0 = {self.s0}", key="ct.s1")


def ct_curriculum(ct: CurriculumConfig, k: int, K: int) -> tuple[int, float]:
    """(N(k), mu(k)): paper Appendix C, or iCT's exponential N(k) with mu = 0.

    Past K the curriculum stays at its final value rather than extrapolating beyond s1.
    """
    k = min(k, K)
    if ct.curriculum == "ict":
        return schedules.ict_N(k, K, ct.s0, ct.s1), 0.0
    return schedules.ct_schedule(k, K, ct.s0, ct.s1, ct.mu0, ct.mu_variant)


def ct_indices(
    curriculum: str, sigmas: torch.Tensor, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Interval indices n: uniform (Algorithm 3), or iCT's discretised lognormal (iCT Sec. 3.5)."""
    if curriculum == "ict":
        probs = schedules.lognormal_index_probs(sigmas)
        return schedules.sample_indices_from_probs(probs, batch, generator)
    return schedules.sample_uniform_indices(sigmas.numel(), batch, generator)
