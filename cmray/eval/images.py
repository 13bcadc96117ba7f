"""Writing image tensors to files (sample grids, editing panels)."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import torch


def save_grid(images: torch.Tensor, path: str | os.PathLike[str] | BinaryIO) -> None:
    """[-1, 1] images [N, C, H, W] as one PNG grid of about sqrt(N) columns."""
    from torchvision.utils import save_image

    grid = images.add(1).div(2).clamp(0, 1)
    save_image(grid, path, nrow=max(1, int(len(images) ** 0.5)), format="png")


def grid_png(images: torch.Tensor) -> bytes:
    """The PNG bytes of :func:`save_grid`, for writing to object storage in one put."""
    buffer = io.BytesIO()
    save_grid(images, buffer)
    return buffer.getvalue()
