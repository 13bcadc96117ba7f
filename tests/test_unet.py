"""The ADM U-Net: shapes, zero init, conditioning, attention maths, memory formats, autocast,
checkpointing, the LSUN 256 size (on the meta device) and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cmray.config import ConfigError, from_dict, to_dict
from cmray.nets.unet import UNET_PRESETS, AttentionBlock, UNet, UNetConfig, unet_config


@pytest.fixture(autouse=True)
def _one_thread():
    # Small convolutions: extra threads only add contention on a 2-core runner.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_plain_config(**overrides) -> UNetConfig:
    """Two levels, conv/interp resampling and additive conditioning, odd channel counts."""
    fields = dict(
        resolution=16,
        in_channels=4,
        out_channels=2,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        num_head_channels=32,
        resblock_updown=False,
        use_scale_shift_norm=False,
    )
    return from_dict(UNetConfig, {**fields, **overrides})


def perturbed(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Jitter every parameter so that the zero-initialised layers stop hiding the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return net


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=gen)
    return x, torch.linspace(-1100.0, 300.0, batch)


@pytest.mark.parametrize("cfg", [unet_config("tiny"), small_plain_config()], ids=["tiny", "plain"])
def test_output_shape_and_zero_init(cfg: UNetConfig) -> None:
    net = UNet(cfg)
    x, cond = inputs(cfg, batch=3)
    out = net(x, cond)
    assert out.shape == (3, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(out)), "a fresh net must output exactly zero"


@pytest.mark.parametrize("cfg", [unet_config("tiny"), small_plain_config()], ids=["tiny", "plain"])
def test_conditioning_and_gradients_reach_every_parameter(cfg: UNetConfig) -> None:
    net = perturbed(UNet(cfg))
    x, _ = inputs(cfg, batch=1)
    low, high = net(x, torch.tensor([-1100.0])), net(x, torch.tensor([0.5]))
    assert torch.isfinite(low).all() and torch.isfinite(high).all()
    assert (low - high).abs().max() > 1e-4, "output ignores noise_cond"
    (low.square().mean() + high.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


def test_attention_matches_manual_softmax() -> None:
    cfg = unet_config("tiny")
    block = perturbed(AttentionBlock(cfg, 64), std=0.2)  # two heads of 32 channels
    x = torch.randn(2, 64, 4, 5)
    out = block(x, torch.zeros(2, 1))

    tokens = block.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = (block.qkv(tokens)).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        part = slice(32 * h, 32 * (h + 1))
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(32), -1)
        heads.append(weights @ v[..., part])
    manual = x + block.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


def test_channels_last_matches_contiguous() -> None:
    cfg = unet_config("tiny")
    net = perturbed(UNet(cfg))
    x, cond = inputs(cfg)
    ref = net(x, cond)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, cond), ref, atol=1e-5, rtol=1e-5)
    net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, cond), ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_finite_and_close_to_fp32() -> None:
    cfg = unet_config("tiny")
    net = perturbed(UNet(cfg))
    x, cond = inputs(cfg)
    ref = net(x, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, cond)
    assert out.dtype == torch.float32  # cast back to the input's dtype
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.4f}"


def test_checkpointing_gives_the_same_gradients() -> None:
    # Dropout on: checkpointing must replay the same random mask when it recomputes.
    grads = []
    for use_checkpoint in (False, True):
        cfg = unet_config("tiny", dropout=0.1, use_checkpoint=use_checkpoint)
        torch.manual_seed(0)
        net = perturbed(UNet(cfg))
        x, cond = inputs(cfg)
        torch.manual_seed(1)
        net(x, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, plain in grads[0].items():
        torch.testing.assert_close(grads[1][name], plain, atol=1e-6, rtol=1e-5, msg=name)


def test_lsun256_size_on_meta_device() -> None:
    with torch.device("meta"):
        net = UNet(unet_config("lsun256"))
    count = sum(p.numel() for p in net.parameters())
    assert 300e6 < count < 700e6, f"lsun256 has {count:,} parameters"
    assert all(p.is_meta for p in net.parameters())


def test_presets_and_from_dict_round_trip() -> None:
    for name, fields in UNET_PRESETS.items():
        cfg = unet_config(name)
        assert from_dict(UNetConfig, to_dict(cfg)) == cfg
        assert all(getattr(cfg, key) == value for key, value in fields.items())
    assert from_dict(UNetConfig, {}) == unet_config("tiny")  # defaults are the tiny preset
    assert unet_config("tiny", dropout="0.1").dropout == 0.1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"resolution": 30}, "resolution"),
        ({"attention_resolutions": [5]}, "attention_resolutions"),
        ({"channel_mult": []}, "channel_mult"),
        ({"model_channels": 48}, "model_channels"),
        ({"num_head_channels": 48}, "num_head_channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"channel_mult": [1, 0, 2]}, "channel_mult[1]"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        unet_config("tiny", **overrides)
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="dropout"):
        UNetConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="channel_mult"):
        UNetConfig(channel_mult=[])
    with pytest.raises(ConfigError, match="preset"):
        unet_config("cifar32")
