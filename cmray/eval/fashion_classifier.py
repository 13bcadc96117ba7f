"""A small Fashion-MNIST classifier shipped with cmray: the feature network of ``fd_fashion``.

The same 16 x 16 grey CNN as the digits proxy (:mod:`cmray.eval.digits_classifier`), trained on
Fashion-MNIST's 60,000 training images prepared as ``pipelines/prepare_data.py`` prepares them
(RGB, short side to 16 with BOX, central crop), and checked on the 10,000 test images. Samples
of a model trained at 32 x 32 are area-averaged to 16 x 16 first, as the digits' are.

The Frechet distance of its 64-d pooled features (``fd_fashion``) is a CPU PROXY, not FID: it
is comparable only with other ``fd_fashion`` figures. The floor a model is measured against is
the test set against the training set, both real.

Rebuild the shipped file (deterministic given the seed, on one thread; a few minutes)::

    python -m cmray.eval.fashion_classifier --out cmray/eval/assets/fashion_classifier.pt
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from cmray.data.fashion import load_split
from cmray.data.preprocess import prepare_image
from cmray.eval.config import FRECHET_NAMES
from cmray.eval.digits_classifier import (
    RESOLUTION,
    DigitsClassifier,
    accuracy,
    default_resample,
    fit_classifier,
    load_classifier,
    save_digits_classifier,
    seeded,
)

FASHION_CLASSIFIER_FILE = "fashion_classifier.pt"
SHIPPED_PATH = Path(__file__).parent / "assets" / FASHION_CLASSIFIER_FILE
REBUILD_COMMAND = "python -m cmray.eval.fashion_classifier --out"
EPOCHS = 6


class FashionClassifier(DigitsClassifier):
    """The digits proxy's CNN, trained on Fashion-MNIST: 64-d features and 10 class logits."""

    frechet_name = FRECHET_NAMES["fashion"]
    score_name = "classifier_score_fashion"
    description = (
        "small Fashion-MNIST classifier shipped with cmray (16x16 grey CNN): a CPU proxy, "
        "not comparable with FID"
    )


def fashion_images(
    split: str = "train", path: str = "", resolution: int = RESOLUTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as the data preparation writes it: uint8 [N, 3, R, R] and labels [N]."""
    from PIL import Image

    images, labels = load_split(split, path)
    resample = default_resample()
    pixels = [
        np.asarray(prepare_image(Image.fromarray(a, mode="L"), resolution, resample))
        for a in images
    ]
    tensor = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.from_numpy(labels)


def train_fashion_classifier(
    seed: int = 0, epochs: int = EPOCHS, path: str = "", limit: int = 0
) -> tuple[FashionClassifier, dict[str, float]]:
    """Train on the training split (its first ``limit`` images if given); the metrics hold the
    test split's accuracy. Deterministic given ``seed`` on one machine and thread count."""
    train_images, train_labels = fashion_images("train", path)
    test_images, test_labels = fashion_images("test", path)
    if limit:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
    generator = torch.Generator().manual_seed(seed)
    model = seeded(FashionClassifier, seed)
    start = time.perf_counter()
    loss = fit_classifier(model, train_images, train_labels, generator, epochs, batch_size=128)
    metrics = {
        "test_accuracy": accuracy(model, test_images, test_labels),
        "train_accuracy": accuracy(model, train_images, train_labels),
        "train_loss": loss,
        "train_seconds": time.perf_counter() - start,
    }
    return model.eval(), metrics


def load_fashion_classifier(path: str | os.PathLike[str] | None = None) -> FashionClassifier:
    """The trained classifier in eval mode; ``path`` None means the file shipped with cmray."""
    return load_classifier(FashionClassifier, path, SHIPPED_PATH, REBUILD_COMMAND)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cmray.eval.fashion_classifier",
        description="Train the Fashion-MNIST classifier behind fd_fashion; write its weights.",
    )
    parser.add_argument("--out", default=str(SHIPPED_PATH), help="weight file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--data", default="", help="folder of the idx.gz files (default: found)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # bit-for-bit reproducible: parallel reductions reorder sums
    model, metrics = train_fashion_classifier(args.seed, args.epochs, args.data)
    save_digits_classifier(model, args.out)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} (10,000 images), train accuracy "
        f"{metrics['train_accuracy']:.4f}, {metrics['train_seconds']:.1f} s; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
