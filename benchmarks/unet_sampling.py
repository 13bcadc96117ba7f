"""Samples/s of one-step against two-step consistency sampling with the LSUN-256 ADM U-Net.

    python benchmarks/unet_sampling.py [--device cpu|cuda] [--preset lsun256] [--rounds 4]

f_theta is built as training builds it: ``build_model(ModelConfig(kind="cd", net=...))``, the
U-Net inside the CD scalings, with the default noise range (eps = 0.002, T = 80).
Weights are random (PyTorch's initialisation, with ADM's zeroed residual outputs): the speed does
not depend on the values. One step is ``sample_onestep``; two steps is ``sample_multistep`` with
the official LSUN CD choice of ``taus_from_indices([0, 17, 39], 40)`` (one tau), both clipping
to [-1, 1] as evaluation does. Defaults: on CUDA, bf16 autocast and the largest batch up to 64
that fits; on the CPU, float32 at batch 1. If one forward of the chosen size takes longer than
``--max-forward-s`` and ``--resolution`` was not given, the same architecture runs at 64x64
instead, and the output says so.

Rounds alternate which sampler runs first, and each timing repeats its sampler for at least
``--min-seconds`` (one call if a call takes longer). The ratio two-step/one-step (expected near
0.5: NFE 2 against 1) is the median over rounds of the within-round ratio, because this
machine's speed drifts by tens of percent over minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import device_name, load_average, start, sync

from cmray.core.parametrization import ConsistencyFunction
from cmray.core.sampling import sample_multistep, sample_onestep, taus_from_indices
from cmray.models import ModelConfig, build_model
from cmray.nets.unet import UNET_PRESETS, unet_config

OFFICIAL_LSUN_INDICES = [0, 17, 39]
OFFICIAL_LSUN_N = 40
FALLBACK_RESOLUTION = 64
CUDA_MAX_BATCH = 64


def build_f(preset: str, resolution: int | None, device: torch.device) -> ConsistencyFunction:
    """f_theta around a randomly initialised U-Net, built as training builds it."""
    overrides = {} if resolution is None else {"resolution": resolution}
    torch.manual_seed(0)
    f = build_model(ModelConfig(kind="cd", net=unet_config(preset, **overrides)))
    return f.requires_grad_(False).eval().to(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_samplers(
    f: ConsistencyFunction, z: torch.Tensor, taus: list[float], precision: str
) -> dict[str, Callable[[], None]]:
    noise = ModelConfig().noise
    gen = torch.Generator(device=z.device).manual_seed(1)
    lims = {"sigma_min": noise.sigma_min, "sigma_max": noise.sigma_max}

    def one() -> None:
        with autocast(z.device, precision):
            sample_onestep(f, z, noise.sigma_max, clip=(-1.0, 1.0))

    def two() -> None:
        with autocast(z.device, precision):
            sample_multistep(f, z, taus, gen, **lims, clip=(-1.0, 1.0))

    return {"1 step": one, "2 steps": two}


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def largest_batch(f: ConsistencyFunction, args: argparse.Namespace, device: torch.device) -> int:
    """The largest power-of-two batch up to 64 whose one-step sample fits in GPU memory."""
    res = f.net.cfg.resolution
    batch = CUDA_MAX_BATCH
    while batch >= 1:
        z = torch.randn(batch, 3, res, res, device=device)
        try:
            seconds(make_samplers(f, z, [], args.precision)["1 step"], device)
            return batch
        except torch.OutOfMemoryError:
            pass
        # Outside the except block, whose traceback would keep the failed call's tensors alive.
        del z
        torch.cuda.empty_cache()
        batch //= 2
    raise RuntimeError("batch 1 does not fit in GPU memory")


def choose_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[ConsistencyFunction, int, float]:
    """f_theta, the batch and the warm-up forward's seconds; falls back to 64x64 on a slow CPU."""
    f = build_f(args.preset, args.resolution, device)
    batch = args.batch or (largest_batch(f, args, device) if device.type == "cuda" else 1)
    res = f.net.cfg.resolution
    z = torch.randn(batch, 3, res, res, device=device)
    warm = seconds(make_samplers(f, z, [], args.precision)["1 step"], device)
    if warm > args.max_forward_s and args.resolution is None and res > FALLBACK_RESOLUTION:
        print(
            f"one forward at {res}x{res}, batch {batch} took {warm:.1f} s > {args.max_forward_s:g}"
            f" s: using the {args.preset} architecture at {FALLBACK_RESOLUTION}x"
            f"{FALLBACK_RESOLUTION} instead"
        )
        args.resolution = FALLBACK_RESOLUTION
        del f, z  # free the large model before building the small one
        return choose_model(args, device)
    return f, batch, warm


def rate(fn: Callable[[], None], batch: int, device: torch.device, min_seconds: float) -> float:
    """Samples/s of ``fn`` (one batch per call), called until at least min_seconds have passed."""
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        seconds(fn, device)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def run_rounds(
    samplers: dict[str, Callable[[], None]], args: argparse.Namespace, batch: int
) -> dict[str, list[float]]:
    """Samples/s per sampler over rounds; odd rounds run the two-step sampler first."""
    names, device = list(samplers), torch.device(args.device)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(rate(samplers[name], batch, device, args.min_seconds))
    return rates


def report(rates: dict[str, list[float]]) -> None:
    for name, values in rates.items():
        print(
            f"{name:>8}: median {statistics.median(values):9.4f} samples/s   rounds "
            + " ".join(f"{v:.4f}" for v in values)
        )
    ratios = [t / o for t, o in zip(rates["2 steps"], rates["1 step"], strict=True)]
    print(
        f"2 steps / 1 step = {statistics.median(ratios):.3f}  (NFE 2 vs 1: expected near 0.5; "
        "per round " + " ".join(f"{v:.3f}" for v in ratios) + ")"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="lsun256", choices=sorted(UNET_PRESETS))
    parser.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=None, help="default: CPU 1, CUDA <= 64")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU: 2)")
    parser.add_argument("--max-forward-s", type=float, default=60.0)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="per timing")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.precision is None:
        args.precision = "bf16" if cuda else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start(args.device, args.threads)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {args.precision}")
    f, batch, warm = choose_model(args, device)
    cfg = f.net.cfg
    params = sum(p.numel() for p in f.parameters())
    taus = taus_from_indices(OFFICIAL_LSUN_INDICES, OFFICIAL_LSUN_N)
    print(
        f"U-Net: preset {args.preset} at {cfg.resolution}x{cfg.resolution}, {params / 1e6:.0f}M "
        f"parameters, random weights (speed does not depend on them); batch {batch}; "
        f"two-step tau = {taus[0]:.3f} (indices {OFFICIAL_LSUN_INDICES} of N = "
        f"{OFFICIAL_LSUN_N}); warm-up forward {warm:.2f} s; {args.rounds} rounds"
    )
    z = torch.randn(batch, 3, cfg.resolution, cfg.resolution, device=device)
    samplers = make_samplers(f, z, taus, args.precision)
    if device.type == "cuda":
        seconds(samplers["2 steps"], device)  # cheap there; the CPU warm-up forward suffices
    report(run_rounds(samplers, args, batch))
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
