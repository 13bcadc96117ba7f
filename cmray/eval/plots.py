"""Figures of the 2D experiment, after the tutorial's Figs. 7-10 (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

DATA_STYLE = {"s": 2, "c": "tab:blue", "alpha": 0.25, "label": "data"}


def _finish(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _frame(ax: plt.Axes, lim: float, title: str) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)


def plot_trajectories(
    trajectory: list[torch.Tensor], data: torch.Tensor, lim: float, path: Path
) -> Path:
    """Fig. 7: PF-ODE trajectories of the teacher, from noise (red) to endpoints (green)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*data.T, **DATA_STYLE)
    path_xy = torch.stack(trajectory).numpy()  # [steps, n, 2]
    for i in range(path_xy.shape[1]):
        ax.plot(path_xy[:, i, 0], path_xy[:, i, 1], lw=0.6, c="gray", alpha=0.7)
    inside = (path_xy.__abs__() < lim).all(axis=2)
    first = path_xy[inside.argmax(axis=0), range(path_xy.shape[1])]
    ax.scatter(*first.T, s=10, c="tab:red", label="first point inside the frame")
    ax.scatter(*path_xy[-1].T, s=10, c="tab:green", label="endpoint")
    ax.legend(loc="upper right", fontsize=7)
    _frame(ax, lim, "Teacher PF-ODE trajectories")
    return _finish(fig, path)


def plot_onestep_mapping(
    x_T: torch.Tensor, mapped: torch.Tensor, data: torch.Tensor, lim: float, T: float, path: Path
) -> Path:
    """Fig. 9: one network evaluation takes x_T (shown scaled by lim / T) onto the ring."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*data.T, **DATA_STYLE)
    start = x_T * (lim / (2.5 * T))
    for a, b in zip(start, mapped, strict=True):
        ax.annotate(
            "", xy=b.tolist(), xytext=a.tolist(), arrowprops={"arrowstyle": "->", "lw": 0.5}
        )
    ax.scatter(*start.T, s=6, c="tab:red", label=f"x_T x {lim / (2.5 * T):.3g}")
    ax.scatter(*mapped.T, s=6, c="tab:orange", label="f(x_T, T)")
    ax.legend(loc="upper right", fontsize=7)
    _frame(ax, lim, "Consistency model: one-step mapping")
    return _finish(fig, path)


def plot_samples(
    data: torch.Tensor,
    samples: dict[str, torch.Tensor],
    lim: float,
    path: Path,
    cols: int | None = None,
) -> Path:
    """Figs. 8 and 10: each method's samples (orange) over the true distribution (blue), in
    rows of ``cols`` panels (one row by default)."""
    cols = cols or len(samples)
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(samples) :]:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, samples.items(), strict=False):
        ax.scatter(*data.T, **DATA_STYLE)
        ax.scatter(*x.T, s=2, c="tab:orange", alpha=0.5, label="samples")
        _frame(ax, lim, name)
    return _finish(fig, path)
