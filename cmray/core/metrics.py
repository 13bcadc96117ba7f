"""Distances d(x, y) for the consistency losses, each returning one value per sample [B].

Paper Sec. 3 (Eq. 7, 10): d is any metric with d(x, y) >= 0 and d(x, x) = 0; the paper uses
squared l2, l1 and LPIPS; iCT (Song & Dhariwal 2023, Sec. 3.3) adds pseudo-Huber.
l2 and l1 average over dimensions as the official code's ``mean_flat`` does, so published
learning rates carry over. LPIPS lives in ``cmray.core.lpips`` (it needs backbone weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cmray.core.tensors import mean_flat, sum_flat

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METRIC_NAMES = ("l2", "l1", "lpips", "pseudo_huber")


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared l2 distance, paper Sec. 3: d(x, y) = ||x - y||_2^2 (mean over dimensions)."""
    return mean_flat((x - y) ** 2)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l1 distance, paper Sec. 3: d(x, y) = ||x - y||_1 (mean over dimensions)."""
    return mean_flat((x - y).abs())


def pseudo_huber_c(dim: int) -> float:
    """iCT Sec. 3.3: c = 0.00054 sqrt(d), d = C * H * W."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """iCT Sec. 3.3: d(x, y) = sqrt(||x - y||_2^2 + c^2) - c, on each sample's full norm."""
    if c is None:
        c = pseudo_huber_c(x[0].numel())
    if c == 0:
        # The plain l2 norm (ECT's c = 0), whose gradient at x = y is 0, not sqrt's 0 * inf:
        # in float32 x_t and x_r round to the same point for tiny t - r, and one NaN
        # gradient would stall the run.
        return torch.linalg.vector_norm((x - y).reshape(x.shape[0], -1), dim=1)
    return torch.sqrt(sum_flat((x - y) ** 2) + c**2) - c


def get_metric(name: str, lpips: Metric | None = None) -> Metric:
    """The metric by its config name; LPIPS needs its loaded module passed in."""
    simple: dict[str, Metric] = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}
    if name in simple:
        return simple[name]
    if name == "lpips":
        if lpips is None:
            raise ValueError("metric 'lpips' needs a loaded LPIPSDistance (cmray.core.lpips)")
        return lpips
    raise ValueError(f"metric {name!r}: choose one of {', '.join(METRIC_NAMES)}")
