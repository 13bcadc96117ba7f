"""Writing image tensors to files (sample grids, editing panels).

Every grid cmray writes (files, MLflow images, editing panels) shows each image at least
``MIN_TILE`` pixels wide, enlarged by an integer nearest-neighbour factor: a 16x16 digit drawn
at its own size is a speck a person cannot judge, and nearest neighbour adds no detail the
model did not produce.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

MIN_TILE = 64  # pixels: the smallest tile a person can read a 16x16 sample from


def upscale_factor(size: int, min_tile: int = MIN_TILE) -> int:
    """The integer factor that brings a ``size``-pixel image to at least ``min_tile`` pixels."""
    return max(1, math.ceil(min_tile / size))


def grid_array(images: torch.Tensor, min_tile: int = MIN_TILE) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] as one uint8 HWC grid of about sqrt(N) columns (the array
    MLflow's image log takes, and what :func:`save_grid` writes), each image enlarged by
    nearest neighbour to at least ``min_tile`` pixels."""
    from torchvision.utils import make_grid

    unit = images.detach().float().cpu().add(1).div(2).clamp(0, 1)
    factor = upscale_factor(min(unit.shape[-2:]), min_tile)
    if factor > 1:
        unit = unit.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
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
