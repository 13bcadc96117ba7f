"""One-step samples from a checkpoint, a sample grid PNG and a one-line quality figure.

    python pipelines/quality.py --run runs/train/digits_ct \\
        --manifest runs/data/digits16 --num 800 --out runs/demo/samples.png

The figure is a Frechet distance in pixel space against real images, with two yardsticks from
the same data: two disjoint halves of the real set (the floor) and Gaussian noise (the ceiling).
It is a CPU-scale proxy for small images, not FID.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cmray.core.sampling import sample_onestep
from cmray.data.config import StreamConfig
from cmray.data.stream import ShardStream
from cmray.eval.frechet import frechet_distance_of
from cmray.eval.images import save_grid
from cmray.train.loop import load_model
from cmray.train.state import latest_checkpoint


def real_images(manifest: str, count: int) -> torch.Tensor:
    cfg = StreamConfig(
        manifest=manifest,
        batch_size=100,
        num_workers=0,
        resampled=False,
        flip=False,
        shuffle_buffer=2000,
    )
    images = torch.cat([batch["image"] for batch in ShardStream(cfg)])
    if len(images) < count:
        raise SystemExit(f"--num {count // 2} needs {count} real images; the set has {len(images)}")
    return images[:count]


@torch.no_grad()
def one_step_samples(
    model: torch.nn.Module, shape: tuple[int, ...], sigma_max: float, seed: int
) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.cat(
        [sample_onestep(model, part, sigma_max).x.clamp(-1, 1) for part in z.split(200)]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint directory or URL")
    parser.add_argument("--run", type=Path, help="or a local run directory: its newest checkpoint")
    parser.add_argument("--manifest", required=True, help="the real images' dataset")
    parser.add_argument("--num", type=int, default=800, help="samples (and real images)")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="grid PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = args.checkpoint or latest_checkpoint(args.run or Path("."))
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint under {args.run}; give --checkpoint or --run")
    model, cfg = load_model(str(checkpoint))
    real = real_images(args.manifest, 2 * args.num)
    shape = (args.num, *real.shape[1:])
    fake = one_step_samples(model, shape, cfg.objective.noise.sigma_max, args.seed)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1)) * 0.5
    reference = real[: args.num]
    figures = {
        "one-step samples": frechet_distance_of(fake, reference),
        "real vs real": frechet_distance_of(real[args.num :], reference),
        "Gaussian noise": frechet_distance_of(noise.clamp(-1, 1), reference),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(fake[:64], args.out)
    print(
        f"quality (pixel-space Frechet distance to {args.num} real images; a proxy, not FID; "
        "lower is better): " + " | ".join(f"{k} {v:.1f}" for k, v in figures.items())
    )
    print(f"sample grid: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
