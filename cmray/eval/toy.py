"""Distances between a 2D sample and the true ring mixture, and per-mode coverage."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

from cmray.core.sampling import SampleResult, sample_onestep
from cmray.data.toy import RingMixture
from cmray.eval.scores import mean_over_draws

T = TypeVar("T")


def _mean_offdiag(d: torch.Tensor) -> torch.Tensor:
    n = d.shape[0]
    return (d.sum() - d.diagonal().sum()) / (n * (n - 1))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased energy distance (Székely & Rizzo 2013): 2E|X-Y| - E|X-X'| - E|Y-Y'|.

    Zero in expectation when x and y come from the same distribution.
    """
    x, y = x.double(), y.double()
    cross = torch.cdist(x, y).mean()
    return float(2 * cross - _mean_offdiag(torch.cdist(x, x)) - _mean_offdiag(torch.cdist(y, y)))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared MMD with a Gaussian kernel of the given bandwidth (Gretton et al. 2012)."""
    x, y = x.double(), y.double()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(torch.cdist(a, b) ** 2) / (2 * bandwidth**2))

    return float(_mean_offdiag(k(x, x)) + _mean_offdiag(k(y, y)) - 2 * k(x, y).mean())


@dataclass
class ModeCoverage:
    """Where samples land relative to the mixture's modes.

    on_mode: fraction of samples within ``radius_in_std`` stds of their nearest mode.
    modes_hit: modes holding at least half their fair share of on-mode samples.
    per_mode: fraction of all samples on each mode (the ideal is 1 / modes each).
    """

    on_mode: float
    modes_hit: int
    per_mode: list[float]


def mode_coverage(x: torch.Tensor, ring: RingMixture, radius_in_std: float = 3.0) -> ModeCoverage:
    """Assign each sample to its nearest mode; count those within ``radius_in_std`` stds."""
    dist = torch.cdist(x.double(), ring.centers())
    nearest_dist, nearest = dist.min(dim=1)
    on = nearest_dist <= radius_in_std * ring.std
    counts = torch.bincount(nearest[on], minlength=ring.modes).double() / x.shape[0]
    fair = float(on.double().mean()) / ring.modes
    return ModeCoverage(
        on_mode=float(on.double().mean()),
        modes_hit=int((counts >= 0.5 * fair).sum()) if fair > 0 else 0,
        per_mode=[round(float(c), 4) for c in counts],
    )


TOY_METRIC = "energy_distance"  # the figure a toy search ranks trials by


def one_step_probe(
    ring: RingMixture, sigma_max: float, seed: int, samples: int, references: int
) -> Callable[[torch.nn.Module], float]:
    """``f -> energy distance`` of f's one-step samples to draws from the true ring, with the
    same noise and the same draws at every call (seeded as the 2D experiment's table is)."""
    reference = ring.sample(references, torch.Generator().manual_seed(seed + 1))
    z = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed + 3))

    @torch.no_grad()
    def probe(f: torch.nn.Module) -> float:
        return energy_distance(sample_onestep(f, z, sigma_max).x, reference)

    return probe


def quality_report(x: torch.Tensor, reference: torch.Tensor, ring: RingMixture) -> dict:
    """Energy distance, MMD (bandwidth = the mode std) and coverage of x against a reference."""
    return {
        "energy_distance": energy_distance(x, reference),
        "mmd": mmd_rbf(x, reference, bandwidth=ring.std),
        **asdict(mode_coverage(x, ring)),
    }


def timed(fn: Callable[[], T], repeats: int = 5) -> tuple[T, float]:
    """Run fn once to warm up, then ``repeats`` times; return a result and the median seconds
    (NaN for ``repeats = 0``: the result alone)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times) if times else math.nan


SPREAD = ("energy_distance", "mmd", "on_mode")  # the figures reported as mean and sd over draws


def over_draws(entries: list[dict]) -> dict:
    """One sampler's entries of several draws as one: each figure of ``SPREAD`` as the mean
    over draws with its spread; modes_hit as the fewest over draws (coverage is only as good
    as its worst draw); wall time and per-mode shares from the first draw."""
    out = mean_over_draws(entries, SPREAD, SPREAD)
    return out | {"modes_hit": min(e["modes_hit"] for e in entries)}


def evaluate_sampler(
    method: str,
    sample: Callable[[], SampleResult],
    reference: torch.Tensor,
    ring: RingMixture,
    repeats: int = 5,
) -> tuple[dict, torch.Tensor]:
    """One results-table entry: method, NFE, median wall time, distances and coverage."""
    result, seconds = timed(sample, repeats)
    entry = {"method": method, "nfe": result.nfe, "wall_time_s": seconds}
    return entry | quality_report(result.x, reference, ring), result.x


def format_table(entries: list[dict]) -> str:
    """The results as a fixed-width text table: energy distance as mean +- sd over the draws
    and as a ratio to the first entry's (the teacher's), MMD and on-mode share as means."""
    draws = entries[0].get("draws", 1)
    head = (
        f"{'method':<22}{'NFE':>5}{'wall s':>10}{'energy (sd)':>20}{'/ first':>9}{'MMD':>10}"
        f"{'on-mode':>9}{'modes':>7}"
    )
    base = entries[0]["energy_distance"]
    rows = [
        f"{e['method']:<22}{e['nfe']:>5}{e['wall_time_s']:>10.4f}"
        f"{e['energy_distance']:>11.4f} +- {e.get('energy_distance_sd', 0.0):<6.4f}"
        f"{e['energy_distance'] / base:>8.2f}x{e['mmd']:>10.5f}{e['on_mode']:>9.3f}"
        f"{e['modes_hit']:>5}/{len(e['per_mode'])}"
        for e in entries
    ]
    note = f"(figures: mean over {draws} draws; modes: the fewest hit in any draw)"
    return "\n".join([head, "-" * len(head), *rows, note])
