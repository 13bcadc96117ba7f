"""Sample-quality scores on features: Inception Score and k-NN precision/recall.

FID's formula lives in ``frechet.py``. Each function here takes features or logits already
computed, so the same code serves the Inception network, a small classifier, or tests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` folds."""
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"logits {tuple(logits.shape)}: need [N, classes] with N >= {splits}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


def knn_radii(features: torch.Tensor, k: int = 3, batch: int = 4096) -> torch.Tensor:
    """Distance from each feature to its k-th nearest neighbour in its own set (not itself).

    Row blocks keep memory at ``batch`` x N distances, so 50,000 features need no 20 GB matrix.
    """
    support = features.double()
    radii = [
        torch.cdist(part, support).kthvalue(k + 1, dim=1).values  # the 1st is the point itself
        for part in support.split(batch)
    ]
    return torch.cat(radii)


def manifold_coverage(
    points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int = 4096
) -> float:
    """Fraction of ``points`` inside the union of balls around ``support`` with ``radii``."""
    inside = []
    for part in points.double().split(batch):
        d = torch.cdist(part, support.double())
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, k-NN manifolds: precision = fakes on the real manifold,
    recall = reals on the fake manifold (k = 3 as the consistency-models paper reports)."""
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def mean_over_draws(
    entries: Sequence[dict[str, Any]], means: Iterable[str], spread: Iterable[str]
) -> dict[str, Any]:
    """One sampler's reports of several draws as one: the first draw's, with ``draws``, each key
    of ``means`` replaced by its mean over the draws, and for each key of ``spread`` its sample
    standard deviation (``<key>_sd``, 0 for one draw) and every draw's value (``<key>_draws``)."""
    out = dict(entries[0], draws=len(entries))
    for key in means:
        out[key] = statistics.fmean(e[key] for e in entries)
    for key in spread:
        values = [e[key] for e in entries]
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_draws"] = values
    return out
