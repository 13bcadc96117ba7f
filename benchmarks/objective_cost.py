"""What each objective's training step costs: CD, CT, ECT, sCT and sCD on one U-Net and batch.

    python benchmarks/objective_cost.py                 # speed: the tiny U-Net, batch 8, CPU
    python benchmarks/objective_cost.py --memory        # + bytes saved for backward at LSUN size

Speed: one run builds a trainer per objective from the same net, batch, precision and random
teacher (an EDM model file that CD distils, ECT and sCM start from and sCD follows), and
times ``train_step`` on one fixed batch. CD and CT use the l2 metric, so the figures compare
the objectives, not LPIPS. The baseline is CT's step (one online forward and backward, one
target forward); each line's ratio is its images/s over CT's, in the same run.

Memory (``--memory``): the bytes one pass saves for backward per image, at LSUN 256 size, on
fake tensors (``activation_memory.saved_bytes``: shapes only, so a 526M-parameter pass takes
seconds), again as a ratio to CT's. A JVP runs under no_grad, so what sCM's tangent costs is
transient (forward-mode AD keeps a tangent beside each live activation and frees it with the
activation), not saved; the saved bytes show whether anything of it is kept (forward-mode AD
cannot run on fake tensors, so the finite-difference tangent, also under no_grad, stands in
for the count). Needs about 15 GB of memory and a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from activation_memory import saved_bytes
from common import start
from gpu_cd_step import TEACHER_FILE, make_config, write_teacher
from gpu_cd_step import parse_args as step_args

from cmray.config import from_dict, to_dict
from cmray.nets.unet import unet_config
from cmray.train.config import ObjectiveConfig, TrainConfig
from cmray.train.loop import batch_draws, build_trainer
from cmray.train.step import train_step

# name -> the config keys that make it (the model sources are filled in per run).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "ct": {"objective.kind": "ct"},
    "cd": {"objective.kind": "cd"},
    "ect": {"objective.kind": "ect"},
    "sct": {"objective.kind": "scm", "objective.scm.mode": "ct"},
    "scd": {"objective.kind": "scm", "objective.scm.mode": "cd"},
}
MIB = 2**20
# Every model source is the one random EDM file, except CT's start: CT trains from data.
SOURCES = tuple(k for k in ObjectiveConfig.SOURCE_FIELDS if k != "ct.init")


def small_config(args: argparse.Namespace, name: str, teacher: Path) -> TrainConfig:
    """The speed run's config: the preset net, l2, one pass per step, no EMA copies."""
    data: dict[str, Any] = {
        "data": {"manifest": "unused://", "batch_size": args.batch},
        "net": to_dict(unet_config(args.preset)),
        "objective": {"metric": "l2", **{k.split(".")[0]: {} for k in SOURCES}},
        "loop": {"precision": args.precision, "ema_rates": []},
        "run": {"num_workers": 1},
    }
    for key in SOURCES:
        section, field = key.split(".")
        data["objective"][section][field] = str(teacher)
    for key, value in OBJECTIVES[name].items():
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(TrainConfig, data)


def images_per_s(cfg: TrainConfig, device: torch.device, repeats: int) -> float:
    trainer = build_trainer(cfg, device)
    res = cfg.net.resolution
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(cfg.data.batch_size, 3, res, res, generator=g) * 2 - 1).to(device)
    x0 = x0.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        draws = batch_draws(trainer, len(x0))
        assert train_step(trainer.state, trainer.objective, x0, cfg.loop, cfg.optim, draws).finite

    step()  # warm-up: allocator, kernels
    tick = time.perf_counter()
    for _ in range(repeats):
        step()
    return cfg.data.batch_size * repeats / (time.perf_counter() - tick)


def speed(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    base = small_config(args, "ct", work / TEACHER_FILE)
    write_teacher(base, work / TEACHER_FILE)
    rates = {
        name: images_per_s(small_config(args, name, work / TEACHER_FILE), device, args.repeats)
        for name in OBJECTIVES
    }
    print(f"speed: net {args.preset}, batch {args.batch}, {args.precision}, {args.repeats} steps")
    for name, rate in rates.items():
        print(f"  {name:4s} {rate:8.2f} images/s   ratio to ct {rate / rates['ct']:.2f}")


def memory(args: argparse.Namespace, work: Path) -> None:
    """Saved-for-backward bytes per image at LSUN size, each objective on the LSUN CD config."""
    per_image = {}
    for name, keys in OBJECTIVES.items():
        sets = [f"{k}={v}" for k, v in keys.items()]
        # Forward-mode AD cannot run on fake tensors; the finite-difference tangent stands in
        # for it. Both run under no_grad, so the bytes saved for backward are the same.
        sets += ["objective.metric=l2", "loop.ema_rates=[]", "objective.scm.jvp=fd"]
        forwarded = ["--config", args.lsun_config, "--device", "cpu", "--precision", "bf16"]
        step = step_args(forwarded + [w for kv in sets for w in ("--set", kv)])
        cfg = make_config(step, work, "off")
        if not (work / TEACHER_FILE).exists():
            write_teacher(cfg, work / TEACHER_FILE)
        trainer = build_trainer(cfg, torch.device("cpu"))
        one, two = (sum(saved_bytes(trainer, b).values()) for b in (1, 2))
        per_image[name] = two - one
        del trainer
    print(f"saved for backward per image: {args.lsun_config}, bf16, l2")
    for name, nbytes in per_image.items():
        ratio = nbytes / per_image["ct"]
        print(f"  {name:4s} {nbytes / MIB:9.1f} MiB   ratio to ct {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="the speed run's U-Net preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also count LSUN-size memory")
    parser.add_argument("--lsun-config", default="configs/lsun_bedroom256_cd_lpips.yaml")
    args = parser.parse_args(argv)
    device = start(args.device, args.threads)
    with tempfile.TemporaryDirectory(prefix="cmray-objective-cost-") as tmp:
        speed(args, device, Path(tmp))
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="cmray-objective-memory-") as tmp:
            memory(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
