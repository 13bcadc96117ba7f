"""Writing image tensors to files (sample grids, editing panels)."""

from __future__ import annotations

import os

import torch


def save_grid(images: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """[-1, 1] images [N, C, H, W] as one PNG grid of about sqrt(N) columns."""
    from torchvision.utils import save_image

    save_image(images.add(1).div(2).clamp(0, 1), path, nrow=max(1, int(len(images) ** 0.5)))
