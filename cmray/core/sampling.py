"""Samplers. Each returns the sample and the number of network evaluations (NFE) it made.

Paper Sec. 3: one step x = f(x_T, T); Algorithm 1: multistep consistency sampling.
The teacher baseline integrates the empirical PF ODE (paper Eq. 4) with Euler or Heun steps.
Noise comes in as arguments (x_T and a generator), never from global state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cmray.core.schedules import karras_sigma_at_index, karras_sigmas
from cmray.core.solvers import NFE_PER_STEP, Denoiser, Solver, ode_step

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """A batch of samples and how many network evaluations produced it."""

    x: torch.Tensor
    nfe: int


def in_batches(
    f: ConsistencyFn, size: int, class_labels: torch.Tensor | None = None
) -> ConsistencyFn:
    """``f`` called on sub-batches of at most ``size`` samples, each with its own rows of
    ``class_labels`` for a class-conditional model.

    Bounds activation memory (a 256x256 ADM forward holds about 0.6 GiB per image) while the
    samplers still draw their noise for the whole batch, so the samples do not depend on ``size``.
    """
    if size < 1:
        raise ValueError(f"sub-batch size {size}: must be at least 1")

    def call(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return f(x, t) if labels is None else f(x, t, class_labels=labels)

    def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= size:
            return call(x, t, class_labels)
        rows = [None] * len(x.split(size)) if class_labels is None else class_labels.split(size)
        parts = zip(x.split(size), t.split(size), rows, strict=True)
        return torch.cat([call(xb, tb, yb) for xb, tb, yb in parts])

    return batched


def class_labels(
    num_classes: int, count: int, label: int | None, gen: torch.Generator
) -> torch.Tensor | None:
    """Labels for ``count`` samples of a model with ``num_classes`` classes: all ``label``, or
    drawn uniformly (as the reference's sampler does); None for an unconditional model."""
    if not num_classes:
        if label is not None:
            raise ValueError(f"class {label}: this model is unconditional; drop --class")
        return None
    if label is None:
        return torch.randint(num_classes, (count,), generator=gen)
    if not 0 <= label < num_classes:
        raise ValueError(f"class {label}: accepted 0 <= class < {num_classes}")
    return torch.full((count,), label, dtype=torch.long)


def _full(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _clip(x: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor:
    return x if clip is None else x.clamp(*clip)


@torch.no_grad()
def sample_onestep(
    f: ConsistencyFn,
    z: torch.Tensor,
    sigma_max: float = 80.0,
    clip: tuple[float, float] | None = None,
) -> SampleResult:
    """Paper Sec. 3, one-step generation: x_T = T z, x = f(x_T, T)."""
    return SampleResult(_clip(f(sigma_max * z, _full(z, sigma_max)), clip), nfe=1)


@torch.no_grad()
def sample_multistep(
    f: ConsistencyFn,
    z: torch.Tensor,
    taus: Sequence[float],
    generator: torch.Generator | None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    clip: tuple[float, float] | None = None,
) -> SampleResult:
    """Paper Algorithm 1: x = f(T z, T); for tau in taus: x = f(x + sqrt(tau^2 - eps^2) z', tau).

    ``taus`` must decrease within (eps, T]. ``clip`` clamps each denoised sample, as the official
    code does with (-1, 1) for images.
    """
    _check_taus(taus, sigma_min, sigma_max)
    x = sample_onestep(f, z, sigma_max, clip).x
    for tau in taus:
        # Drawn on the generator's device, so a CPU generator gives the same samples on a GPU.
        where = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where)
        noise = noise.to(x.device)
        x_tau = x + (tau**2 - sigma_min**2) ** 0.5 * noise
        x = _clip(f(x_tau, _full(x, tau)), clip)
    return SampleResult(x, nfe=1 + len(taus))


def _check_taus(taus: Sequence[float], sigma_min: float, sigma_max: float) -> None:
    values = [float(t) for t in taus]
    if any(not sigma_min < t <= sigma_max for t in values):
        raise ValueError(f"taus {values}: each must lie in ({sigma_min}, {sigma_max}]")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"taus {values}: must be strictly decreasing (Algorithm 1)")


def taus_from_indices(
    indices: Sequence[int],
    N: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> list[float]:
    """The official sampler's ``ts`` (e.g. 0,17,39 of N = 40) as Algorithm 1's taus.

    Index 0 is T and index N - 1 is eps on the descending Karras grid; the first evaluation
    is at T and the last index only marks the end, so the taus are the indices in between.
    """
    if len(indices) < 2 or indices[0] != 0 or indices[-1] != N - 1:
        raise ValueError(f"indices {list(indices)}: must start at 0 and end at N - 1 = {N - 1}")
    return [float(karras_sigma_at_index(i, N, sigma_min, sigma_max, rho)) for i in indices[1:-1]]


@torch.no_grad()
def sample_teacher_ode(
    D: Denoiser,
    z: torch.Tensor,
    sigmas: torch.Tensor,
    solver: Solver = "heun",
    trajectory: list[torch.Tensor] | None = None,
    to_zero: bool = False,
) -> SampleResult:
    """Integrate the empirical PF ODE (paper Eq. 4) from x_T = T z down an ascending grid.

    ``sigmas`` is ascending (t_1 = eps .. t_N = T); the solve visits it from the top. Each of
    the N - 1 steps costs 1 (Euler) or 2 (Heun) evaluations. ``to_zero`` ends as EDM's sampler
    does (its Alg. 2, t_N = 0): one more Euler step from eps to 0, which is D(x, eps), so 18
    Karras points cost 35 evaluations with Heun, the count the paper compares against. Pass a
    list as ``trajectory`` to collect every intermediate state (for plots).
    """
    t_desc = sigmas.flip(0).tolist()
    x = t_desc[0] * z
    if trajectory is not None:
        trajectory.append(x)
    for t_cur, t_next in itertools.pairwise(t_desc):
        x = ode_step(x, _full(x, t_cur), _full(x, t_next), D, solver)
        if trajectory is not None:
            trajectory.append(x)
    nfe = NFE_PER_STEP[solver] * (len(t_desc) - 1)
    if to_zero:
        x = D(x, _full(x, t_desc[-1]))
        nfe += 1
        if trajectory is not None:
            trajectory.append(x)
    return SampleResult(x, nfe=nfe)


def edm_sampler_nfe(points: int) -> int:
    """EDM Algorithm 2's cost: Heun on each of the ``points - 1`` steps, Euler to 0 at the end."""
    return 2 * points - 1


@torch.no_grad()
def sample_edm_heun(
    D: Denoiser,
    z: torch.Tensor,
    points: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    clip: tuple[float, float] | None = None,
) -> SampleResult:
    """EDM Algorithm 2 (deterministic) on ``points`` Karras sigmas and then 0: the teacher's
    sampler the paper's NFE counts use (18 points = 35 NFE).

    One point is the single Euler step from T to 0, i.e. D(T z, T): the teacher at the
    one-step student's cost, the fair "same NFE" baseline.
    """
    if points < 1:
        raise ValueError(f"points = {points}: the EDM sampler needs at least 1")
    if points == 1:
        result = SampleResult(D(sigma_max * z, _full(z, sigma_max)), nfe=1)
    else:
        sigmas = karras_sigmas(points, sigma_min, sigma_max, rho)
        result = sample_teacher_ode(D, z, sigmas, "heun", to_zero=True)
    return SampleResult(_clip(result.x, clip), result.nfe)
