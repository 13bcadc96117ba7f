"""Steps/s of the training loop under Ray Train (1 worker) against the same loop called directly.

    python benchmarks/train_overhead.py [--steps 200] [--rounds 2]

Both run the CPU demo's network and data (digits at 16x16, configs/digits_ct.yaml) with one
torch thread, the same reporting every 10 steps and one checkpoint at the end. The rate is the
loop's own (steps / seconds since the loop started in its process), so Ray's start-up is not
counted; the Ray path pays for DDP wrapping, ``ray.train.report`` and checkpoint upload.
Rounds alternate direct and Ray; the ratio is the median over rounds. Goal (issue 4): >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from cmray.config import load_config
from cmray.data.config import PrepareConfig
from cmray.data.prepare import prepare
from cmray.train.config import TrainConfig
from cmray.train.loop import run_local

ROOT = Path(__file__).resolve().parents[1]


def bench_config(manifest: str, steps: int, storage: str, name: str) -> TrainConfig:
    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "digits_ct.yaml",
        [
            f"data.manifest={manifest}",
            "data.num_workers=1",
            f"loop.steps={steps}",
            "loop.log_every=10",
            f"loop.checkpoint_every={steps}",
            "run.num_workers=1",
            f"run.storage_path={storage}",
            f"run.name={name}",
        ],
    )
    return cfg


def direct_rate(cfg: TrainConfig, out: Path) -> float:
    rates: list[float] = []
    run_local(cfg, out, log=lambda _: None, on_metrics=lambda m: rates.append(m["steps_per_s"]))
    return rates[-1]


def ray_rate(cfg: TrainConfig) -> float:
    from cmray.train.worker import launch

    return launch(cfg).metrics["steps_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    work = Path(tempfile.mkdtemp(prefix="cmray-overhead-"))
    manifest = str(work / "digits16")
    prepare(
        PrepareConfig(source="digits", out=manifest, resolution=16, workers=-1), log=lambda _: None
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    direct, on_ray = [], []
    for r in range(args.rounds):
        direct.append(
            direct_rate(bench_config(manifest, args.steps, str(work), f"d{r}"), work / f"d{r}")
        )
        on_ray.append(ray_rate(bench_config(manifest, args.steps, str(work), f"r{r}")))
    ratios = [r / d for r, d in zip(on_ray, direct, strict=True)]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 thread; {args.steps} steps of configs/digits_ct.yaml per run"
    )
    print("direct steps/s: " + " ".join(f"{v:.2f}" for v in direct))
    print("Ray    steps/s: " + " ".join(f"{v:.2f}" for v in on_ray))
    print(
        f"Ray/direct = {statistics.median(ratios):.3f}  (goal >= 0.95; per round "
        + " ".join(f"{v:.3f}" for v in ratios)
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
