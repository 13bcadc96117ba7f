"""Images/s, peak memory and estimated MFU of the LSUN-256 CD-LPIPS training step.

    python benchmarks/gpu_cd_step.py                       # on a GPU: lsun256, bf16
    python benchmarks/gpu_cd_step.py --preset tiny --device cpu --batches 2 4   # a smoke run

The step is the real one (``cmray.train.step.train_step``): the student's forward and backward,
the target's forward, a Heun step of an EDM teacher of the same architecture, and LPIPS (VGG16)
with its backward. The networks are randomly initialised (speed does not depend on the
weights); the VGG16 weights are random too, written to a file and loaded through the same path
real weights take. FLOPs per step are counted once with ``torch.utils.flop_counter`` at the
smallest batch and scaled linearly; MFU = FLOPs/s over ``--peak-tflops`` (H100 SXM dense bf16:
989). Batch sizes are tried in order until one runs out of memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from cmray.config import from_dict, to_dict
from cmray.nets.unet import UNET_PRESETS
from cmray.train.config import TrainConfig
from cmray.train.loop import build_net, build_trainer


def write_random_vgg16(path: Path) -> None:
    from torchvision.models import vgg16

    torch.save(vgg16(weights=None).state_dict(), path)


def make_config(preset: str, precision: str, teacher_dir: Path, vgg: Path) -> TrainConfig:
    net = dict(UNET_PRESETS[preset])
    return from_dict(
        TrainConfig,
        {
            "data": {"manifest": "unused://", "batch_size": 1},
            "net": net,
            "objective": {
                "kind": "cd",
                "metric": "lpips",
                "lpips_weights": str(vgg),
                "cd": {"teacher": str(teacher_dir), "N": 40, "mu": 0.95},
            },
            "loop": {"precision": precision, "ema_rates": [0.9999]},
            "run": {"num_workers": 1},
        },
    )


def write_teacher(cfg: TrainConfig, directory: Path) -> None:
    """A random EDM teacher checkpoint in the format ``load_model`` reads."""
    from cmray.core.ema import EMABank

    edm = from_dict(TrainConfig, dict(to_dict(cfg), objective={"kind": "edm"}))
    net = build_net(edm)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "config": to_dict(edm),
        "online": net.state_dict(),
        "ema": EMABank(net, edm.loop.ema_rates).state_dict(),
    }
    torch.save(state, directory / "state.pt")


def time_step(trainer, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds per step and peak memory (GiB) at this batch."""
    from cmray.train.step import train_step

    cfg, device = trainer.cfg, trainer.device
    x0 = torch.rand(batch, 3, cfg.net.resolution, cfg.net.resolution, device=device) * 2 - 1

    def step() -> None:
        train_step(trainer.state, trainer.objective, x0, cfg.loop, cfg.optim, trainer.gen)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() / 2**30
    return (time.perf_counter() - start) / repeats, float("nan")


def count_flops(trainer, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from cmray.train.step import train_step

    cfg = trainer.cfg
    x0 = torch.rand(batch, 3, cfg.net.resolution, cfg.net.resolution, device=trainer.device)
    with FlopCounterMode(display=False) as counter:
        train_step(trainer.state, trainer.objective, x0 * 2 - 1, cfg.loop, cfg.optim, trainer.gen)
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lsun256", choices=sorted(UNET_PRESETS))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="cmray-gpu-bench-"))
    write_random_vgg16(work / "vgg16-397923af.pth")
    cfg = make_config(args.preset, args.precision, work / "teacher", work / "vgg16-397923af.pth")
    write_teacher(cfg, work / "teacher")
    trainer = build_trainer(cfg, device)
    flops = count_flops(trainer, args.batches[0])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; preset {args.preset}; {args.precision}; {flops / 1e12:.2f} TFLOP per image")
    for batch in args.batches:
        try:
            seconds, peak = time_step(trainer, batch, args.repeats)
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            break
        mfu = flops * batch / seconds / (args.peak_tflops * 1e12)
        print(
            f"batch {batch:3d}: {batch / seconds:8.1f} img/s  {seconds * 1e3:8.1f} ms/step  "
            f"peak {peak:6.1f} GiB  MFU {100 * mfu:5.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
