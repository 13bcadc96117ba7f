"""The tutorial's 2D network (Sec. 4): sinusoidal time embedding + a two-layer SiLU MLP.

Used as the teacher's score network s_phi(x, t) and as the student's F_theta(x, t); the
consistency wrapper (``cmray.core.parametrization``) turns the latter into f_theta.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Log-spaced sin/cos features of a scalar (dim/2 of each), then a linear projection."""

    def __init__(self, dim: int = 64, max_period: float = 10_000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=1))


class ToyMLP(nn.Module):
    """x (2D) ++ emb(t) -> hidden (SiLU) -> ... -> 2D output, as in the tutorial's Sec. 4.

    ``log_time`` feeds ln(t) to the embedding instead of t: t spans 0.002..80, and raw t
    leaves the small-noise end (where the ring's modes are resolved) nearly indistinguishable.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 64,
        depth: int = 2,
        emb_dim: int = 64,
        log_time: bool = True,
    ):
        super().__init__()
        self.log_time = log_time
        self.embed = SinusoidalEmbedding(emb_dim)
        layers: list[nn.Module] = []
        width = dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).to(x.dtype).expand(x.shape[0])
        cond = torch.log(t) if self.log_time else t
        return self.mlp(torch.cat([x, self.embed(cond)], dim=1))
