"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

This is the architecture the consistency-models reference (Song et al. 2023) trains on LSUN 256:
a sinusoidal embedding of the noise level drives residual blocks at every resolution, with
multi-head self-attention at the coarse ones and skip connections from encoder to decoder.

Presets (:data:`UNET_PRESETS`, built with :func:`unet_config`):

* ``lsun256`` -- the reference LSUN 256 settings (about 5.3e8 parameters);
* ``imagenet64`` -- the reference ImageNet 64 settings, class-conditional on 1000 classes;
* ``tiny`` -- 32x32 with about 1.4e6 parameters, for CPU tests and smoke runs.

Attention uses ``q | k | v`` chunks of one linear layer, heads split inside each chunk: the
layout of openai/consistency_models' flash attention (``b (three h d) s``), which its released
checkpoints were trained with, and of diffusers' conversion (``qkv.chunk(3)``), so imported
weights need no permutation (``cmray.models.openai``).

A class-conditional net (``num_classes`` > 0) adds a learned label embedding to the time
embedding, as ADM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmray.config import ConfigError, from_dict, param

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig", "unet_config"]

GROUPS = 32  # GroupNorm groups, as in ADM


@dataclass
class UNetConfig:
    """Shape and options of an ADM U-Net; defaults are the ``tiny`` preset."""

    resolution: int = param(32, help="input height == width in pixels", ge=1)
    in_channels: int = param(3, help="channels of the input image", ge=1)
    out_channels: int = param(3, help="channels of the output", ge=1)
    model_channels: int = param(32, help="base width; level i has model_channels*mult[i]", ge=1)
    channel_mult: list[int] = param(
        default_factory=lambda: [1, 2, 2], help="width multiplier per resolution level", ge=1
    )
    num_res_blocks: int = param(1, help="residual blocks per encoder level", ge=1)
    attention_resolutions: list[int] = param(
        default_factory=lambda: [8], help="resolutions in pixels that get self-attention", ge=1
    )
    num_head_channels: int = param(32, help="channels per attention head", ge=1)
    dropout: float = param(0.0, help="dropout before each block's second conv", ge=0, lt=1)
    resblock_updown: bool = param(
        True, help="resample inside residual blocks (BigGAN) instead of strided conv/interp"
    )
    use_scale_shift_norm: bool = param(
        True, help="time embedding scales and shifts the GroupNorm output instead of adding"
    )
    use_checkpoint: bool = param(
        False, help="recompute block activations in backward to save memory"
    )
    num_classes: int = param(
        0, help="class-conditional with this many classes (0: unconditional)", ge=0
    )

    def __post_init__(self) -> None:
        for key in ("resolution", "model_channels", "num_res_blocks", "num_head_channels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)} must be >= 1", key=key)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout = {self.dropout} must be in [0, 1)", key="dropout")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(
                f"channel_mult = {self.channel_mult} must list one positive multiplier per "
                "level, e.g. [1, 2, 2]",
                key="channel_mult",
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.resolution % factor:
            raise ConfigError(
                f"resolution = {self.resolution} must be divisible by 2**(len(channel_mult)-1)"
                f" = {factor} so that each of the {len(self.channel_mult)} levels halves it",
                key="resolution",
            )
        visited = self.level_resolutions()
        for res in self.attention_resolutions:
            if res not in visited:
                raise ConfigError(
                    f"attention_resolutions has {res}; accepted: resolutions the net visits "
                    f"{visited}",
                    key="attention_resolutions",
                )
        for res, mult in zip(visited, self.channel_mult, strict=True):
            self._check_width(res, self.model_channels * mult, last=res == visited[-1])

    def _check_width(self, res: int, ch: int, last: bool) -> None:
        if ch % GROUPS:
            raise ConfigError(
                f"model_channels * channel_mult = {ch} at resolution {res} must be divisible "
                f"by {GROUPS} (GroupNorm groups)",
                key="model_channels",
            )
        # The middle block always attends, at the last (coarsest) level's width.
        if (res in self.attention_resolutions or last) and ch % self.num_head_channels:
            raise ConfigError(
                f"num_head_channels = {self.num_head_channels} must divide the {ch} channels "
                f"of the attention layers at resolution {res}",
                key="num_head_channels",
            )

    def level_resolutions(self) -> list[int]:
        """The resolution of each level, finest first (e.g. [32, 16, 8])."""
        return [self.resolution >> i for i in range(len(self.channel_mult))]


