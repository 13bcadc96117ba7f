"""Zero-shot editing with a consistency model: paper Algorithm 4 and Sec. 6.3.

Every task is multistep consistency sampling (Algorithm 1) in which, after each denoising
step, the coordinates of an invertible linear transform A that are known (mask Omega = 0) are
reset to those of a reference image y. With an orthogonal A the reset is an exact projection,
so the kept coordinates of the output equal those of y up to float rounding (bit for bit when
A is the identity). Tensors are [B, C, H, W]; noise comes from an explicit generator.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from cmray.core.tensors import per_sample

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ITU-R BT.601 luma weights; they sum to 1, so a grey pixel (g, g, g) has luminance g.
LUMA = (0.299, 0.587, 0.114)
Clip = tuple[float, float] | None
# Each denoised estimate is clamped to the data range before the projection, as in the
# reference's editing functions; None turns that off.
CLIP: Clip = (-1.0, 1.0)


class LinearTransform(Protocol):
    """An invertible linear map A on images: forward(x) = A x, inverse(u) = A^-1 u."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def inverse(self, u: torch.Tensor) -> torch.Tensor: ...


def householder_basis(v: Sequence[float]) -> torch.Tensor:
    """An orthogonal float64 matrix whose first row is v / |v| (for Algorithm 4's A).

    A Householder reflection H = I - 2 w w^T / (w^T w) with w = e_0 + sign(v_0) v / |v| is
    symmetric and maps e_0 to -sign(v_0) v / |v|, so flipping the sign of its first row gives
    the basis. Closed form, hence deterministic; the sign choice keeps w^T w >= 2 (no
    cancellation), so the result is orthogonal to float64 rounding.
    """
    vec = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if vec.numel() == 0 or vec.norm() == 0:
        raise ValueError("householder_basis: v must be a non-empty, non-zero vector")
    sign = 1.0 if vec[0] >= 0 else -1.0
    w = sign * vec / vec.norm()
    w[0] += 1.0
    Q = torch.eye(vec.numel(), dtype=torch.float64) - 2.0 * torch.outer(w, w) / (w @ w)
    Q[0] *= -sign
    return Q


