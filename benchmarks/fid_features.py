"""Features/s of FID's Inception-v3 on 256x256 uint8 images per batch size, and of the digits proxy.

    python benchmarks/fid_features.py [--device cpu|cuda] [--batches 1 8 32] [--rounds 5]

The network is the one evaluation uses (``cmray.eval.features.load_feature_net("inception")``:
torch-fidelity's port of the TF graph, float32, resizing every image to 299 x 299 inside). The
real weights cannot be downloaded on an offline machine, so unless ``--weights`` names the file,
random weights in the real file's format are written to a temporary directory and loaded through
the same path; the speed does not depend on the values. Inputs are random uint8 images at
``--resolution`` (256: LSUN's size). The shipped digits classifier (the CPU proxy,
16 x 16 inputs) is timed at a batch of 250 alongside.

Each batch size is warmed up once, then timed in rounds whose order rotates; a timing repeats
forward passes for at least ``--min-seconds``. Batch sizes that run out of GPU memory in the
warm-up are dropped. Printed: median features/s per batch size, the speedup of the best batch
over batch 1 (the median over rounds of the within-round ratio: this machine's speed drifts by
tens of percent over minutes) and how long 50,000 features (one FID) take at the best rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import device_name, load_average, start, sync
from torch import nn

from cmray.eval.features import load_feature_net, write_random_inception_weights

FID_SAMPLES = 50_000
DIGITS_BATCH = 250
DIGITS_RESOLUTION = 16
CPU_BATCHES = [1, 8, 32]
CUDA_BATCHES = [1, 8, 32, 128, 256, 512]


def random_images(batch: int, resolution: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=gen)
    return x.to(device)


def make_timer(net: nn.Module, images: torch.Tensor, min_seconds: float) -> Callable[[], float]:
    """A function timing forward passes on ``images`` for >= min_seconds; returns features/s."""
    device = images.device

    @torch.no_grad()
    def timer() -> float:
        calls = 0
        sync(device)
        start = time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            net(images)
            calls += 1
            sync(device)
        return calls * images.shape[0] / (time.perf_counter() - start)

    return timer


@torch.no_grad()
def fits(net: nn.Module, images: torch.Tensor) -> bool:
    """Warm-up forward; False if it runs out of GPU memory."""
    try:
        net(images)
        sync(images.device)
        return True
    except torch.OutOfMemoryError:
        pass
    # Outside the except block, whose traceback would keep the failed call's tensors alive.
    torch.cuda.empty_cache()
    return False


def inception_net(weights: str | None, work: Path, device: torch.device) -> nn.Module:
    if weights is None:
        weights = str(work / "weights-inception-random.pth")
        write_random_inception_weights(weights)
    return load_feature_net("inception", weights).to(device)


def build_timers(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], float]]:
    """Timers keyed 'inception bN' for the batches that fit, then 'digits b250'."""
    with tempfile.TemporaryDirectory(prefix="cmray-fid-bench-") as work:
        inception = inception_net(args.weights, Path(work), device)
    timers: dict[str, Callable[[], float]] = {}
    for batch in args.batches:
        images = random_images(batch, args.resolution, device)
        if not fits(inception, images):
            print(f"inception batch {batch}: out of memory; larger batches skipped")
            break
        timers[f"inception b{batch}"] = make_timer(inception, images, args.min_seconds)
    digits = load_feature_net("digits").to(device)
    images = random_images(DIGITS_BATCH, DIGITS_RESOLUTION, device)
    fits(digits, images)
    timers[f"digits b{DIGITS_BATCH}"] = make_timer(digits, images, args.min_seconds)
    return timers


def run_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Rates per timer over rounds; each round starts one timer later than the last."""
    names = list(timers)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(timers[name]())
    return rates


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def report(rates: dict[str, list[float]], args: argparse.Namespace) -> None:
    for name, values in rates.items():
        size = DIGITS_RESOLUTION if name.startswith("digits") else args.resolution
        print(
            f"{name:>16} ({size}x{size}): median {statistics.median(values):9.2f} features/s"
            "   rounds " + " ".join(f"{v:.2f}" for v in values)
        )
    inception = {k: v for k, v in rates.items() if k.startswith("inception")}
    best = max(inception, key=lambda k: statistics.median(inception[k]))
    best_rate = statistics.median(inception[best])
    if "inception b1" in inception:
        ratios = [
            b / one for b, one in zip(inception[best], inception["inception b1"], strict=True)
        ]
        print(
            f"best/batch 1 ({best}) = {statistics.median(ratios):.2f}x  (per round "
            + " ".join(f"{v:.2f}" for v in ratios)
            + ")"
        )
    print(
        f"{FID_SAMPLES:,} Inception features at {best_rate:.2f}/s ({best}): "
        f"{duration(FID_SAMPLES / best_rate)}"
    )
    digits = statistics.median(rates[f"digits b{DIGITS_BATCH}"])
    print(
        f"{FID_SAMPLES:,} digits-proxy features at {digits:.0f}/s: {duration(FID_SAMPLES / digits)}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU: 2)")
    parser.add_argument("--weights", default=None, help="real Inception weights (default: random)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.batches is None:
        args.batches = CUDA_BATCHES if cuda else CPU_BATCHES
    if args.min_seconds is None:
        args.min_seconds = 1.0 if cuda else 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start(args.device, args.threads)
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; "
        f"float32, {args.rounds} rounds, >= {args.min_seconds:g} s per timing"
    )
    weights = args.weights or "random (speed does not depend on the values; features mean nothing)"
    print(f"Inception weights: {weights}")
    timers = build_timers(args, device)
    report(run_rounds(timers, args.rounds), args)
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
