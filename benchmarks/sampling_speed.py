"""One-step CD sampling against the teacher's 100-point PF-ODE solve, on the same 2,000 samples.

    python benchmarks/sampling_speed.py [--run runs/toy2d] [--repeats 20] [--threads 1]

Uses the models of a finished ``pipelines/toy2d.py`` run (trains one first if the directory
has none). Prints the wall-time speedup measured in this one run, the NFE ratio and both
quality figures. Goal (issue 2): >= 90x speedup with CD's energy distance within 1.5x of the
teacher's. The tutorial reported 65x at 99 vs 1 NFE.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from cmray.config import load_config
from cmray.experiments import toy2d
from cmray.train.toy_config import Toy2DConfig

ROOT = Path(__file__).resolve().parents[1]


def models_for(run: Path) -> tuple[Toy2DConfig, toy2d.ToyModels]:
    if not (run / toy2d.MODELS_FILE).exists():
        print(f"no models in {run}: training them with configs/toy2d.yaml first", flush=True)
        toy2d.run(load_config(Toy2DConfig, ROOT / "configs" / "toy2d.yaml"), run)
    cfg = load_config(Toy2DConfig, run / "config.yaml")
    return cfg, toy2d.load_models(cfg, run / toy2d.MODELS_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "toy2d")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, models = models_for(args.run)
    entries, _ = toy2d.evaluate(cfg, models, repeats=args.repeats)
    teacher, cd = entries[0], entries[1]
    speedup = teacher["wall_time_s"] / cd["wall_time_s"]
    quality = cd["energy_distance"] / teacher["energy_distance"]
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {cfg.eval.num_samples} samples, median of {args.repeats}"
    )
    for e in (teacher, cd):
        print(
            f"  {e['method']:<26} NFE {e['nfe']:>3}  {e['wall_time_s'] * 1e3:8.3f} ms  "
            f"energy {e['energy_distance']:.4f}  MMD {e['mmd']:.5f}  on-mode {e['on_mode']:.3f}"
        )
    print(
        f"speedup (teacher / CD wall time): {speedup:.1f}x at {teacher['nfe'] / cd['nfe']:.0f}x "
        f"fewer NFE   [goal >= 90x; tutorial 65x]"
    )
    print(f"quality ratio (CD / teacher energy distance): {quality:.2f}   [goal <= 1.5]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
