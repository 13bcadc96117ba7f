"""Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID).

d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)). The trace of the matrix square root
is taken from the eigenvalues of S_1^(1/2) S_2 S_1^(1/2), which is symmetric positive
semi-definite, so only ``eigh`` is needed (no general ``sqrtm``).
"""

from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    x = features.reshape(features.shape[0], -1).double()
    return x.mean(0), torch.cov(x.T)


def _psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(S)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mu1: torch.Tensor, S1: torch.Tensor, mu2: torch.Tensor, S2: torch.Tensor
) -> float:
    """Heusel et al. 2017, Eq. 6 (the FID formula) for given Gaussian statistics."""
    root = _psd_sqrt(S1)
    cross = torch.linalg.eigvalsh(root @ S2 @ root).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + S1.trace() + S2.trace() - 2 * cross)


def frechet_distance_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two feature sets, [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


class RunningGaussian:
    """Mean and covariance of features arriving in batches, in float64, without keeping them.

    50,000 Inception features are 400 MB; their sums are 32 MB whatever the count.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        if len(features) == 0:
            return
        x = features.reshape(features.shape[0], -1).double().cpu()
        self.add_sums(len(x), x.sum(0), x.T @ x)

    def merged(self, other: RunningGaussian) -> RunningGaussian:
        """The statistics of both sets together."""
        both = RunningGaussian()
        for part in (self, other):
            if part.sum is not None and part.outer is not None:
                both.add_sums(part.count, part.sum, part.outer)
        return both

    def add_sums(self, count: int, total: torch.Tensor, outer: torch.Tensor) -> None:
        self.sum = total.clone() if self.sum is None else self.sum + total
        self.outer = outer.clone() if self.outer is None else self.outer + outer
        self.count += count

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, unbiased covariance), as :func:`gaussian_stats` gives for all the batches."""
        if self.sum is None or self.outer is None or self.count < 2:
            raise ValueError(f"{self.count} features: need at least 2 for a covariance")
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, cov
