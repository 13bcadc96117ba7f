"""openai/consistency_models' released checkpoints as cmray models.

Each released ``.pt`` is a plain state dict of the reference's ADM ``UNetModel``. The network
is the same as :class:`cmray.nets.unet.UNet`, with other parameter names, 1x1 convolutions
where cmray has linear layers, and the input convolution inside ``input_blocks``. The kind
(EDM teacher, CD or CT model) decides the scalings around it; the file name says which, and the
tensor shapes must fit one of the presets the releases use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cmray.models.config import ModelConfig
from cmray.models.files import ModelSourceError, read_source, write_model_file
from cmray.nets.unet import UNet, UNetConfig, unet_config

KIND_PREFIXES = {"edm_": "edm", "cd_": "cd", "ct_": "ct"}
# The dataset in a released file's name, and the U-Net preset it was trained with.
DATASET_PRESETS = {"imagenet64": "imagenet64", "bedroom256": "lsun256", "cat256": "lsun256"}
# The Karras grid each release indexes for multistep sampling: CD's N, and CT's s1 + 1
# (the converted diffusers models use the same: 40, 201 and 151 timesteps).
CD_GRID = 40
CT_GRID = {"imagenet64": 201, "lsun256": 151}

# cmray's layer names inside a block, and the reference's.
_LAYERS = {
    "in_norm": "in_layers.0",
    "in_conv": "in_layers.2",
    "emb_proj": "emb_layers.1",
    "out_norm": "out_layers.0",
    "out_conv": "out_layers.3",
    "skip": "skip_connection",
    "norm": "norm",
    "qkv": "qkv",
    "proj": "proj_out",
}


def reference_key(key: str) -> str:
    """The reference's name for cmray's U-Net parameter ``key`` (``down.3.1.qkv.weight`` ->
    ``input_blocks.4.1.qkv.weight``); time_embed, label_emb and out are named alike."""
    head, _, rest = key.partition(".")
    if head == "input_conv":
        return f"input_blocks.0.0.{rest}"
    if head not in ("down", "middle", "up"):
        return key
    if head == "middle":
        block, inner = rest.split(".", 1)
        prefix = f"middle_block.{block}"
    else:
        unit, block, inner = rest.split(".", 2)
        # The reference's input_blocks start with the input convolution.
        where = f"input_blocks.{int(unit) + 1}" if head == "down" else f"output_blocks.{unit}"
        prefix = f"{where}.{block}"
    layer, _, param = inner.rpartition(".")
    if layer == "conv":  # a plain resampler: Downsample.op or Upsample.conv
        layer = "op" if head == "down" else "conv"
    return f"{prefix}.{_LAYERS.get(layer, layer)}.{param}"


def kind_from_name(path: str | os.PathLike[str]) -> str:
    """``edm``, ``cd`` or ``ct`` from a released file's name (``cd_bedroom256_lpips.pt``)."""
    name = Path(path).name
    for prefix, kind in KIND_PREFIXES.items():
        if name.startswith(prefix):
            return kind
    raise ModelSourceError(
        f"{name}: cannot tell the kind from the name (edm_*, cd_*, ct_*); give --kind edm|cd|ct"
    )


def _candidates(path: str | os.PathLike[str]) -> list[str]:
    """The presets to try, the one the file name names first."""
    named = [p for d, p in DATASET_PRESETS.items() if d in Path(path).name]
    return list(dict.fromkeys([*named, *DATASET_PRESETS.values()]))


def _fits(theirs: torch.Size, ours: torch.Size) -> bool:
    """Equal shapes, or a 1x1 convolution's weight where cmray has a linear layer's."""
    return theirs == ours or (
        len(ours) == 2 and tuple(theirs[:2]) == tuple(ours) and all(d == 1 for d in theirs[2:])
    )


def _misfit(state: dict[str, torch.Tensor], net: UNetConfig) -> str | None:
    """The first key or shape of ``state`` that does not fit ``net``, or None."""
    with torch.device("meta"):
        ours = UNet(net).state_dict()
    used = set()
    for key, tensor in ours.items():
        ref = reference_key(key)
        if ref not in state:
            return f"no {ref}"
        if not _fits(state[ref].shape, tensor.shape):
            return f"{ref} has shape {list(state[ref].shape)}, not {list(tensor.shape)}"
        used.add(ref)
    extra = [k for k in state if k not in used]
    return f"unexpected {extra[0]}" if extra else None


def convert_openai(
    state: dict[str, torch.Tensor], source: str = "state dict"
) -> tuple[str, UNetConfig, dict[str, torch.Tensor]]:
    """The preset whose U-Net ``state`` fits, its config, and cmray's float32 weights."""
    classes = state["label_emb.weight"].shape[0] if "label_emb.weight" in state else 0
    first_misfit = None
    for preset in _candidates(source):
        net = unet_config(preset, num_classes=classes)
        misfit = _misfit(state, net)
        if misfit is None:
            with torch.device("meta"):
                ours = UNet(net).state_dict()
            # Keyed as the consistency function holds its network: ``net.<U-Net key>``.
            weights = {
                f"net.{k}": state[reference_key(k)].reshape(v.shape).float()
                for k, v in ours.items()
            }
            return preset, net, weights
        first_misfit = first_misfit or f"{misfit} (preset {preset})"
    raise ModelSourceError(f"{source} fits no known U-Net: {first_misfit}")


def import_openai(
    path: str | os.PathLike[str], out: str | os.PathLike[str], kind: str | None = None
) -> tuple[Path, ModelConfig]:
    """Convert a released checkpoint into a cmray model file at ``out``."""
    source = str(path)
    kind = kind or kind_from_name(source)
    state = read_source(source)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(f"{source}: not a plain state dict of tensors")
    preset, net, weights = convert_openai(state, source)
    grid = {"edm": 0, "cd": CD_GRID, "ct": CT_GRID[preset]}[kind]
    cfg = ModelConfig(kind=kind, net=net, N=grid)
    origin = {"format": "openai/consistency_models", "file": Path(source).name, "preset": preset}
    return write_model_file(out, cfg, weights, origin=origin), cfg
