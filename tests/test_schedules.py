import itertools
import math

import pytest
import torch

from cmray.core import schedules


def test_karras_grid_is_ascending_with_exact_ends():
    s = schedules.karras_sigmas(40)
    assert s[0].item() == 0.002 and s[-1].item() == 80.0
    assert torch.all(s[1:] > s[:-1])


def test_karras_grid_matches_formula_and_official_index():
    N, eps, T, rho = 18, 0.002, 80.0, 7.0
    s = schedules.karras_sigmas(N, eps, T, rho)
    i = 5  # paper's i = 6
    expected = (eps ** (1 / rho) + i / (N - 1) * (T ** (1 / rho) - eps ** (1 / rho))) ** rho
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    # The official descending index N - 1 - i names the same point.
    assert schedules.karras_sigma_at_index(N - 1 - i, N) == pytest.approx(expected, rel=1e-12)


def test_karras_grid_rejects_single_point():
    with pytest.raises(ValueError, match="N >= 2"):
        schedules.karras_sigmas(1)


def test_lsun_ct_schedule_official_variant():
    K = 1_000_000
    assert schedules.ct_schedule(0, K, 2, 150, 0.95) == (2, pytest.approx(0.9025, abs=1e-12))
    N, mu = schedules.ct_schedule(K, K, 2, 150, 0.95)
    assert N == 151
    assert mu == pytest.approx(math.exp(2 * math.log(0.95) / 150))
    assert mu == pytest.approx(0.99932, abs=5e-6)


def test_paper_variant_divides_by_N():
    N, mu = schedules.ct_schedule(0, 100, 2, 150, 0.95, variant="paper")
    assert N == 2 and mu == pytest.approx(0.95)
    with pytest.raises(ValueError, match="official"):
        schedules.ct_schedule(0, 100, 2, 150, 0.95, variant="other")


def test_mu0_zero_is_the_limit_no_ema_target_at_every_k() -> None:
    # The config accepts mu0 = 0 (iCT's "no EMA target" in CT's curriculum): ln 0 must not raise.
    for k in (0, 50, 100):
        assert schedules.ct_schedule(k, 100, 2, 150, 0.0)[1] == 0.0


def test_ct_schedule_is_monotone_in_k():
    K = 10_000
    values = [schedules.ct_schedule(k, K, 2, 150, 0.95) for k in range(0, K + 1, 50)]
    Ns, mus = zip(*values, strict=True)
    assert all(b >= a for a, b in itertools.pairwise(Ns))
    assert all(b >= a for a, b in itertools.pairwise(mus))
    assert Ns[0] == 2 and Ns[-1] == 151


def test_ict_curriculum_doubles_and_caps():
    K = 400_000
    K_prime = math.floor(K / (math.log2(1280 // 10) + 1))  # 8 stages
    assert schedules.ict_N(0, K) == 11
    assert schedules.ict_N(K_prime, K) == 21
    assert schedules.ict_N(K, K) == 1281
    Ns = [schedules.ict_N(k, K) for k in range(0, K, 997)]
    assert all(b >= a for a, b in itertools.pairwise(Ns))


def test_ict_curriculum_shorter_than_its_doublings_doubles_every_step():
    # s1 / s0 = 16: five stages, so a 4-step run has K' = floor(4 / 5) = 0 by the formula.
    assert [schedules.ict_N(k, 4, 10, 160) for k in range(6)] == [11, 21, 41, 81, 161, 161]


def test_lognormal_index_probs_normalised_and_peaked_near_P_mean():
    sigmas = schedules.karras_sigmas(200)
    p = schedules.lognormal_index_probs(sigmas, P_mean=-1.1, P_std=2.0)
    assert p.shape == (199,)
    assert torch.all(p >= 0) and p.sum().item() == pytest.approx(1.0)
    # The density of ln sigma peaks at P_mean: the mass per unit ln-sigma is largest there.
    width = torch.log(sigmas[1:]) - torch.log(sigmas[:-1])
    peak = torch.argmax(p / width)
    assert abs(math.log(sigmas[peak].item()) - (-1.1)) < 0.2


def test_index_samplers_stay_in_range_and_use_the_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = schedules.sample_uniform_indices(10, 1000, g1)
    b = schedules.sample_uniform_indices(10, 1000, g2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 8
    p = schedules.lognormal_index_probs(schedules.karras_sigmas(10))
    idx = schedules.sample_indices_from_probs(p, 1000, torch.Generator().manual_seed(0))
    assert idx.min() >= 0 and idx.max() <= 8
