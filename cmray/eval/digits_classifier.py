"""A small digits classifier shipped with cmray: the feature network of a CPU quality proxy.

The Inception network behind FID is ~100 MB, needs a download the offline machines cannot make,
and is slow on CPU; the CPU demo trains on scikit-learn's 8x8 handwritten digits at 16 x 16.
This module trains a ~65k-parameter CNN once on those digits, prepared exactly as
``pipelines/prepare_data.py`` prepares them (RGB, short side to 16 with BOX, central crop), and
ships its weights as ``cmray/eval/assets/digits_classifier.pt``. The Frechet distance between
Gaussians fitted to its 64-d pooled features (``fd_digits``) and the Inception-style score of
its logits (``classifier_score_digits``) are cheap sample-quality figures for the demo.

They are a PROXY, not FID: the numbers are on a different scale, reflect a network trained on
1,437 images, and are not comparable with any FID or Inception Score in the literature.

Rebuild the shipped file (byte-for-byte deterministic given the seed; under 30 s on one core)::

    python -m cmray.eval.digits_classifier --out cmray/eval/assets/digits_classifier.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmray.data.config import PrepareConfig
from cmray.data.preprocess import prepare_image
from cmray.data.sources import DigitsSource
from cmray.eval.config import FRECHET_NAMES
from cmray.storage import local_temp_beside
from cmray.weights import WeightsNotFoundError, load_state_dict

DIGITS_CLASSIFIER_FILE = "digits_classifier.pt"
SHIPPED_PATH = Path(__file__).parent / "assets" / DIGITS_CLASSIFIER_FILE
REBUILD_COMMAND = "python -m cmray.eval.digits_classifier --out"

# The demo's resolution; the classifier always sees digits at this size whatever it is given.
RESOLUTION = 16
NUM_CLASSES = 10
FEATURE_DIM = 64
# Every 5th digit (index % 5 == 0) is held out: 360 of 1,797 images, with no RNG involved, so
# the split is the same for training, tests and anyone re-checking the shipped file.
HELD_OUT_EVERY = 5


class DigitsClassifier(nn.Module):
    """A small CNN on 16 x 16 grey digits: 64-d pooled features and 10 class logits.

    A CPU proxy for sample quality, not FID: its Frechet distance is comparable only with
    other ``fd_digits`` figures.
    """

    frechet_name = FRECHET_NAMES["digits"]
    score_name = "classifier_score_digits"
    description = (
        "small digits classifier shipped with cmray (16x16 grey CNN): a CPU proxy, "
        "not comparable with FID"
    )

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),  # 16 -> 8
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, FEATURE_DIM, 3, stride=2, padding=1),  # 8 -> 4
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, H, W] -> (float32 features [B, 64], float32 logits [B, 10]).

        Any H, W: the grey average of the channels is resized to 16 x 16 by area averaging.
        """
        pool = self.features(to_network_input(images)).mean(dim=(2, 3))
        return pool, self.head(pool)


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float [B, 1, 16, 16] grey in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        # A float batch in [-1, 1] would otherwise pass silently as near-black images.
        raise ValueError(
            f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    grey = (images.float() / 127.5 - 1.0).mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (RESOLUTION, RESOLUTION):
        # 'area' averages whole pixels, as PIL's BOX filter does when the data were prepared.
        grey = F.interpolate(grey, size=(RESOLUTION, RESOLUTION), mode="area")
    return grey


def default_resample() -> str:
    """The resize filter ``PrepareConfig`` uses by default ('box'), so training data match."""
    field = next(f for f in dataclasses.fields(PrepareConfig) if f.name == "resample")
    return str(field.default)


def digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as the data preparation writes them: uint8 [N, 3, R, R] and labels [N]."""
    source = DigitsSource()
    resample = default_resample()
    pixels, labels = [], []
    for _key, image, label in source.head(len(source)):
        pixels.append(np.asarray(prepare_image(image, resolution, resample)))
        labels.append(label)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.long)


def held_out_mask(n: int) -> torch.Tensor:
    """True for the held-out images: every ``HELD_OUT_EVERY``-th index, starting at 0."""
    return torch.arange(n) % HELD_OUT_EVERY == 0


def random_shift(images: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in x and y, filling with black (the background)."""
    B, _, H, W = images.shape
    padded = F.pad(images, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(
        -1, images.shape[1], -1, W + 2 * pixels
    )
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(-1, images.shape[1], H, -1)
    return shifted.gather(3, cols)


@torch.no_grad()
def accuracy(
    model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 512
) -> float:
    """Fraction of ``images`` whose arg-max logit is the label."""
    model.eval()
    correct = sum(
        int((model(x)[1].argmax(dim=1) == y).sum())
        for x, y in zip(images.split(batch), labels.split(batch), strict=True)
    )
    return correct / len(labels)


def train_epoch(
    model: DigitsClassifier,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One shuffled pass with 1-pixel shift augmentation; returns the mean training loss."""
    model.train()
    total = 0.0
    for index in torch.randperm(len(labels), generator=generator).split(batch_size):
        _, logits = model(random_shift(images[index], generator))
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * len(index)
    return total / len(labels)


def fit_classifier(
    model: DigitsClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    epochs: int,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> float:
    """AdamW with a one-cycle schedule over ``epochs`` shuffled passes; the last epoch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(labels) // batch_size)
    # One-cycle warm-up and decay reaches high accuracy in a few dozen epochs without tuning.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loss = float("nan")
    for _ in range(epochs):
        loss = train_epoch(model, optimizer, schedule, images, labels, batch_size, generator)
    return loss


def seeded(cls: type[DigitsClassifier], seed: int) -> DigitsClassifier:
    """A fresh ``cls`` initialised from ``seed``, leaving the caller's global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls()


def train_digits_classifier(
    seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3
) -> tuple[DigitsClassifier, dict[str, float]]:
    """Train on the digits not held out; the metrics hold the held-out accuracy.

    Deterministic given ``seed`` (on one machine, torch version and thread count). The caller's
    global RNG is left alone: initialisation runs inside ``fork_rng`` and batches, shuffles and
    shifts draw from their own generator.
    """
    images, labels = digits_images()
    test = held_out_mask(len(labels))
    train_images, train_labels = images[~test], labels[~test]
    generator = torch.Generator().manual_seed(seed)
    model = seeded(DigitsClassifier, seed)
    start = time.perf_counter()
    loss = fit_classifier(model, train_images, train_labels, generator, epochs, batch_size, lr)
    seconds = time.perf_counter() - start
    metrics = {
        "held_out_accuracy": accuracy(model, images[test], labels[test]),
        "train_accuracy": accuracy(model, train_images, train_labels),
        "train_loss": loss,
        "train_seconds": seconds,
        "held_out": float(int(test.sum())),
    }
    return model.eval(), metrics


def save_digits_classifier(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the state dict atomically, so a reader never loads a half-written file."""
    # torch.save names the zip records after the file it writes; saving to memory first keeps
    # the random temp name out, so the same weights always give the same bytes.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with local_temp_beside(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def rebuild_hint(path: str | os.PathLike[str], command: str = REBUILD_COMMAND) -> str:
    return f"rebuild it with: {command} {os.fspath(path)}"


def load_classifier(
    cls: type[DigitsClassifier],
    path: str | os.PathLike[str] | None,
    shipped: Path,
    command: str,
) -> DigitsClassifier:
    """A trained ``cls`` in eval mode from ``path`` (None: the file shipped with cmray)."""
    path = Path(path) if path is not None else shipped
    what = cls.__name__
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{what} weights '{path.name}' not found at {path}; {rebuild_hint(path, command)}"
        )
    state = load_state_dict(path)
    model = cls()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(
            f"{path} is not a {what} state dict ({reason}); {rebuild_hint(path, command)}"
        ) from e
    return model.eval()


def load_digits_classifier(path: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """The trained classifier in eval mode; ``path`` None means the file shipped with cmray."""
    return load_classifier(DigitsClassifier, path, SHIPPED_PATH, REBUILD_COMMAND)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cmray.eval.digits_classifier",
        description="Train the digits classifier behind the fd_digits proxy and write its weights.",
    )
    parser.add_argument("--out", default=str(SHIPPED_PATH), help="weight file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    # One thread makes the file bit-for-bit reproducible: parallel reductions may reorder sums.
    torch.set_num_threads(1)
    model, metrics = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    save_digits_classifier(model, args.out)
    print(
        f"held-out accuracy {metrics['held_out_accuracy']:.4f} "
        f"({int(metrics['held_out'])} images), train accuracy {metrics['train_accuracy']:.4f}, "
        f"{metrics['train_seconds']:.1f} s; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
