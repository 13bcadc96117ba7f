"""Inception Score, k-NN precision/recall, and FID against scipy's matrix square root."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from cmray.eval.frechet import frechet_distance_of, gaussian_stats
from cmray.eval.scores import inception_score, mean_over_draws, precision_recall


def features(n: int, d: int, shift: float, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_fid_matches_scipy_sqrtm_on_random_features() -> None:
    a, b = features(400, 16, 0.0, 0), features(300, 16, 0.5, 1) * 1.3
    mu1, s1 = (t.numpy() for t in gaussian_stats(a))
    mu2, s2 = (t.numpy() for t in gaussian_stats(b))
    root = linalg.sqrtm(s1 @ s2).real
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))
    assert abs(frechet_distance_of(a, b) - expected) < 1e-6 * max(1.0, expected)


def test_inception_score_bounds() -> None:
    classes = 10
    confident = torch.eye(classes).repeat(50, 1) * 50  # every class equally, each sure
    uniform = torch.zeros(500, classes)
    one_class = torch.zeros(500, classes)
    one_class[:, 3] = 50
    assert abs(inception_score(confident, splits=5)[0] - classes) < 1e-6
    assert abs(inception_score(uniform, splits=5)[0] - 1.0) < 1e-9
    assert abs(inception_score(one_class, splits=5)[0] - 1.0) < 1e-6


def test_precision_and_recall_are_one_for_the_same_set_and_drop_when_disjoint() -> None:
    real = features(500, 8, 0.0, 2)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = precision_recall(real, features(500, 8, 0.0, 3))
    assert p > 0.8 and r > 0.8
    far = features(500, 8, 25.0, 4)
    assert precision_recall(real, far) == (0.0, 0.0)
    # Half the fakes far away: precision halves, recall stays high.
    mixed = torch.cat([features(250, 8, 0.0, 5), far[:250]])
    p, r = precision_recall(real, mixed)
    assert 0.35 < p < 0.55 and r > 0.5


def test_mean_over_draws_keeps_the_first_draw_and_states_the_spread() -> None:
    draws = [{"fd": 10.0, "is": 2.0, "n": 5}, {"fd": 14.0, "is": 4.0, "n": 9}]
    out = mean_over_draws(draws, means=["fd", "is"], spread=["fd"])
    assert out["fd"] == 12.0 and out["is"] == 3.0
    assert out["n"] == 5 and out["draws"] == 2  # not averaged: the first draw's
    assert out["fd_draws"] == [10.0, 14.0]
    assert abs(out["fd_sd"] - 2.0**1.5) < 1e-12  # sample sd of 10 and 14: sqrt(8)
    assert "is_sd" not in out
    one = mean_over_draws(draws[:1], means=["fd"], spread=["fd"])
    assert one["fd_sd"] == 0.0 and one["fd"] == 10.0
