"""The Frechet distance against closed forms."""

from __future__ import annotations

import torch

from cmray.eval.frechet import frechet_distance, frechet_distance_of


def test_a_set_against_itself_is_zero() -> None:
    x = torch.randn(500, 20, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance_of(x, x)) < 1e-8


def test_diagonal_gaussians_match_the_closed_form() -> None:
    # For diagonal covariances, d^2 = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the std devs.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, 2.0, 1.5])
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    got = frechet_distance(
        mu1.double(), torch.diag(s1**2).double(), mu2.double(), torch.diag(s2**2).double()
    )
    assert abs(got - float(expected)) < 1e-9


def test_full_covariances_match_a_dense_matrix_square_root() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 6, generator=g).double(), torch.randn(6, 6, generator=g).double()
    S1, S2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)
    values, vectors = torch.linalg.eig(S1 @ S2)  # (S1 S2)^(1/2) through a general eigensolve
    root = (vectors @ torch.diag(values.sqrt()) @ torch.linalg.inv(vectors)).real
    expected = float(S1.trace() + S2.trace() - 2 * root.trace())
    zero = torch.zeros(6, dtype=torch.float64)
    assert abs(frechet_distance(zero, S1, zero, S2) - expected) < 1e-8
