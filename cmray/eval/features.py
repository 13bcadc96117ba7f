"""Feature networks for sample-quality metrics: Inception-v3 (FID) and the CPU proxies.

Every feature network is an ``nn.Module`` taking uint8 images [B, 3, H, W] and returning
``(pool, logits)``: the features whose Gaussian statistics give a Frechet distance and
precision/recall, and the class logits that give an Inception-style score. Each also carries the
names its figures are published under, so a proxy can never be mistaken for FID in a report.

The Inception network is torch-fidelity's ``FeatureExtractorInceptionV3``: a maintained port of
the TensorFlow graph ``inception-2015-12-05`` that the FID papers (and the consistency-models
paper, through the ADM evaluator) use, down to TF1's bilinear resize to 299 x 299. pytorch-fid
resizes differently and has not been released since 2023; torchmetrics' FID wraps this same
torch-fidelity module with its own metric state, which we do not need because cmray gathers
features from Ray workers itself.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from cmray.eval.config import FRECHET_NAMES
from cmray.weights import load_state_dict, stage_weights

if TYPE_CHECKING:
    from pathlib import Path

FeatureKind = Literal["inception", "digits", "fashion"]
FEATURE_KINDS: tuple[str, ...] = ("inception", "digits", "fashion")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
INCEPTION_SETTING = "weights"


class InceptionFeatures(nn.Module):
    """FID's Inception-v3: 2048-d pool3 features and the 1008 unbiased logits (for IS)."""

    frechet_name = FRECHET_NAMES["inception"]
    score_name = "inception_score"
    description = "Inception-v3 (TF 2015-12-05 graph via torch-fidelity): comparable with papers"

    def __init__(self, weights_path: str | os.PathLike[str]) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity reads the file with weights_only=False; loading it here first with
        # weights_only=True refuses a file that carries pickled code before that happens.
        load_state_dict(weights_path)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=os.fspath(weights_path),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        return pool, logits


def stage_inception(source: str | os.PathLike[str] | None = None) -> Path:
    """A local path to FID's Inception weights: from ``source`` (path or fsspec URL) or the
    torch hub cache; a clear :class:`~cmray.weights.WeightsNotFoundError` otherwise."""
    return stage_weights(
        INCEPTION_FILE,
        source,
        description="FID Inception-v3 weights",
        download_url=INCEPTION_URL,
        setting=INCEPTION_SETTING,
    )


def load_feature_net(kind: str, weights: str | None = None) -> nn.Module:
    """The frozen feature network ``kind`` (inception, digits or fashion), weights staged first."""
    if kind == "inception":
        net: nn.Module = InceptionFeatures(stage_inception(weights or None))
    elif kind == "digits":
        from cmray.eval.digits_classifier import load_digits_classifier

        net = load_digits_classifier(weights or None)
    elif kind == "fashion":
        from cmray.eval.fashion_classifier import load_fashion_classifier

        net = load_fashion_classifier(weights or None)
    else:
        raise ValueError(f"unknown feature network {kind!r}; expected one of {FEATURE_KINDS}")
    return net.requires_grad_(False).eval()


def weights_fingerprint(net: nn.Module) -> str:
    """sha256 of a network's tensors in key order: reference statistics made with other weights
    (say, a retrained proxy classifier) are recognised and refused."""
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(
            value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def write_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Randomly initialised weights in the real file's format, for tests and speed benchmarks
    on machines that cannot download the real file; their features mean nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep PyTorch's random initialisation

    torch.manual_seed(seed)
    empty = os.fspath(path) + ".empty"
    torch.save({}, empty)
    try:
        skeleton = _Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)
    finally:
        os.remove(empty)
    for module in skeleton.modules():
        # He initialisation keeps activations at unit scale through the ~90 layers, so
        # different images still give different features (PyTorch's default shrinks them to 0).
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(skeleton.state_dict(), path)
