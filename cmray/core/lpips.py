"""LPIPS distance d(x, y) for the consistency loss.

LPIPS (Zhang et al. 2018) as used in Song et al. 2023 Sec. 5 (Eq. 7 / Eq. 10 with d = LPIPS).

Pure torch: the torchvision ImageNet backbone arrives as an already-loaded state dict (staged and
read by :mod:`cmray.weights`), so nothing here touches the network. The calibrated linear heads
are the ones shipped inside the ``lpips`` package and are read from its install directory.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import lpips
import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_NETS = ("vgg", "alex")


class BackboneWeightsError(ValueError):
    """The backbone state dict does not match the torchvision architecture LPIPS expects."""


def _build_offline_lpips(net: str) -> lpips.LPIPS:
    # pretrained=True loads the linear heads bundled with the lpips package (offline);
    # pnet_rand=True keeps the torchvision backbone random so torchvision downloads nothing.
    with warnings.catch_warnings():
        # lpips still calls tv.vgg16(pretrained=...), deprecated since torchvision 0.13.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)


def _torchvision_key(slice_key: str) -> str:
    # lpips splits tv.<net>(...).features into slice1..sliceN whose children keep their original
    # indices, so "slice2.5.weight" is torchvision's "features.5.weight".
    _slice, rest = slice_key.split(".", 1)
    return f"features.{rest}"


def load_backbone_state_dict(model: lpips.LPIPS, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Fill ``model.net`` (the LPIPS backbone) from a torchvision-format state dict, strictly.

    Every backbone tensor must be present with the right shape, and no unused ``features.*`` key
    may remain (that would mean a different architecture, e.g. vgg16_bn). Keys outside
    ``features`` (the ImageNet classifier) are ignored.
    """
    backbone = model.net.state_dict()
    wanted = {_torchvision_key(k): k for k in backbone}
    missing = sorted(k for k in wanted if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k.startswith("features.") and k not in wanted)
    mismatched = [
        f"{tv_key}: got {tuple(state_dict[tv_key].shape)}, expected {tuple(backbone[key].shape)}"
        for tv_key, key in wanted.items()
        if tv_key in state_dict and state_dict[tv_key].shape != backbone[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched}")
    if problems:
        raise BackboneWeightsError(
            f"LPIPS '{model.pnet_type}' backbone state dict is not torchvision's "
            f"{model.pnet_type} format: " + "; ".join(problems)
        )
    model.net.load_state_dict({key: state_dict[tv_key] for tv_key, key in wanted.items()})


class LPIPSDistance(nn.Module):
    """Frozen LPIPS metric d(x, y) -> per-sample distance of shape [B].

    LPIPS (Zhang et al. 2018) as used in Song et al. 2023 Sec. 5. Inputs are images in [-1, 1]
    (the lpips package's convention). As in the official consistency_models code, images smaller
    than 256 pixels on a side are bilinearly resized to 224x224 first, because the ImageNet
    backbone's features are meaningless on tiny inputs; 256 and larger are used as they are.
    Gradients flow to the inputs (the student's output) but never into the LPIPS weights.
    """

    def __init__(
        self,
        backbone_state_dict: Mapping[str, torch.Tensor],
        net: str = "vgg",
        resize_below: int = 256,
        resize_to: int = 224,
    ) -> None:
        super().__init__()
        if net not in SUPPORTED_NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; expected one of {SUPPORTED_NETS}")
        self.net = net
        self.resize_below = resize_below
        self.resize_to = resize_to
        self.lpips = _build_offline_lpips(net)
        load_backbone_state_dict(self.lpips, backbone_state_dict)
        self.lpips.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True) -> LPIPSDistance:
        # The lpips linear heads sit behind nn.Dropout; a parent's .train() must not turn it on,
        # or the metric would become random.
        super().train(False)
        return self

    def _maybe_resize(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) >= self.resize_below:
            return x
        size = (self.resize_to, self.resize_to)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"expected two [B, 3, H, W] batches, got {x.shape} and {y.shape}")
        d = self.lpips(self._maybe_resize(x), self._maybe_resize(y), normalize=False)
        return d.reshape(x.shape[0])
