"""cmray models as diffusers ``ConsistencyModelPipeline`` directories, and back.

The pipeline is a ``UNet2DModel`` (the same ADM network under diffusers' names, with separate
q, k, v projections) and a ``CMStochasticIterativeScheduler`` holding the noise range, rho,
sigma_data and the grid size N that multistep noise levels index. diffusers is imported only
here, and only when a conversion runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cmray.core.parametrization import OFFICIAL_C_NOISE_SCALE
from cmray.models.config import ModelConfig, NoiseConfig
from cmray.models.files import ModelSourceError, read_model, write_model_file
from cmray.nets.unet import GROUPS, UNet, UNetConfig

# cmray's layer names inside a residual or attention block, and diffusers'.
_LAYERS = {
    "in_norm": "norm1",
    "in_conv": "conv1",
    "emb_proj": "time_emb_proj",
    "out_norm": "norm2",
    "out_conv": "conv2",
    "skip": "conv_shortcut",
    "norm": "group_norm",
    "proj": "to_out.0",
    "conv": "conv",
}
_QKV = ("to_q", "to_k", "to_v")


def _attends(cfg: UNetConfig) -> list[bool]:
    return [res in cfg.attention_resolutions for res in cfg.level_resolutions()]


def block_names(cfg: UNetConfig) -> dict[str, str]:
    """cmray's block prefixes (``down.3.1``) and diffusers' (``down_blocks.1.attentions.0``)."""
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb": "class_embedding",
        "input_conv": "conv_in",
        "middle.0": "mid_block.resnets.0",
        "middle.1": "mid_block.attentions.0",
        "middle.2": "mid_block.resnets.1",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    attends, levels, n = _attends(cfg), len(cfg.channel_mult), cfg.num_res_blocks
    unit = 0
    for level in range(levels):
        for j in range(n):
            names[f"down.{unit}.0"] = f"down_blocks.{level}.resnets.{j}"
            if attends[level]:
                names[f"down.{unit}.1"] = f"down_blocks.{level}.attentions.{j}"
            unit += 1
        if level < levels - 1:
            names[f"down.{unit}.0"] = f"down_blocks.{level}.downsamplers.0"
            unit += 1
    unit = 0
    for block, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            names[f"up.{unit}.0"] = f"up_blocks.{block}.resnets.{j}"
            if attends[level]:
                names[f"up.{unit}.1"] = f"up_blocks.{block}.attentions.{j}"
            if level > 0 and j == n:
                names[f"up.{unit}.{1 + attends[level]}"] = f"up_blocks.{block}.upsamplers.0"
            unit += 1
    return names


def _split(key: str, names: dict[str, str]) -> tuple[str, str]:
    """(block prefix, the rest) of a cmray key: the longest prefix that names a block."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in names:
            return prefix, ".".join(parts[cut:])
    raise KeyError(key)


def _name(block: str, layer: str, param: str) -> str:
    """diffusers' name of ``param`` of cmray's ``layer`` (empty for a bare module) in ``block``."""
    return ".".join(p for p in (block, _LAYERS.get(layer, layer), param) if p)


def to_diffusers_weights(
    cfg: UNetConfig, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """cmray's U-Net weights under diffusers' names (q, k, v split out of qkv)."""
    names, out = block_names(cfg), {}
    for key, tensor in weights.items():
        prefix, rest = _split(key, names)
        layer, _, param = rest.rpartition(".")
        block = names[prefix]
        if layer == "qkv":
            for name, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"{block}.{name}.{param}"] = part.clone()
        else:
            out[_name(block, layer, param)] = tensor
    return out


