"""Writing image tensors to files (sample grids, editing panels)."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image


def grid_array(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] as one uint8 HWC grid of about sqrt(N) columns (the array
    MLflow's image log takes, and what :func:`save_grid` writes)."""
    from torchvision.utils import make_grid

    unit = images.detach().float().cpu().add(1).div(2).clamp(0, 1)
    grid = make_grid(unit, nrow=max(1, int(len(images) ** 0.5)))
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | os.PathLike[str] | BinaryIO) -> None:
    """[-1, 1] images [N, C, H, W] as one PNG grid of about sqrt(N) columns."""
    Image.fromarray(grid_array(images)).save(path, format="png")


def grid_png(images: torch.Tensor) -> bytes:
    """The PNG bytes of :func:`save_grid`, for writing to object storage in one put."""
    buffer = io.BytesIO()
    save_grid(images, buffer)
    return buffer.getvalue()
