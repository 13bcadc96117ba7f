"""Shape helpers shared by the math modules."""

from __future__ import annotations

import torch


def per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or [B] noise level to x's shape: [B, 1, ..., 1], in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch one: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
