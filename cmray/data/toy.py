"""The tutorial's 2D data (Sec. 4): a ring-shaped mixture of isotropic Gaussians."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RingMixture:
    """``modes`` equal-weight Gaussians of std ``std`` evenly spaced on a circle of ``radius``."""

    modes: int = 8
    radius: float = 4.0
    std: float = 0.2

    def centers(self) -> torch.Tensor:
        angles = 2 * math.pi * torch.arange(self.modes, dtype=torch.float64) / self.modes
        return self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)

    def sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """n i.i.d. points, float32 [n, 2]."""
        which = torch.randint(0, self.modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers()[which] + self.std * noise).float()

    def sigma_data(self) -> float:
        """Per-coordinate std of the mixture: sqrt(radius^2 / 2 + std^2)."""
        return math.sqrt(self.radius**2 / 2 + self.std**2)