UNET_PRESETS: dict[str, dict[str, Any]] = {
    "lsun256": {
        "resolution": 256,
        "model_channels": 256,
        "channel_mult": [1, 1, 2, 2, 4, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [32, 16, 8],
        "num_head_channels": 64,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_scale_shift_norm": False,
    },
    "imagenet64": {
        "resolution": 64,
        "model_channels": 192,
        "channel_mult": [1, 2, 3, 4],
        "num_res_blocks": 3,
        "attention_resolutions": [32, 16, 8],
        "num_head_channels": 64,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "num_classes": 1000,
    },
    "tiny": {
        "resolution": 32,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [8],
        "num_head_channels": 32,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
    },
}


def unet_config(preset: str, **overrides: Any) -> UNetConfig:
    """A validated :class:`UNetConfig` from a preset name, with some fields replaced."""
    if preset not in UNET_PRESETS:
        raise ConfigError(
            f"unknown UNet preset {preset!r}; accepted: {', '.join(UNET_PRESETS)}", key="preset"
        )
    return from_dict(UNetConfig, {**UNET_PRESETS[preset], **overrides})


# --------------------------------------------------------------------------- building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[cos(t f_i), sin(t f_i)]`` with log-spaced frequencies f_i from 1 to 1/max_period."""
    half = dim // 2
    # float32 at least: c_noise reaches ~1100, where bf16 cannot tell neighbouring levels apart.
    # Frequencies are made here, not kept as a buffer, so a net built on "meta" stays complete.
    wide = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=wide, device=t.device) / half
    )
    angles = t.to(wide)[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32, so statistics stay accurate under bf16/fp16
    autocast (and a float64 net, as the JVP checks use, stays float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(wide)).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # ADM zero-initialises every residual branch's last layer: each block starts as identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    if direction == "down":
        return F.avg_pool2d(x, 2)
    if direction == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class Block(nn.Module):
    """A layer called as ``block(x, emb)``, optionally recomputed in backward (checkpointing)."""

    use_checkpoint: bool = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ResBlock(Block):
    """GN-SiLU-conv, add (or scale-shift by) the time embedding, GN-SiLU-dropout-conv, + skip."""

    def __init__(
        self, cfg: UNetConfig, channels: int, out: int, emb_dim: int, direction: str | None = None
    ):
        super().__init__()
        self.use_checkpoint, self.direction = cfg.use_checkpoint, direction
        self.scale_shift = cfg.use_scale_shift_norm
        self.in_norm = GroupNorm32(GROUPS, channels)
        self.in_conv = nn.Conv2d(channels, out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out if self.scale_shift else out)
        self.out_norm = GroupNorm32(GROUPS, out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_conv = _zero(nn.Conv2d(out, out, 3, padding=1))
        self.skip = nn.Identity() if channels == out else nn.Conv2d(channels, out, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Resample after the activation so the conv sees the new resolution (BigGAN order).
        h = self.in_conv(_resample(F.silu(self.in_norm(x)), self.direction))
        e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(_resample(x, self.direction)) + h


class AttentionBlock(Block):
    """Multi-head self-attention over all pixels, added to the input (the embedding is unused)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        self.heads = channels // cfg.num_head_channels
        self.norm = GroupNorm32(GROUPS, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        hgt, wid = x.shape[-2:]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, HW, d]
            for t in self.qkv(tokens).chunk(3, dim=-1)
        )
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        # No copy back to NCHW: h is a channels-last view and the sum takes x's layout (x comes
        # first); for a channels-last x the tokens above were plain views as well.
        h = self.proj(h).transpose(1, 2).unflatten(2, (hgt, wid))
        return x + h.to(x.dtype)


class Resample(Block):
    """Plain resampling between levels: strided 3x3 conv down, or nearest-neighbour + conv up."""

    def __init__(self, channels: int, direction: str):
        super().__init__()
        self.direction = direction
        stride = 2 if direction == "down" else 1
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(_resample(x, "up") if self.direction == "up" else x)


# --------------------------------------------------------------------------- the network


class UNet(nn.Module):
    """ADM U-Net: ``net(x [B,C,R,R], noise_cond [B]) -> [B, out_channels, R, R]``.

    Every residual branch and the output conv start at zero, so a fresh net outputs exactly 0.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        self.input_conv = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        # Each unit of `down` emits one skip tensor; `up` units consume them in reverse.
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skip_chs, ch = [mc], mc  # channels of each skip tensor, in order
        levels = list(zip(cfg.level_resolutions(), cfg.channel_mult, strict=True))
        for i, (res, mult) in enumerate(levels):
            for _ in range(cfg.num_res_blocks):
                unit = self._stage(ResBlock(cfg, ch, mc * mult, emb_dim), res)
                self.down.append(unit)
                ch = mc * mult
                skip_chs.append(ch)
            if i < len(levels) - 1:
                self.down.append(nn.ModuleList([self._resampler(ch, emb_dim, "down")]))
                skip_chs.append(ch)
        self.middle = nn.ModuleList(
            [
                ResBlock(cfg, ch, ch, emb_dim),
                AttentionBlock(cfg, ch),
                ResBlock(cfg, ch, ch, emb_dim),
            ]
        )
        for i, (res, mult) in reversed(list(enumerate(levels))):
            for j in range(cfg.num_res_blocks + 1):
                unit = self._stage(ResBlock(cfg, ch + skip_chs.pop(), mc * mult, emb_dim), res)
                ch = mc * mult
                if i > 0 and j == cfg.num_res_blocks:
                    unit.append(self._resampler(ch, emb_dim, "up"))
                self.up.append(unit)
        self.out = nn.Sequential(
            GroupNorm32(GROUPS, ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def _stage(self, block: ResBlock, res: int) -> nn.ModuleList:
        out = block.out_conv.out_channels
        extra = [AttentionBlock(self.cfg, out)] if res in self.cfg.attention_resolutions else []
        return nn.ModuleList([block, *extra])

    def _resampler(self, ch: int, emb_dim: int, direction: str) -> Block:
        if self.cfg.resblock_updown:
            return ResBlock(self.cfg, ch, ch, emb_dim, direction)
        return Resample(ch, direction)

    def forward(
        self, x: torch.Tensor, noise_cond: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, in_channels, R, R]; noise_cond: [B] (or a scalar), e.g. 250 * ln(sigma);
        class_labels: [B] integers, given exactly when the net is class-conditional."""
        if (class_labels is None) != (self.cfg.num_classes == 0):
            need = f"labels of {self.cfg.num_classes} classes" if self.cfg.num_classes else "none"
            raise ValueError(f"class_labels: this U-Net takes {need}")
        cond = noise_cond.reshape(-1).expand(x.shape[0])
        freq = timestep_embedding(cond, self.cfg.model_channels)
        emb = self.time_embed(freq.to(self.time_embed[0].weight.dtype))
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels.reshape(-1)).to(emb.dtype)
        h = self.input_conv(_cpu_channels_last(x))
        skips = [h]
        for unit in self.down:
            h = _run(unit, h, emb)
            skips.append(h)
        h = _run(self.middle, h, emb)
        for unit in self.up:
            h = _run(unit, torch.cat([h, skips.pop()], dim=1), emb)
        # Back to the input's dtype: under autocast the consistency skip c_skip*x + c_out*F
        # and the loss should not inherit bf16 rounding from the last conv. And to its layout,
        # which a CPU forward left for channels-last.
        out = self.out(h).to(x.dtype)
        return out.contiguous() if x.is_contiguous() else out


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    # On a CPU, oneDNN convolves NHWC as it lies but copies NCHW into a blocked layout and the
    # result back out, and nearest upsampling is vectorised over NHWC's channels only: a
    # channels-last forward is 15-20% faster. Every layer keeps the layout it is given. CUDA's
    # GroupNorm turns channels-last back into NCHW, so other devices keep the caller's layout.
    if x.device.type != "cpu":
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _run(unit: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for block in unit:
        h = block(h, emb)
    return h
