"""Sampling speed of cmray against diffusers' ConsistencyModelPipeline on the same model.

    python benchmarks/diffusers_sampling.py [--device cpu|cuda] [--preset lsun256]
        [--resolution R] [--model-channels C] [--batch 16] [--rounds 3]

A model with random weights is written as a cmray model file and exported with
``cmray export diffusers``. Both then draw ``--batch`` samples from the same latents, in one
step and in two steps (grid indices 0, 17, 39 of 40; the pipeline's ``timesteps=[17, 0]``):
cmray as ``cmray sample`` does (``load_model``, ``in_batches`` of 16, Algorithm 1), diffusers as
its documentation does (``pipe(batch_size=..., timesteps=..., latents=..., output_type="pt")``).
Rounds alternate which goes first; each figure is the median. Printed: seconds per batch for
each, and the ratio diffusers / cmray (goal: at least 1.0, cmray no slower).

Defaults: on CUDA the full preset in bf16 autocast for both; on a CPU the preset's topology at
64x64 and 64 channels (the full LSUN net takes minutes per batch on two cores), float32.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_name, start, sync

from cmray.core.sampling import in_batches, sample_multistep, taus_from_indices
from cmray.models import MODEL_BATCH, ModelConfig, build_model, load_model, write_model_file
from cmray.models.diffusers import export_diffusers
from cmray.nets.unet import unet_config

INDICES = {1: [0, 39], 2: [0, 17, 39]}


def write_model(path: Path, preset: str, overrides: dict) -> ModelConfig:
    cfg = ModelConfig(kind="cd", net=unet_config(preset, **overrides), N=40)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    write_model_file(path, cfg, model.state_dict())
    return cfg


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn, device: torch.device) -> float:
    sync(device)
    tick = time.perf_counter()
    with torch.no_grad(), autocast(device):
        fn()
    sync(device)
    return time.perf_counter() - tick


def compare(
    indices: list[int],
    model: torch.nn.Module,
    pipe: object,
    cfg: ModelConfig,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    rounds: int,
) -> tuple[float, float]:
    """Median seconds per batch of cmray and of the pipeline, for these grid indices."""
    noise, device = cfg.noise, z.device
    taus = taus_from_indices(indices, cfg.N, noise.sigma_min, noise.sigma_max, noise.rho)
    f = in_batches(model, MODEL_BATCH, labels)

    def ours() -> None:
        gen = torch.Generator(device=device).manual_seed(1)
        sample_multistep(f, z, taus, gen, noise.sigma_min, noise.sigma_max, clip=(-1, 1))

    def theirs() -> None:
        pipe(
            batch_size=z.shape[0],
            class_labels=labels,
            num_inference_steps=None,
            timesteps=indices[-2::-1],
            latents=z,
            generator=torch.Generator(device=device).manual_seed(1),
            output_type="pt",
        )

    timed(ours, device), timed(theirs, device)  # warm-up: kernels, allocator, caches
    times: dict[str, list[float]] = {"cmray": [], "diffusers": []}
    for r in range(rounds):
        order = [("cmray", ours), ("diffusers", theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn, device))
    return statistics.median(times["cmray"]), statistics.median(times["diffusers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="lsun256", choices=("lsun256", "imagenet64"))
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--model-channels", type=int)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    device = start(args.device, args.threads)
    from diffusers import ConsistencyModelPipeline

    small = device.type == "cpu"
    overrides = {
        "resolution": args.resolution or (64 if small else None),
        "model_channels": args.model_channels or (64 if small else None),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if small and "resolution" in overrides:
        res = overrides["resolution"]
        overrides["attention_resolutions"] = [r for r in (32, 16, 8) if r < res]
    print(f"device: {device_name(device)}")
    with tempfile.TemporaryDirectory(prefix="cmray-diffusers-sampling-") as tmp:
        cfg = write_model(Path(tmp) / "m.pt", args.preset, overrides)
        export_diffusers(str(Path(tmp) / "m.pt"), Path(tmp) / "pipe")
        pipe = ConsistencyModelPipeline.from_pretrained(Path(tmp) / "pipe").to(device)
        pipe.set_progress_bar_config(disable=True)
        model, _ = load_model(Path(tmp) / "m.pt", device)
    net = cfg.net
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.preset} topology, {net.resolution}x{net.resolution}, "
        f"{net.model_channels} channels, {params / 1e6:.1f}M parameters; batch {args.batch}"
    )
    labels = torch.zeros(args.batch, dtype=torch.long, device=device) if net.num_classes else None
    shape = (args.batch, net.in_channels, net.resolution, net.resolution)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    for steps, indices in INDICES.items():
        a, b = compare(indices, model, pipe, cfg, z, labels, args.rounds)
        print(
            f"{steps} step(s): cmray {a:.3f} s, diffusers {b:.3f} s per batch; "
            f"ratio diffusers / cmray {b / a:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
