"""``cmray edit``: zero-shot editing of an image with a trained consistency model (Algorithm 4).

Reads the model from a checkpoint directory or URL, the image (and mask) from PNG/JPEG files,
and writes one PNG with the panels side by side: the input, the constrained input where the
task has one (masked, grey or low-resolution), and the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmray.core import editing
from cmray.core.schedules import karras_sigma_at_index

TASKS = ("inpaint", "colorize", "super_resolution", "stroke", "denoise", "interpolate")
# Four of the paper's 40-point LSUN grid (descending indices 0, 10, 20, 30): a few refinement
# steps, as the paper's editing figures use, without ending on eps (where f is the identity).
DEFAULT_SIGMAS = tuple(float(karras_sigma_at_index(i, 40)) for i in (0, 10, 20, 30))


def read_image(path: str | Path, resolution: int, mode: str = "RGB") -> torch.Tensor:
    """[1, C, R, R] in [-1, 1]; resized (BOX) to the model's resolution if it differs."""
    img = Image.open(path).convert(mode)
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BOX)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).reshape(resolution, resolution, -1)
    return (x.permute(2, 0, 1) / 127.5 - 1).unsqueeze(0)


def read_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """[1, 1, R, R] with 1 where the mask is white (the region to generate)."""
    return (read_image(path, resolution, "L") > 0).float()


def side_by_side(panels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Panels of [1, C, H, W] (grey ones are repeated to RGB) as one [1, 3, H, W * k] image."""
    rgb = [p.expand(-1, 3, -1, -1) if p.shape[1] == 1 else p for p in panels]
    return torch.cat(rgb, dim=3)


def run_edit(
    f: torch.nn.Module,
    task: str,
    resolution: int,
    image: str | None,
    mask: str | None,
    sigmas: Sequence[float],
    factor: int,
    sigma: float,
    seed: int,
    clip: bool = True,
    eps: float = 0.002,
) -> torch.Tensor:
    """The side-by-side panel image for one task, in [-1, 1]; ``clip`` clamps each denoised
    estimate before the projection (Algorithm 4 as the reference runs it); ``eps`` is the
    model's boundary (``ModelConfig.boundary``: 0 for ECT and sCM)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "clip": editing.CLIP if clip else None, "eps": eps}
    ts = list(sigmas)
    if task == "interpolate":
        z1, z2 = (torch.randn(1, 3, resolution, resolution, generator=g) for _ in range(2))
        alphas = torch.linspace(0, 1, 8).tolist()
        frames = editing.interpolate(f, z1, z2, alphas, ts[0])
        return side_by_side(list(frames.split(1)))
    if image is None:
        raise ValueError(f"task {task!r} needs --input")
    x = read_image(image, resolution)
    if task == "inpaint":
        if mask is None:
            raise ValueError("task 'inpaint' needs --mask (white = the region to fill)")
        missing = read_mask(mask, resolution)
        result = editing.inpaint(f, x, missing, ts, **kw)
        return side_by_side([x, x * (1 - missing), result])  # the hole shows mid-grey
    if task == "colorize":
        gray = read_image(image, resolution, "L")
        return side_by_side([x, gray, editing.colorize(f, gray, ts, **kw)])
    if task == "super_resolution":
        low = torch.nn.functional.avg_pool2d(x, factor)
        shown = torch.nn.functional.interpolate(low, scale_factor=factor, mode="nearest")
        return side_by_side([x, shown, editing.super_resolve(f, low, factor, ts, **kw)])
    if task == "stroke":
        return side_by_side([x, editing.stroke_guided(f, x, ts, **kw)])
    if task == "denoise":
        noisy = x + sigma * torch.randn(x.shape, generator=g)
        return side_by_side([x, noisy.clamp(-1, 1), editing.denoise(f, noisy, sigma)])
    raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