def from_diffusers_weights(
    cfg: UNetConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers_weights`, for cmray's U-Net of ``cfg``."""
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
    exported = to_diffusers_weights(cfg, ours)  # their names, from ours, on the meta device
    missing = sorted(set(exported) - set(state))
    if missing:
        raise ModelSourceError(f"the diffusers U-Net has no {missing[0]}")
    names, weights = block_names(cfg), {}
    for key in ours:
        prefix, rest = _split(key, names)
        layer, _, param = rest.rpartition(".")
        block = names[prefix]
        if layer == "qkv":
            weights[key] = torch.cat([state[f"{block}.{name}.{param}"] for name in _QKV])
        else:
            weights[key] = state[_name(block, layer, param)]
    return {k: v.float() for k, v in weights.items()}


def unet2d_config(cfg: UNetConfig) -> dict[str, Any]:
    """``UNet2DModel`` settings that build cmray's network ``cfg``."""
    attends, updown = _attends(cfg), cfg.resblock_updown
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        if updown
        else (
            "DownBlock2D",
            "UpBlock2D",
        )
    )
    return {
        "sample_size": cfg.resolution,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "layers_per_block": cfg.num_res_blocks,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "attention_head_dim": cfg.num_head_channels,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attends)],
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "num_class_embeds": cfg.num_classes or None,
        "norm_num_groups": GROUPS,
        # diffusers drops the middle attention's GroupNorm under scale-shift unless told.
        "attn_norm_num_groups": GROUPS,
        "dropout": cfg.dropout,
    }


def unet_from_diffusers(config: dict[str, Any], source: str) -> UNetConfig:
    """cmray's network for a ``UNet2DModel`` config; one-line errors for what it cannot be."""
    channels = list(config["block_out_channels"])
    mc = channels[0]
    attends = [t.startswith("Attn") for t in config["down_block_types"]]
    res = config["sample_size"]
    res = res[0] if isinstance(res, list | tuple) else res
    updown = config.get("downsample_type") == "resnet" or (
        "ResnetDownsampleBlock2D" in config["down_block_types"]
    )
    net = UNetConfig(
        resolution=res,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=mc,
        channel_mult=[c // mc for c in channels],
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=[res >> i for i, a in enumerate(attends) if a],
        num_head_channels=config["attention_head_dim"] or channels[-1],
        dropout=config.get("dropout", 0.0),
        resblock_updown=updown,
        use_scale_shift_norm=config.get("resnet_time_scale_shift") == "scale_shift",
        num_classes=config.get("num_class_embeds") or 0,
    )
    rebuilt = unet2d_config(net)
    diff = [k for k, v in _kept(config).items() if rebuilt[k] != v]
    if diff:
        raise ModelSourceError(f"{source}: a UNet2DModel with {diff[0]} = {config[diff[0]]!r}")
    return net


def _kept(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a diffusers config that cmray's network must reproduce exactly."""
    keys = ("block_out_channels", "down_block_types", "up_block_types", "resnet_time_scale_shift")
    return {
        k: list(v) if isinstance(v, list | tuple) else v for k, v in config.items() if k in keys
    }


def _unet_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net's own weights inside a consistency function's (``net.<key>``)."""
    return {k.removeprefix("net."): v for k, v in weights.items()}


def export_diffusers(source: str, out: str | os.PathLike[str]) -> Path:
    """Write ``source`` (any model source) as a directory that
    ``ConsistencyModelPipeline.from_pretrained`` loads."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    cfg, weights = read_model(source)
    if not cfg.is_consistency or not cfg.N:
        raise ModelSourceError(f"{source}: a {cfg.kind} model has no consistency pipeline")
    if cfg.boundary != cfg.noise.sigma_min:
        raise ModelSourceError(
            f"{source}: a {cfg.kind} model keeps EDM's scalings (f(x, 0) = x); diffusers' "
            "consistency scheduler shifts them by sigma_min, so it would sample another "
            "function; accepted kinds: cd, ct (sample this one with cmray sample)"
        )
    if cfg.noise.c_noise_scale != OFFICIAL_C_NOISE_SCALE:
        raise ModelSourceError(
            f"{source}: noise.c_noise_scale = {cfg.noise.c_noise_scale}; diffusers' consistency "
            f"scheduler feeds the network {OFFICIAL_C_NOISE_SCALE:g} ln sigma, so only "
            f"{OFFICIAL_C_NOISE_SCALE:g} is accepted (sample this one with cmray sample)"
        )
    unet = UNet2DModel(**unet2d_config(cfg.net))
    unet.load_state_dict(to_diffusers_weights(cfg.net, _unet_weights(weights)))
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=cfg.N,
        sigma_min=cfg.noise.sigma_min,
        sigma_max=cfg.noise.sigma_max,
        sigma_data=cfg.sigma_data,
        rho=cfg.noise.rho,
    )
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    return Path(out)


def import_diffusers(
    directory: str | os.PathLike[str], out: str | os.PathLike[str], kind: str | None = None
) -> tuple[Path, ModelConfig]:
    """A ``ConsistencyModelPipeline`` directory (ours, or the hub's ``openai/diffusers-cd_*``)
    as a cmray model file. The kind is ``ct`` when the directory's name says so, else ``cd``."""
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    root, source = Path(directory), str(directory)
    if not (root / "unet").is_dir() or not (root / "scheduler").is_dir():
        raise ModelSourceError(f"{source}: not a pipeline directory (no unet/ and scheduler/)")
    unet = UNet2DModel.from_pretrained(root / "unet")
    scheduler = CMStochasticIterativeScheduler.from_pretrained(root / "scheduler").config
    net = unet_from_diffusers(dict(unet.config), source)
    weights = {f"net.{k}": v for k, v in from_diffusers_weights(net, unet.state_dict()).items()}
    noise = NoiseConfig(scheduler.sigma_min, scheduler.sigma_max, scheduler.rho)
    kind = kind or ("ct" if "ct_" in root.name else "cd")
    cfg = ModelConfig(kind, net, noise, scheduler.sigma_data, scheduler.num_train_timesteps)
    origin = {"format": "diffusers", "directory": root.name}
    return write_model_file(out, cfg, weights, origin=origin), cfg
