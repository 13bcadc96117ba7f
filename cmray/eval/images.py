"""Writing image tensors to files (sample grids, editing panels, samples for other scorers).

Every grid cmray writes (files, MLflow images, editing panels) shows each image at least
``MIN_TILE`` pixels wide, enlarged by an integer nearest-neighbour factor: a 16x16 digit drawn
at its own size is a speck a person cannot judge, and nearest neighbour adds no detail the
model did not produce.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from cmray.storage import write_bytes_atomic

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


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] as uint8 [N, H, W, C], rounded as every grid is."""
    unit = images.detach().float().cpu().add(1).div(2).clamp(0, 1)
    return unit.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_format(out: str | os.PathLike[str]) -> str:
    """How ``--out`` is written: ``npz`` (FILE.npz), ``pngs`` (DIR/, or an existing directory)
    or ``grid`` (FILE.png); anything else is a ``ValueError`` naming what is accepted."""
    text = os.fspath(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "pngs"
    suffix = Path(text).suffix.lower()
    if suffix in (".npz", ".png"):
        return "npz" if suffix == ".npz" else "grid"
    raise ValueError(
        f"--out {text}: accepted: FILE.png (a grid), FILE.npz (arr_0: N x H x W x C uint8) or "
        "DIR/ (one PNG per sample)"
    )


def save_samples(images: torch.Tensor, out: str | os.PathLike[str]) -> str:
    """Write [-1, 1] samples as :func:`sample_format` says, all at once or not at all: the
    reference evaluator of openai/guided-diffusion reads the ``.npz`` (``arr_0``), and EDM's
    ``fid.py``, clean-fid and torch-fidelity read a directory of PNGs. Returns the format."""
    fmt, path = sample_format(out), Path(out)
    if fmt == "pngs" and path.exists() and any(path.iterdir()):
        raise ValueError(f"--out {out}: the directory is not empty; give a new or empty one")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "grid":
        write_bytes_atomic(str(path), grid_png(images))
    elif fmt == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=to_uint8_nhwc(images))
        write_bytes_atomic(str(path), buffer.getvalue())
    else:
        _atomic_pngs(to_uint8_nhwc(images), path)
    return fmt


def _atomic_pngs(arrays: np.ndarray, path: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"))
    try:
        width = max(5, len(str(len(arrays) - 1)))
        for i, array in enumerate(arrays):
            image = array[..., 0] if array.shape[-1] == 1 else array
            Image.fromarray(image).save(tmp / f"{i:0{width}d}.png", format="png")
        if path.exists():
            path.rmdir()  # empty, checked above
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
