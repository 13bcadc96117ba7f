"""Zero-shot editing (paper Algorithm 4) against a consistency function known in closed form.

For data x0 ~ N(m, s^2 I) and VE noise x_t = x0 + t z, the PF ODE moves every pixel along
x_t - m = (x0 - m) sqrt(s^2 + t^2) / s, so its exact consistency function is
f*(x, t) = m + (x - m) s / sqrt(s^2 + t^2). It maps to the t = 0 end of the trajectory, so
f*(x, eps) is x scaled by 0.99999 about m rather than exactly x; that does not matter here.
The data covariance is isotropic, so in the coordinates of any orthogonal A the components are
independent N((A m)_k, s^2): given the kept ones, the generated ones are N((A m)_k, s^2).
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cmray.core import editing
from cmray.core.tensors import per_sample

torch.set_num_threads(1)

M, S, EPS, T = 0.3, 0.5, 0.002, 80.0
LUMA = torch.tensor(editing.LUMA, dtype=torch.float64)
N = 4096  # samples in the convergence tests
# The empirical mean of N draws of N(mu, S^2) has std S / sqrt(N) = 0.0078; 5 of those bound
# every one of the 192 components of an 8x8x3 image (two-sided tail 6e-7 each).
MEAN_TOL = 5 * S / math.sqrt(N)
TS = (T, 2.0, 0.5)


def f_star(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return M + (x - M) * S / torch.sqrt(S**2 + per_sample(t, x) ** 2)


def random_net(channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 3, padding=1)

    def f(x, t):
        # Bounded like a real model's output, so float rounding stays at the 1e-7 level.
        return 3 * torch.tanh(conv(x) + per_sample(t, x))

    return f


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def luminance(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("c,bchw->bhw", LUMA.to(x), x)


def one_image(seed: int, shape=(1, 3, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)) * S + M


# --- transforms -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "A",
    [
        editing.IdentityTransform(),
        editing.ColorTransform(),
        editing.PatchMeanTransform(1),
        editing.PatchMeanTransform(2),
        editing.PatchMeanTransform(4),
    ],
)
def test_transform_inverts_and_preserves_norm(A):
    x = torch.randn(5, 3, 8, 8, generator=gen())
    u = A.forward(x)
    assert torch.allclose(A.inverse(u), x, atol=1e-6)
    assert torch.allclose(u.norm(), x.norm(), rtol=1e-6)  # orthogonal
    x64 = x.double()
    assert torch.allclose(A.inverse(A.forward(x64)), x64, atol=1e-13)


def test_householder_basis_is_orthogonal_with_the_given_first_row():
    for v in ([0.299, 0.587, 0.114], [1.0] * 16, [1.0, 0.0], [-2.0, 1.0, 3.0]):
        Q = editing.householder_basis(v)
        vec = torch.tensor(v, dtype=torch.float64)
        assert torch.allclose(Q @ Q.T, torch.eye(len(v), dtype=torch.float64), atol=1e-14)
        assert torch.allclose(Q[0], vec / vec.norm(), atol=1e-15)
    assert torch.equal(editing.householder_basis([1.0] * 16), editing.householder_basis([1.0] * 16))
    with pytest.raises(ValueError, match="non-zero"):
        editing.householder_basis([0.0, 0.0])


def test_color_transform_component_zero_is_luminance():
    x = torch.rand(4, 3, 5, 6, generator=gen(), dtype=torch.float64)
    u = editing.ColorTransform().forward(x)
    assert torch.allclose(u[:, 0] * LUMA.norm(), luminance(x), atol=1e-14)


@pytest.mark.parametrize("p", [2, 4])
def test_patch_transform_component_zero_is_p_times_patch_mean(p):
    A = editing.PatchMeanTransform(p)
    M_ = A.M
    assert torch.allclose(M_ @ M_.T, torch.eye(p * p, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(M_[0], torch.full((p * p,), 1.0 / p, dtype=torch.float64))
    x = torch.randn(2, 3, 8, 12, generator=gen(), dtype=torch.float64)
    u = A.forward(x)
    assert u.shape == (2, 3 * p * p, 8 // p, 12 // p)
    assert torch.allclose(u[:, :: p * p] / p, F.avg_pool2d(x, p), atol=1e-14)


# --- constraints hold for any f ---------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(4, 1, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8)])
def test_inpaint_keeps_known_pixels_bit_exact(mask_shape):
    y = torch.randn(4, 3, 8, 8, generator=gen(1))
    missing = torch.rand(mask_shape, generator=gen(2)) < 0.5
    for f in (random_net(), f_star):
        out = editing.inpaint(f, y, missing, TS, generator=gen(3))
        known = ~missing.expand_as(y)
        assert torch.equal(out[known], y[known])
        assert not torch.equal(out[~known], y[~known])


def test_inpaint_ignores_y_inside_the_hole_and_is_reproducible():
    y1 = torch.randn(2, 3, 8, 8, generator=gen(1))
    missing = torch.zeros(1, 1, 8, 8)
    missing[..., 2:6, 2:6] = 1
    y2 = torch.where(missing.bool(), torch.full_like(y1, 1e6), y1)
    out1 = editing.inpaint(f_star, y1, missing, TS, generator=gen(5), clip=None)
    out2 = editing.inpaint(f_star, y2, missing, TS, generator=gen(5), clip=None)
    assert torch.equal(out1, out2)  # Algorithm 4's first line discards y where Omega = 1


@pytest.mark.parametrize("channels", [1, 3])
def test_colorize_keeps_luminance(channels):
    gray = torch.rand(4, 1, 8, 8, generator=gen(1)).expand(4, channels, 8, 8)
    for f in (random_net(), f_star):
        out = editing.colorize(f, gray, TS, generator=gen(2))
        assert out.shape == (4, 3, 8, 8)
        assert torch.allclose(luminance(out), gray[:, 0], atol=1e-5)
        assert out.std(dim=1).mean() > 1e-2  # the chroma did change: the colours differ


@pytest.mark.parametrize("p", [2, 4])
def test_super_resolve_keeps_patch_means(p):
    low = torch.randn(3, 3, 8 // p, 8 // p, generator=gen(1))
    for f in (random_net(), f_star):
        out = editing.super_resolve(f, low, p, TS, generator=gen(2))
        assert out.shape == (3, 3, 8, 8)
        assert torch.allclose(F.avg_pool2d(out, p), low, atol=1e-5)


# --- convergence to the exact conditional distribution with f* ---------------------------------


def check_conditional_law(A, omega, y, out):
    """Kept A-coordinates equal A y; generated ones are N((A m)_k, s^2) over the batch."""
    u, Ay = A.forward(out.double()), A.forward(y.double())
    Am = A.forward(torch.full_like(y, M, dtype=torch.float64))
    mask = omega.expand_as(Ay).bool()
    assert torch.allclose(u[:, ~mask[0]], Ay[:, ~mask[0]], atol=1e-5)
    err = (u.mean(0) - Am[0])[mask[0]]
    assert err.abs().max() < MEAN_TOL, err.abs().max()
    # Their conditional std is s; the std of an empirical std is s / sqrt(2N) = 0.0055.
    assert (u.std(0)[mask[0]] - S).abs().max() < 0.03


def test_inpaint_converges_to_the_conditional_distribution():
    y = one_image(1).expand(N, 3, 8, 8)
    missing = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    missing[..., :, 4:] = True
    out = editing.inpaint(f_star, y, missing, TS, generator=gen(2), clip=None)
    check_conditional_law(editing.IdentityTransform(), missing, y, out)
    # Generated pixels are independent, as in the exact conditional law.
    assert torch.corrcoef(out[:, 0, :2, 4:6].reshape(N, 4).T).fill_diagonal_(0).abs().max() < 0.1


def test_colorize_converges_to_the_conditional_mean():
    gray = one_image(1, (1, 1, 8, 8)).expand(N, 1, 8, 8)
    out = editing.colorize(f_star, gray, TS, generator=gen(2), clip=None)
    omega = torch.tensor([False, True, True]).reshape(1, 3, 1, 1)
    check_conditional_law(editing.ColorTransform(), omega, gray.expand(N, 3, 8, 8), out)


def test_super_resolve_converges_to_the_conditional_mean():
    p = 4
    low = one_image(1, (1, 3, 2, 2)).expand(N, 3, 2, 2)
    out = editing.super_resolve(f_star, low, p, TS, generator=gen(2), clip=None)
    A = editing.PatchMeanTransform(p)
    up = low.repeat_interleave(p, 2).repeat_interleave(p, 3)
    check_conditional_law(A, A.omega(3), up, out)


def test_edit_with_a_float_mask_matches_inpaint():
    y = one_image(1).expand(8, 3, 8, 8)
    missing = (torch.rand(1, 1, 8, 8, generator=gen(3)) < 0.3).float()
    a = editing.edit(
        f_star, y, editing.IdentityTransform(), missing, TS, generator=gen(4), clip=None
    )
    b = editing.inpaint(f_star, y, missing.bool(), TS, generator=gen(4), clip=None)
    assert torch.equal(a, b)


def test_stroke_guided_mean_approaches_m_as_t1_grows():
    strokes = torch.full((N, 3, 8, 8), -2.0)
    gaps = []
    for t1 in (0.25, 1.0, 4.0, T):
        out = editing.stroke_guided(f_star, strokes, [t1], generator=gen(1), clip=None)
        gap = (out.mean() - M).abs().item()
        # One step of f* from N(strokes, t1^2): the mean keeps a fraction s / sqrt(s^2 + t1^2)
        # of the offset from m. The mean over 192 * N pixels has std at most 0.0006.
        assert gap == pytest.approx(2.3 * S / math.sqrt(S**2 + t1**2), abs=3e-3)
        gaps.append(gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.02
    out = editing.stroke_guided(f_star, strokes, TS, generator=gen(1), clip=None)
    assert (out.mean(0) - M).abs().max() < MEAN_TOL
    assert (out.std(0) - S).abs().max() < 0.03


# --- denoising and interpolation --------------------------------------------------------------


def test_denoise_is_f_at_sigma():
    x = torch.randn(4, 3, 8, 8, generator=gen())
    assert torch.equal(editing.denoise(f_star, x, 1.5), f_star(x, 1.5))
    sig = torch.tensor([0.1, 1.0, 5.0, 80.0])
    assert torch.equal(editing.denoise(f_star, x, sig), f_star(x, sig))
    with pytest.raises(ValueError, match="positive"):
        editing.denoise(f_star, x, 0.0)


def test_slerp_endpoints_and_norm():
    z1 = torch.randn(6, 3, 8, 8, generator=gen(1))
    z2 = torch.randn(6, 3, 8, 8, generator=gen(2))
    assert torch.equal(editing.slerp(z1, z2, 0.0), z1)
    assert torch.allclose(editing.slerp(z1, z2, 1.0), z2, atol=1e-6)
    u1 = z1 / z1.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    u2 = z2 / z2.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    for a in (0.1, 0.5, 0.9, torch.linspace(0, 1, 6)):
        norms = editing.slerp(3 * u1, 3 * u2, a).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, 3.0), atol=1e-5)
    # Equal directions: the limit is linear interpolation, not NaN.
    assert torch.allclose(editing.slerp(z1, 2 * z1, 0.5), 1.5 * z1, atol=1e-5)


def test_interpolate_stacks_one_batch_per_alpha():
    z1 = torch.randn(2, 3, 8, 8, generator=gen(1))
    z2 = torch.randn(2, 3, 8, 8, generator=gen(2))
    out = editing.interpolate(f_star, z1, z2, [0.0, 0.25, 0.5, 1.0])
    assert out.shape == (8, 3, 8, 8)
    assert torch.equal(out[:2], f_star(T * z1, T))
    assert torch.allclose(out[6:], f_star(T * z2, T), atol=1e-5)
    assert torch.allclose(out[4:6], f_star(T * editing.slerp(z1, z2, 0.5), T))


# --- input validation -------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    y = torch.randn(2, 3, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    cases = [
        (lambda: editing.super_resolve(f_star, y, 2.5, TS), "positive integer"),
        (lambda: editing.PatchMeanTransform(3).forward(y), "divisible by 3"),
        (lambda: editing.PatchMeanTransform(0), "positive integer"),
        (lambda: editing.inpaint(f_star, y, torch.ones(1, 1, 4, 4), TS), "missing"),
        (lambda: editing.inpaint(f_star, y, torch.ones(3, 1, 8, 8), TS), "missing"),
        (lambda: editing.inpaint(f_star, y, mask, [80.0, 80.0]), "strictly decreasing"),
        (lambda: editing.inpaint(f_star, y, mask, [1.0, 2.0]), "strictly decreasing"),
        (lambda: editing.inpaint(f_star, y, mask, []), "at least one"),
        (lambda: editing.inpaint(f_star, y, mask, [80.0, 0.001]), "greater than eps"),
        (lambda: editing.inpaint(f_star, y, 0.5 * mask, TS), "binary"),
        (lambda: editing.inpaint(f_star, y[0], mask, TS), r"\[B, C, H, W\]"),
        (lambda: editing.colorize(f_star, torch.rand(2, 2, 8, 8), TS), "1 or 3"),
        (lambda: editing.edit(f_star, y, editing.ColorTransform(), mask[0], TS), "broadcast"),
        (lambda: editing.edit(f_star, y[:, :2], editing.ColorTransform(), mask, TS), "3, H, W"),
        (lambda: editing.stroke_guided(f_star, y, [2.0, 5.0]), "strictly decreasing"),
        (lambda: editing.slerp(y, y[:1], 0.5), "must be equal"),
        (lambda: editing.interpolate(f_star, y, y, []), "empty"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


def test_each_denoised_estimate_is_clamped_before_the_projection() -> None:
    """The reference's editing clamps D to [-1, 1] first; known pixels stay y's exactly."""

    def loud(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 5.0 * x

    y = torch.rand(1, 3, 8, 8) * 2 - 1
    missing = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    missing[..., 2:6, 2:6] = True
    out = editing.inpaint(loud, y, missing, TS, generator=gen(7))
    assert out.abs().max() <= 1.0 and torch.equal(out[..., ~missing[0, 0]], y[..., ~missing[0, 0]])
    free = editing.inpaint(loud, y, missing, TS, generator=gen(7), clip=None)
    assert free.abs().max() > 1.0
