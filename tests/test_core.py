"""The paper's math: parametrization, ODE steps, losses, EMA, samplers, metrics."""

import copy
import math

import pytest
import torch
from torch import nn

from cmray.core import ema, losses, metrics, sampling, schedules, solvers
from cmray.core.parametrization import (
    ConsistencyFunction,
    Parametrization,
    boundary_scalings,
    c_noise,
    linear_scalings,
)

EPS, T, SD = 0.002, 80.0, 0.5


class Wild(nn.Module):
    """An arbitrary network with huge, input-dependent outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, cond):
        return 1e30 * torch.tanh(self.lin(x)) + cond.reshape(-1, 1)


@pytest.mark.parametrize("kind", ["edm", "linear"])
def test_boundary_condition_is_exact_for_any_network(kind):
    torch.manual_seed(0)
    f = ConsistencyFunction(Wild(), Parametrization(kind, SD, EPS, T))
    x = torch.randn(64, 3) * 100
    assert torch.equal(f(x, EPS), x)
    assert torch.equal(f(x, torch.full((64,), EPS)), x)
    assert not torch.equal(f(x, 1.0), x)  # away from eps the network does act


def test_boundary_scalings_formulas():
    t = torch.tensor([EPS, 0.5, 80.0], dtype=torch.float64)
    skip, out, inp = boundary_scalings(t, SD, EPS)
    assert skip[0].item() == 1.0 and out[0].item() == 0.0
    assert skip[1].item() == pytest.approx(SD**2 / ((0.5 - EPS) ** 2 + SD**2))
    assert out[2].item() == pytest.approx(SD * (80 - EPS) / math.sqrt(SD**2 + 80**2))
    assert inp[1].item() == pytest.approx(1 / math.sqrt(0.25 + SD**2))
    assert c_noise(torch.tensor([1.0])).item() == pytest.approx(0.0)
    # Without the shift these are EDM's denoiser scalings.
    skip0, _, _ = boundary_scalings(t, SD, 0.0)
    assert skip0[1].item() == pytest.approx(SD**2 / (0.25 + SD**2))


def test_the_time_input_scale_reaches_the_network():
    """c_noise = scale * ln t: the official 250 by default, any other scale when configured."""
    seen = []

    class Record(nn.Module):
        def forward(self, x, cond):
            seen.append(cond)
            return torch.zeros_like(x)

    t = torch.tensor([0.5, 4.0])
    for scale in (250.0, 16.0):
        f = ConsistencyFunction(Record(), Parametrization("edm", SD, EPS, T, scale))
        f(torch.ones(2, 2), t)
    torch.testing.assert_close(seen[0], 250.0 * torch.log(t))
    torch.testing.assert_close(seen[1], 16.0 * torch.log(t))


def test_linear_scalings_endpoints():
    skip, out, inp = linear_scalings(torch.tensor([EPS, (EPS + T) / 2, T, 2 * T]), EPS, T)
    assert skip.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert out.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert inp.tolist() == [1.0] * 4


def test_heun_exact_on_linear_ode_euler_not():
    # D(x, t) = x - t (a + b t)  =>  dx/dt = a + b t, x(t) = x_T + a (t - T) + b (t^2 - T^2) / 2.
    a, b = 0.7, -1.3
    D = lambda x, t: x - t * (a + b * t)  # noqa: E731
    x_T = torch.randn(16, 2, dtype=torch.float64)
    t_cur, t_next = 3.0, 0.25
    exact = x_T + a * (t_next - t_cur) + b * (t_next**2 - t_cur**2) / 2
    heun = solvers.heun_step(x_T, t_cur, t_next, D)
    euler = solvers.euler_step(x_T, t_cur, t_next, D)
    assert torch.allclose(heun, exact, atol=1e-13, rtol=0)
    assert (euler - exact).abs().max() > 0.1


def gaussian_denoiser(sd):
    """Exact D for data ~ N(0, sd^2 I): D(x, t) = sd^2 / (sd^2 + t^2) x."""
    return lambda x, t: sd**2 / (sd**2 + solvers.per_sample(t, x) ** 2) * x


def gaussian_consistency(sd):
    """Exact f for the same data: x_eps = x sqrt((sd^2 + eps^2) / (sd^2 + t^2))."""
    return lambda x, t: x * torch.sqrt((sd**2 + EPS**2) / (sd**2 + solvers.per_sample(t, x) ** 2))


def exact_step(sd):
    def step(x, t_cur, t_next, D):
        tc, tn = solvers.per_sample(t_cur, x), solvers.per_sample(t_next, x)
        return x * torch.sqrt((sd**2 + tn**2) / (sd**2 + tc**2))

    return step


def test_cd_loss_zero_for_exact_teacher_and_agreeing_nets():
    g = torch.Generator().manual_seed(0)
    x0 = SD * torch.randn(256, 4, generator=g, dtype=torch.float64)
    z = torch.randn(256, 4, generator=g, dtype=torch.float64)
    sigmas = schedules.karras_sigmas(18)
    n = schedules.sample_uniform_indices(18, 256, g)
    f = gaussian_consistency(SD)
    D = gaussian_denoiser(SD)
    loss = losses.cd_loss(f, f, D, x0, z, n, sigmas, metrics.l2, solver=exact_step(SD))
    assert loss.abs().max().item() < 1e-24
    # With Heun the loss is only the solver's local error: smaller on a finer grid.
    heun = [
        losses.cd_loss(f, f, D, x0, z, n * 0 + N // 2, schedules.karras_sigmas(N), metrics.l2)
        .mean()
        .item()
        for N in (18, 72)
    ]
    assert heun[1] < heun[0] / 100
    # A wrong student is penalised.
    wrong = lambda x, t: 0.9 * f(x, t)  # noqa: E731
    assert losses.cd_loss(wrong, f, D, x0, z, n, sigmas, metrics.l2, "heun").mean() > 1e-3


def test_ct_loss_uses_same_noise_at_both_levels():
    x0 = torch.zeros(8, 2)
    z = torch.randn(8, 2)
    sigmas = schedules.karras_sigmas(10)
    n = torch.arange(8)
    seen = []

    def f(x, t):
        seen.append((x.clone(), t.clone()))
        return x / solvers.per_sample(t, x)  # = z exactly for x0 = 0

    loss = losses.ct_loss(f, f, x0, z, n, sigmas, metrics.l2)
    assert loss.abs().max().item() < 1e-10
    (x_hi, t_hi), (x_lo, t_lo) = seen
    assert torch.all(t_hi > t_lo)
    assert torch.allclose(x_hi / t_hi[:, None], x_lo / t_lo[:, None], atol=1e-5)


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.masks = []
        self.drop.register_forward_hook(lambda m, i, o: self.masks.append(o != 0))

    def forward(self, x, t):
        return self.drop(self.lin(x))


def _dropout_masks(device):
    torch.manual_seed(0)
    online = DropNet().to(device).train()
    target = copy.deepcopy(online)
    target.masks = []
    target.drop._forward_hooks.clear()
    target.drop.register_forward_hook(lambda m, i, o: target.masks.append(o != 0))
    x0 = torch.randn(32, 8, device=device)
    z = torch.randn(32, 8, device=device)
    n = torch.zeros(32, dtype=torch.long)
    losses.ct_loss(online, target, x0, z, n, schedules.karras_sigmas(4), metrics.l2)
    return online.masks[0], target.masks[0]


def test_same_dropout_mask_in_both_calls_cpu():
    a, b = _dropout_masks("cpu")
    assert torch.equal(a, b) and 0.3 < a.float().mean() < 0.7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_dropout_mask_in_both_calls_cuda():
    a, b = _dropout_masks("cuda")
    assert torch.equal(a, b) and 0.3 < a.float().mean() < 0.7


def test_lambdas():
    t_n, t_next = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 4.0])
    assert losses.lambda_uniform(t_n, t_next).tolist() == [1.0, 1.0]
    assert losses.lambda_ict(t_n, t_next).tolist() == [2.0, 0.5]


def test_edm_loss_zero_for_perfect_denoiser_and_weighted():
    x0 = torch.ones(4, 3)
    sigma = torch.tensor([0.1, 1.0, 10.0, 80.0])
    z = torch.randn(4, 3)
    perfect = lambda x, s: torch.ones_like(x)  # noqa: E731
    assert losses.edm_loss(perfect, x0, sigma, z, SD).abs().max() == 0
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    expected = (sigma**2 + SD**2) / (sigma * SD) ** 2
    assert torch.allclose(losses.edm_loss(zero, x0, sigma, z, SD), expected)


def test_boundary_loss_is_the_eps_noise_under_skip_parametrization():
    f = ConsistencyFunction(Wild(), Parametrization("edm", SD, EPS, T))
    x0, z = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    expected = ((EPS * z) ** 2).mean(dim=1)
    assert torch.allclose(losses.boundary_loss(f.double(), x0, z, EPS), expected)


def test_ema_update_formula_and_exact_copy():
    torch.manual_seed(0)
    online, target = nn.Linear(4, 4), nn.Linear(4, 4)
    before = target.weight.detach().clone()
    ema.ema_update_(target, online, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight, atol=1e-7)
    ema.ema_update_(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)
    with pytest.raises(ValueError, match="0 <= mu < 1"):
        ema.ema_update_(target, online, 1.0)


def test_ema_bank_tracks_each_rate():
    torch.manual_seed(0)
    online = nn.Linear(2, 2)
    bank = ema.EMABank(online, [0.5, 0.9])
    start = online.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    bank.update_(online, 0)
    assert torch.allclose(bank.by_rate(0.5).weight, start + 0.5)
    assert torch.allclose(bank.by_rate(0.9).weight, start + 0.1)
    assert not any(p.requires_grad for p in bank.parameters())


def test_ema_warmup_caps_the_half_life_at_a_fraction_of_the_steps():
    assert ema.ema_rate_rampup(0.999, 0, 0.05) == 0.0  # the first step copies the online net
    capped = ema.ema_rate_rampup(0.999, 400, 0.05)
    assert capped**20 == pytest.approx(0.5)  # half-life 0.05 * 400 = 20 steps
    assert ema.ema_rate_rampup(0.999, 100_000, 0.05) == 0.999  # 693 < 5,000: the rate rules
    assert ema.ema_rate_rampup(0.999, 400, 0.0) == 0.999  # off
    assert ema.ema_rate_rampup(0.0, 400, 0.05) == 0.0


def test_ema_bank_with_warmup_forgets_its_random_start():
    torch.manual_seed(0)
    online = nn.Linear(2, 2)
    plain, warm = ema.EMABank(online, [0.999]), ema.EMABank(online, [0.999], rampup=0.05)
    with torch.no_grad():
        online.weight.add_(1.0)
    for k in range(3):
        plain.update_(online, k)
        warm.update_(online, k)
    assert torch.equal(warm.copies[0].weight, online.weight)  # step 0 copied it; it stayed
    assert not torch.allclose(plain.copies[0].weight, online.weight, atol=0.5)


def test_samplers_count_network_evaluations():
    calls = []

    def f(x, t):
        calls.append(1)
        return x * 0

    z = torch.randn(5, 2)
    assert sampling.sample_onestep(f, z).nfe == 1
    r = sampling.sample_multistep(f, z, [10.0, 1.0, 0.1], torch.Generator().manual_seed(0))
    assert r.nfe == 4
    grid = schedules.karras_sigmas(10)
    assert sampling.sample_teacher_ode(f, z, grid, "euler").nfe == 9
    assert sampling.sample_teacher_ode(f, z, grid, "heun").nfe == 18
    assert len(calls) == 1 + 4 + 9 + 18
    # EDM's ending, a last step to sigma = 0: 18 Karras points cost 35 evaluations.
    edm = schedules.karras_sigmas(18)
    assert sampling.sample_teacher_ode(f, z, edm, "heun", to_zero=True).nfe == 35
    assert len(calls) == 1 + 4 + 9 + 18 + 35


def test_the_step_to_zero_is_the_denoised_estimate_at_eps():
    """Euler from eps to 0: x + (0 - eps) (x - D(x, eps)) / eps = D(x, eps)."""
    seen = []

    def D(x, t):
        seen.append(x)
        return 0.5 * x + t[:, None]

    z, grid = torch.randn(3, 2), schedules.karras_sigmas(4)
    x = sampling.sample_teacher_ode(D, z, grid, "euler", to_zero=True).x
    last = seen[-1]
    torch.testing.assert_close(x, 0.5 * last + grid[0])


def test_multistep_injects_noise_of_variance_tau2_minus_eps2():
    inputs = {}

    def f(x, t):
        inputs[round(t[0].item(), 6)] = x.clone()
        return torch.zeros_like(x)  # the denoised sample is exactly 0

    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    taus = [2.0, 0.05]
    sampling.sample_multistep(f, z, taus, torch.Generator().manual_seed(1), EPS, T)
    for tau in taus:
        var = inputs[tau].var().item()
        assert var == pytest.approx(tau**2 - EPS**2, rel=0.01)
    # The paired noise is exactly sqrt(tau^2 - eps^2) times a standard normal draw.
    g = torch.Generator().manual_seed(1)
    first = torch.randn(z.shape, generator=g)
    assert torch.allclose(inputs[2.0], math.sqrt(4.0 - EPS**2) * first)


def test_multistep_validates_taus():
    f = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="decreasing"):
        sampling.sample_multistep(f, torch.zeros(2, 2), [1.0, 2.0], None)
    with pytest.raises(ValueError, match="lie in"):
        sampling.sample_multistep(f, torch.zeros(2, 2), [100.0], None)


def test_sub_batched_network_calls_give_the_same_samples():
    sizes = []

    def f(x, t):
        sizes.append(x.shape[0])
        return torch.tanh(x / (1 + t[:, None]))  # each sample's output depends on itself alone

    z = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    taus = [10.0, 1.0]
    whole = sampling.sample_multistep(f, z, taus, torch.Generator().manual_seed(1), EPS, T).x
    sizes.clear()
    split = sampling.in_batches(f, 4)
    parts = sampling.sample_multistep(split, z, taus, torch.Generator().manual_seed(1), EPS, T).x
    assert torch.equal(parts, whole)
    assert sizes == [4, 4, 2] * 3  # every one of the 3 evaluations is split
    with pytest.raises(ValueError, match="at least 1"):
        sampling.in_batches(f, 0)


def test_taus_from_official_indices():
    taus = sampling.taus_from_indices([0, 17, 39], 40)
    assert len(taus) == 1
    assert taus[0] == pytest.approx(schedules.karras_sigmas(40)[39 - 17].item(), rel=1e-12)
    with pytest.raises(ValueError, match="start at 0"):
        sampling.taus_from_indices([1, 39], 40)


def test_teacher_ode_with_exact_gaussian_denoiser_matches_closed_form():
    z = torch.randn(64, 3, dtype=torch.float64)
    exact = T * z * math.sqrt((SD**2 + EPS**2) / (SD**2 + T**2))

    def error(N, solver):
        grid = schedules.karras_sigmas(N, dtype=torch.float64)
        x = sampling.sample_teacher_ode(gaussian_denoiser(SD), z, grid, solver).x
        return ((x - exact).abs() / exact.abs()).max().item()

    assert error(80, "heun") < 5e-3
    # Second order: 4x the steps, about 16x less error; Euler is first order.
    assert error(80, "heun") < error(20, "heun") / 8
    assert error(80, "euler") > error(20, "euler") / 8


def test_pseudo_huber_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    direct = torch.stack(
        [torch.sqrt(((a - b) ** 2).sum() + c**2) - c for a, b in zip(x, y, strict=True)]
    )
    assert torch.allclose(metrics.pseudo_huber(x, y), direct)
    assert metrics.pseudo_huber_c(3 * 256 * 256) == pytest.approx(0.00054 * math.sqrt(196608))
    assert metrics.pseudo_huber(x, x).abs().max() == 0


def test_l2_l1_and_metric_lookup():
    x, y = torch.zeros(2, 4), torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert metrics.l2(x, y).tolist() == [1.0, 1.0]
    assert metrics.l1(x, y).tolist() == [1.0, 0.5]
    assert metrics.get_metric("l1") is metrics.l1
    with pytest.raises(ValueError, match="choose one of"):
        metrics.get_metric("l3")
    with pytest.raises(ValueError, match="LPIPSDistance"):
        metrics.get_metric("lpips")