class IdentityTransform:
    """A = I: inpainting and stroke-guided generation edit pixels directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        return u


class ColorTransform:
    """A = Q per pixel across RGB; Q orthogonal with Q[0] = LUMA / |LUMA| (colorization).

    Component 0 of A x is the luminance 0.299 R + 0.587 G + 0.114 B divided by |LUMA|;
    components 1 and 2 span the chroma plane orthogonal to it.
    """

    def __init__(self) -> None:
        self.Q = householder_basis(LUMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "ColorTransform input", 3)
        return torch.einsum("ij,bjhw->bihw", self.Q.to(x), x)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        _check_image(u, "ColorTransform input", 3)
        return torch.einsum("ji,bjhw->bihw", self.Q.to(u), u)


class PatchMeanTransform:
    """A = M on every non-overlapping p x p patch of every channel (super-resolution).

    M is an orthogonal p^2 x p^2 matrix whose first row is ones / p, so component 0 of a patch
    is p times its mean. Layout: [B, C, H, W] -> [B, C * p^2, H / p, W / p], channel
    c * p^2 + k holding component k of channel c; pixel (i, j) of a patch is its entry i * p + j.
    """

    def __init__(self, factor: int) -> None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor {factor}: must be a positive integer")
        self.p = int(factor)
        self.M = householder_basis([1.0] * self.p**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = _check_image(x, "PatchMeanTransform input")
        p = self.p
        if H % p or W % p:
            raise ValueError(f"image {H}x{W}: height and width must be divisible by {p}")
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4)
        patches = patches.reshape(B, C, p * p, H // p, W // p)
        coeffs = torch.einsum("kl,bclhw->bckhw", self.M.to(x), patches)
        return coeffs.reshape(B, C * p * p, H // p, W // p)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        B, K, h, w = _check_image(u, "PatchMeanTransform coefficients")
        p = self.p
        if K % (p * p):
            raise ValueError(f"coefficients have {K} channels: must be a multiple of {p * p}")
        coeffs = u.reshape(B, K // (p * p), p * p, h, w)
        patches = torch.einsum("lk,bclhw->bckhw", self.M.to(u), coeffs)
        patches = patches.reshape(B, K // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
        return patches.reshape(B, K // (p * p), h * p, w * p)

    def omega(self, channels: int) -> torch.Tensor:
        """Mask in A's layout: 0 on each patch's mean (kept), 1 on the rest (generated)."""
        mask = torch.ones(1, channels, self.p**2, 1, 1, dtype=torch.bool)
        mask[:, :, 0] = False
        return mask.reshape(1, channels * self.p**2, 1, 1)


@torch.no_grad()
def edit(
    f: ConsistencyFn,
    y: torch.Tensor,
    A: LinearTransform,
    omega: torch.Tensor,
    ts: Sequence[float],
    eps: float = 0.002,
    generator: torch.Generator | None = None,
    clip: Clip = CLIP,
) -> torch.Tensor:
    """Paper Algorithm 4: multistep consistency sampling with (1 - Omega) A x = (1 - Omega) A y.

    ``omega`` is binary in A's coordinates (1 = generate, 0 = keep from y) and broadcasts
    against A y. ``ts`` = t_1 > ... > t_N, each above eps. The first line of Algorithm 4
    zeroes the generated coordinates of y before noise is added.
    """
    _check_image(y, "y")
    times = _check_ts(ts, eps)
    Ay = A.forward(y)
    mask = _check_omega(omega, Ay)
    Ay = torch.where(mask, torch.zeros_like(Ay), Ay)
    return _constrained_sampling(f, A.inverse(Ay), Ay, A, mask, times, eps, generator, clip)


def _constrained_sampling(
    f: ConsistencyFn,
    x: torch.Tensor,
    Ay: torch.Tensor,
    A: LinearTransform,
    mask: torch.Tensor,
    times: list[float],
    eps: float,
    generator: torch.Generator | None,
    clip: Clip,
) -> torch.Tensor:
    for n, t in enumerate(times):
        # The start is noised to t_1 in full; later steps add only what lifts eps up to t_n.
        std = t if n == 0 else math.sqrt(t**2 - eps**2)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = f(x + std * noise, _full(x, t))
        if clip is not None:  # as the reference's editing functions, before the projection
            x = x.clamp(*clip)
        # torch.where, not Ay * (1 - Omega) + Ax * Omega: a kept coordinate must not depend on
        # the network output at all, even if that output is inf or NaN.
        x = A.inverse(torch.where(mask, A.forward(x), Ay))
    return x


def inpaint(
    f: ConsistencyFn,
    y: torch.Tensor,
    missing: torch.Tensor,
    ts: Sequence[float],
    eps: float = 0.002,
    generator: torch.Generator | None = None,
    clip: Clip = CLIP,
) -> torch.Tensor:
    """Paper Sec. 6.3, inpainting: Algorithm 4 with A = I and Omega = ``missing``.

    ``missing`` is [B or 1, 1 or C, H, W], bool or 0/1, 1 where pixels are to be generated.
    Known pixels of the output equal y's bit for bit.
    """
    B, C, H, W = _check_image(y, "y")
    _check_image(missing, "missing")
    m0, m1, mh, mw = missing.shape
    if m0 not in (1, B) or m1 not in (1, C) or (mh, mw) != (H, W):
        raise ValueError(f"missing {tuple(missing.shape)}: must be [1 or {B}, 1 or {C}, {H}, {W}]")
    return edit(f, y, IdentityTransform(), missing, ts, eps, generator, clip)


def colorize(
    f: ConsistencyFn,
    gray: torch.Tensor,
    ts: Sequence[float],
    eps: float = 0.002,
    generator: torch.Generator | None = None,
    clip: Clip = CLIP,
) -> torch.Tensor:
    """Paper Sec. 6.3, colorization: Algorithm 4 with A = ColorTransform, chroma generated.

    A one-channel ``gray`` is replicated to RGB: LUMA sums to 1, so (g, g, g) has luminance g
    and the output's luminance 0.299 R + 0.587 G + 0.114 B equals g up to float rounding. A
    three-channel input keeps its own luminance (g again when its channels are equal).
    """
    B, C, H, W = _check_image(gray, "gray")
    if C not in (1, 3):
        raise ValueError(f"gray has {C} channels: must have 1 or 3")
    y = gray.expand(B, 3, H, W) if C == 1 else gray
    omega = torch.tensor([False, True, True]).reshape(1, 3, 1, 1)
    return edit(f, y, ColorTransform(), omega, ts, eps, generator, clip)


def super_resolve(
    f: ConsistencyFn,
    low_res: torch.Tensor,
    factor: int,
    ts: Sequence[float],
    eps: float = 0.002,
    generator: torch.Generator | None = None,
    clip: Clip = CLIP,
) -> torch.Tensor:
    """Paper Sec. 6.3, super-resolution: Algorithm 4 with A = PatchMeanTransform(factor).

    [B, C, h, w] -> [B, C, h * factor, w * factor]; every factor x factor patch mean of the
    output equals the low-res pixel up to float rounding. y is the nearest-neighbour upsample,
    whose patch means are exactly the low-res pixels.
    """
    _, C, _, _ = _check_image(low_res, "low_res")
    A = PatchMeanTransform(factor)
    y = low_res.repeat_interleave(A.p, dim=2).repeat_interleave(A.p, dim=3)
    return edit(f, y, A, A.omega(C), ts, eps, generator, clip)


@torch.no_grad()
def stroke_guided(
    f: ConsistencyFn,
    strokes: torch.Tensor,
    ts: Sequence[float],
    eps: float = 0.002,
    generator: torch.Generator | None = None,
    clip: Clip = CLIP,
) -> torch.Tensor:
    """Paper Sec. 6.3, stroke-guided generation (SDEdit): Algorithm 4 with A = I, Omega = 1.

    The first line of Algorithm 4 is skipped: with Omega = 1 it would zero the strokes, and
    SDEdit starts from the stroke image noised to t_1. A lower t_1 stays closer to the strokes.
    """
    _check_image(strokes, "strokes")
    times = _check_ts(ts, eps)
    mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=strokes.device)
    A = IdentityTransform()  # Omega = 1 everywhere: the projection keeps nothing
    return _constrained_sampling(f, strokes, strokes, A, mask, times, eps, generator, clip)


@torch.no_grad()
def denoise(f: ConsistencyFn, x_noisy: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Paper Sec. 6.3, denoising: x_eps = f(x_sigma, sigma) for noise level sigma in [eps, T]."""
    sigma_t = torch.as_tensor(sigma, dtype=x_noisy.dtype, device=x_noisy.device)
    if not bool(torch.all(torch.isfinite(sigma_t) & (sigma_t > 0))):
        raise ValueError(f"sigma {sigma}: must be finite and positive")
    return f(x_noisy, per_sample(sigma_t, x_noisy).reshape(-1))


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Paper Sec. 6.3, interpolation: spherical interpolation of z1 to z2, per sample.

    theta = angle between z1[b] and z2[b] over all of C, H, W;
    slerp = sin((1 - alpha) theta) / sin theta * z1 + sin(alpha theta) / sin theta * z2.
    Nearly parallel pairs fall back to linear interpolation, the limit as theta -> 0.
    """
    if z1.shape != z2.shape or z1.ndim < 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}: must be equal [B, ...]")
    a = per_sample(alpha, z1)
    flat1, flat2 = z1.reshape(z1.shape[0], -1), z2.reshape(z2.shape[0], -1)
    cos = (flat1 * flat2).sum(1) / (flat1.norm(dim=1) * flat2.norm(dim=1))
    theta = per_sample(torch.arccos(cos.clamp(-1.0, 1.0)), z1)
    sin = torch.sin(theta)
    tiny = sin < 1e-6
    safe = torch.where(tiny, torch.ones_like(sin), sin)
    w1 = torch.where(tiny, 1.0 - a, torch.sin((1.0 - a) * theta) / safe)
    w2 = torch.where(tiny, a, torch.sin(a * theta) / safe)
    return w1 * z1 + w2 * z2


@torch.no_grad()
def interpolate(
    f: ConsistencyFn,
    z1: torch.Tensor,
    z2: torch.Tensor,
    alphas: Sequence[float],
    T: float = 80.0,
) -> torch.Tensor:
    """Paper Sec. 6.3, interpolation: f(T slerp(z1, z2, alpha), T) for each alpha.

    z1, z2 are [B, C, H, W] standard normal latents; the result is [len(alphas) * B, C, H, W],
    alpha-major (rows k * B .. k * B + B - 1 belong to alphas[k]).
    """
    if len(alphas) == 0:
        raise ValueError("alphas: must not be empty")
    out = [f(T * slerp(z1, z2, float(a)), _full(z1, T)) for a in alphas]
    return torch.cat(out, dim=0)


def _full(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _check_image(x: torch.Tensor, name: str, channels: int | None = None) -> tuple[int, ...]:
    if x.ndim != 4 or channels not in (None, x.shape[1]):
        raise ValueError(f"{name} {tuple(x.shape)}: must be [B, {channels or 'C'}, H, W]")
    return tuple(x.shape)


def _check_ts(ts: Sequence[float], eps: float) -> list[float]:
    values = [float(t) for t in ts]
    if not values:
        raise ValueError("ts: must hold at least one time point")
    if any(not (math.isfinite(t) and t > eps) for t in values):
        raise ValueError(f"ts {values}: each must be finite and greater than eps = {eps}")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"ts {values}: must be strictly decreasing (Algorithm 4)")
    return values


def _check_omega(omega: torch.Tensor, Ay: torch.Tensor) -> torch.Tensor:
    omega = torch.as_tensor(omega, device=Ay.device)
    fits = omega.ndim == Ay.ndim and all(
        o in (1, a) for o, a in zip(omega.shape, Ay.shape, strict=True)
    )
    if not fits:
        raise ValueError(f"omega {tuple(omega.shape)}: must broadcast to A y {tuple(Ay.shape)}")
    if omega.dtype != torch.bool:
        if not bool(torch.all((omega == 0) | (omega == 1))):
            raise ValueError("omega: must be binary (0 = keep, 1 = generate)")
        omega = omega == 1
    return omega
