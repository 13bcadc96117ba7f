"""Peak memory of reading a model from a training checkpoint, as every CD rank reads its teacher.

    python benchmarks/teacher_load.py [--config configs/lsun_bedroom256_edm.yaml] [--set k=v ...]

An EDM teacher's checkpoint holds the online net, its EMA copy and RAdam's two moments: four
copies of the weights, of which sampling needs one. ``load_model`` memory-maps a local
checkpoint, so only that copy is read. The baseline is ``load_model`` through a non-local
filesystem (fsspec's ``simplecache::``, which reads the file whole, as from S3).

A checkpoint of the config's net with random weights (moments made by one zero-gradient step)
is written to a temporary directory. Each way then runs in a fresh process, which prints its
peak resident memory above what it held after its imports. Printed: the file size, both peaks
and their ratio. Memory-mapped, the peak is the net and the mapped pages of its one copy (about
2 of the file's 4 copies; the mapped pages are page cache the kernel can drop); read whole, it
is the file plus the net (about 5). The default net is the shipped config
at ``net.model_channels=64`` (1/16 of its parameters); ``--set net.model_channels=256`` is the
full 526M-parameter net, an 8.4 GB file that needs about 11 GB of memory to write.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import child_json, peak_mib, start

from cmray.config import apply_overrides, from_dict, read_config_file
from cmray.models import load_model
from cmray.train import state as ckpt
from cmray.train.config import TrainConfig
from cmray.train.loop import build_trainer

DEFAULTS = ["net.model_channels=64", "data.manifest=unused://"]


def write_checkpoint(cfg: TrainConfig, directory: Path) -> Path:
    """A checkpoint of ``cfg``'s net after one optimizer step on zero gradients."""
    trainer = build_trainer(cfg, torch.device("cpu"))
    for p in trainer.state.online.parameters():
        p.grad = torch.zeros_like(p)
    trainer.state.optimizer.step()
    return ckpt.save_checkpoint(trainer.state, directory, rank=0, world_size=1)


def child(way: str, directory: str) -> None:
    """Load the model one way; print its peak above the post-import peak as JSON."""
    before = peak_mib()
    model, _ = load_model(directory if way == "mapped" else f"simplecache::{directory}")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"way": way, "peak_mib": peak_mib() - before, "params": params}))


def measure(way: str, directory: Path) -> dict[str, float]:
    return child_json(__file__, way, str(directory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/lsun_bedroom256_edm.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    start("cpu", None)
    data = apply_overrides(read_config_file(args.config), DEFAULTS + args.set)
    cfg = from_dict(TrainConfig, data)
    with tempfile.TemporaryDirectory(prefix="cmray-teacher-load-") as tmp:
        directory = write_checkpoint(cfg, Path(tmp) / "checkpoint")
        size = (directory / ckpt.STATE_FILE).stat().st_size / 2**20
        whole, mapped = measure("whole", directory), measure("mapped", directory)
    print(f"{args.config} {' '.join(args.set)}: {mapped['params'] / 1e6:.1f}M parameters")
    print(f"state file: {size:.0f} MiB")
    print(f"read whole (baseline): peak +{whole['peak_mib']:.0f} MiB")
    print(f"memory-mapped: peak +{mapped['peak_mib']:.0f} MiB")
    print(f"ratio memory-mapped / read whole: {mapped['peak_mib'] / whole['peak_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
