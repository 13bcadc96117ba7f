"""Images/s, peak memory and estimated MFU of the LSUN-256 training step (CD-LPIPS by default).

    python benchmarks/gpu_cd_step.py                 # on a GPU: the shipped CD-LPIPS config, bf16
    python benchmarks/gpu_cd_step.py --config configs/lsun_bedroom256_ct_lpips.yaml
    python benchmarks/gpu_cd_step.py --preset tiny --device cpu --batches 2 4 --precision fp32 \
        --repeats 1 --settings shipped off          # a smoke run

The step is the real one (``cmray.train.step.train_step``) of the shipped config, EMA rates and
optimizer included. For CD: the student's forward and backward, the target's forward, a Heun
step of an EDM teacher of the same architecture, and LPIPS (VGG16) with its backward. The
networks are randomly initialised (speed does not depend on the weights); the VGG16 weights are
random too, written to a file and loaded through the same path real weights take.

Three settings: the config as shipped (the LSUN configs: 32 images per GPU in 4 passes of 8),
then batch sizes tried in order in one pass per step, without and then with activation
checkpointing (``net.use_checkpoint``), until one runs out of memory: that gives the largest
batch one pass holds.
FLOPs per image are counted once with ``torch.utils.flop_counter``, at batch 1 without checkpointing
(model FLOPs: recomputation is not counted as useful work). MFU is FLOP/s over the device's
dense peak (``--peak-tflops``; known for H100, H200 and A100).

The baseline is the assumption behind the GPU-hour table in infra/README.md: 2.24 TFLOP per
ADM-256 forward, 6 forward-equivalents per CD image (CT 4, EDM 3), 40% of the peak. Each row
prints measured img/s over that assumed rate, and the end prints the run's GPU-hours at the
shipped setting's rate and at the best.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import device_name, start, sync

from cmray.config import apply_overrides, from_dict, read_config_file, to_dict, with_values
from cmray.nets.unet import UNET_PRESETS
from cmray.train.config import ObjectiveConfig, TrainConfig
from cmray.train.loop import Trainer, batch_draws, build_trainer, save_model_file
from cmray.train.step import microbatch_sizes, train_step
from cmray.weights import KNOWN_WEIGHTS

DEFAULT_CONFIG = "configs/lsun_bedroom256_cd_lpips.yaml"
VGG16_FILE = KNOWN_WEIGHTS["vgg"][0]  # the real file's name, so the real loading path runs
TEACHER_FILE = "teacher.pt"
DEFAULT_BATCHES = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched against the device name.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
# infra/README.md, "What the reference runs cost": ADM-256 forward cost and forwards per image.
ASSUMED_FORWARD_TFLOP = 2.24  # flop_counter's count of the 526M-parameter net, 256x256
ASSUMED_FORWARDS = {"cd": 6, "ct": 4, "edm": 3}
ASSUMED_MFU = 0.40


SETTINGS = {
    "shipped": "the config as shipped (its batch, microbatches and checkpointing)",
    "off": "one pass per step, no activation checkpointing",
    "on": "one pass per step, activation checkpointing",
}


@dataclass
class Row:
    setting: str
    batch: int
    microbatches: int
    img_per_s: float
    ms_per_step: float
    peak_gib: float
    mfu: float
    vs_assumed: float


def peak_tflops(name: str) -> float:
    """The dense bf16 peak of a known device, else NaN (MFU then reads nan)."""
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return math.nan


def assumed_img_per_s(kind: str, peak: float) -> float:
    """The baseline: images/s a device of ``peak`` TFLOP/s gives at the assumed cost and MFU."""
    return ASSUMED_MFU * peak / (ASSUMED_FORWARD_TFLOP * ASSUMED_FORWARDS[kind])


def write_random_vgg16(path: Path) -> None:
    from torchvision.models import vgg16

    torch.save(vgg16(weights=None).state_dict(), path)


def write_teacher(cfg: TrainConfig, path: Path) -> None:
    """A random EDM teacher of the student's architecture, as a model file ``load_model`` reads."""
    edm = from_dict(TrainConfig, with_values(to_dict(cfg), {"objective": {"kind": "edm"}}))
    save_model_file(build_trainer(edm, torch.device("cpu")), path)


def make_config(args: argparse.Namespace, work: Path, setting: str) -> TrainConfig:
    """The shipped config with its storage pointed at ``work`` and random weights in place;
    for the sweeps, one pass per step with checkpointing off or on."""
    data = apply_overrides(read_config_file(args.config), args.set)
    if args.preset:
        data["net"] = dict(UNET_PRESETS[args.preset])
    values: dict[str, Any] = {
        "data.manifest": "unused://",
        "run.storage_path": str(work / "runs"),
        "loop.precision": args.precision or data.get("loop", {}).get("precision", "bf16"),
    }
    if setting != "shipped":
        values |= {"net.use_checkpoint": setting == "on", "loop.microbatch": 0}
    objective = data.get("objective", {})
    if objective.get("metric") == "lpips":
        values["objective.lpips_weights"] = str(work / VGG16_FILE)
    # Every model source the shipped config names (CD's teacher and start, ECT's and sCM's
    # start, sCD's teacher) becomes the one random EDM file; a CT config names none.
    for key in ObjectiveConfig.SOURCE_FIELDS:
        section, name = key.split(".")
        if objective.get(section, {}).get(name):
            values[f"objective.{key}"] = str(work / TEACHER_FILE)
    return from_dict(TrainConfig, with_values(data, values))


def random_batch(trainer: Trainer, batch: int) -> torch.Tensor:
    """Images in [-1, 1], channels-last as the shard stream delivers them."""
    res = trainer.cfg.net.resolution
    x = torch.rand(batch, 3, res, res, device=trainer.device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last)


def one_step(trainer: Trainer, x0: torch.Tensor) -> None:
    cfg = trainer.cfg
    draws = batch_draws(trainer, len(x0))
    train_step(trainer.state, trainer.objective, x0, cfg.loop, cfg.optim, draws)


def time_step(trainer: Trainer, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds per step and peak memory (GiB; NaN on a CPU) at this batch, after one warm-up."""
    x0 = random_batch(trainer, batch)
    one_step(trainer, x0)
    cuda = trainer.device.type == "cuda"
    sync(trainer.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    began = time.perf_counter()
    for _ in range(repeats):
        one_step(trainer, x0)
    sync(trainer.device)
    seconds = (time.perf_counter() - began) / repeats
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else math.nan
    return seconds, peak


def count_flops(trainer: Trainer, batch: int) -> float:
    """Model FLOPs per image of one step (forward and backward of every network in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    x0 = random_batch(trainer, batch)
    with FlopCounterMode(display=False) as counter:
        one_step(trainer, x0)
    return counter.get_total_flops() / batch


def release(device: torch.device) -> None:
    """Give back what a finished or out-of-memory trainer held before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(trainer: Trainer, setting: str, batch: int, flops: float, args) -> Row | None:
    """Time one batch size and print its row; None when it does not fit in memory."""
    passes = len(microbatch_sizes(batch, trainer.cfg.loop.microbatch))
    label = f"{setting:>7} batch {batch:3d} ({passes} pass(es))"
    try:
        seconds, peak = time_step(trainer, batch, args.repeats)
    except RuntimeError as exc:  # cuBLAS/cuDNN workspace failures are not OutOfMemoryError
        text = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and not (
            "out of memory" in text or "ALLOC_FAILED" in text
        ):
            raise
        print(f"{label}: out of memory", flush=True)
        return None
    rate = batch / seconds
    mfu = flops * rate / (args.peak_tflops * 1e12)
    vs_assumed = rate / assumed_img_per_s(trainer.cfg.objective.kind, args.peak_tflops)
    row = Row(setting, batch, passes, rate, seconds * 1e3, peak, mfu, vs_assumed)
    print(
        f"{label}: {rate:7.1f} img/s {row.ms_per_step:8.1f} ms/step  peak {peak:5.1f} GiB  "
        f"MFU {100 * mfu:5.1f}%  img/s / assumed {vs_assumed:.3f}",
        flush=True,
    )
    return row


def run_setting(cfg: TrainConfig, setting: str, flops: float, args) -> list[Row]:
    """The shipped batch once, or each sweep batch until one does not fit."""
    trainer = build_trainer(cfg, torch.device(args.device))
    batches = [cfg.worker_batch()] if setting == "shipped" else args.batches
    rows = []
    for batch in batches:
        row = measure(trainer, setting, batch, flops, args)
        if row is None:
            break
        rows.append(row)
    return rows


def gpu_hours(cfg: TrainConfig, img_per_s: float) -> float:
    """The config's whole run (steps x global batch) at ``img_per_s`` per GPU."""
    return cfg.loop.steps * cfg.data.batch_size / img_per_s / 3600


def summary(cfg: TrainConfig, rows: list[Row], flops: float, args: argparse.Namespace) -> dict:
    kind = cfg.objective.kind
    baseline = assumed_img_per_s(kind, args.peak_tflops)
    assumed_tflop = ASSUMED_FORWARD_TFLOP * ASSUMED_FORWARDS[kind]
    print(f"{flops / 1e12:.2f} TFLOP per image (assumed {assumed_tflop:.1f})")
    for setting in ("off", "on"):
        fits = [r.batch for r in rows if r.setting == setting]
        if fits:
            print(f"largest batch in one pass, checkpointing {setting}: {max(fits)}")
    run = f"{cfg.loop.steps:,} steps x {cfg.data.batch_size} images on {cfg.run.max_workers} GPUs"
    result: dict[str, Any] = {"assumed_img_per_s": baseline}
    for name, pick in (("shipped", [r for r in rows if r.setting == "shipped"]), ("best", rows)):
        if pick:
            row = max(pick, key=lambda r: r.img_per_s)
            hours = gpu_hours(cfg, row.img_per_s)
            print(
                f"{name}: {row.img_per_s:.1f} img/s ({row.setting}, batch {row.batch}), "
                f"{row.vs_assumed:.3f} x the assumed {baseline:.1f} img/s; {run} = "
                f"{hours:,.0f} GPU-hours at that rate"
            )
            result[name] = asdict(row) | {"gpu_hours": hours}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a training config (YAML)")
    parser.add_argument("--set", action="append", default=[], help="override key=value")
    parser.add_argument("--preset", default=None, choices=sorted(UNET_PRESETS), help="net")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help=str(SETTINGS)
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU: 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start(args.device, args.threads)
    # The random VGG16 and teacher files are gigabytes at LSUN size: always removed.
    with tempfile.TemporaryDirectory(prefix="cmray-gpu-bench-") as tmp:
        return benchmark(args, device, Path(tmp))


def benchmark(args: argparse.Namespace, device: torch.device, work: Path) -> int:
    name = device_name(device)
    args.peak_tflops = args.peak_tflops or peak_tflops(name)
    write_random_vgg16(work / VGG16_FILE)
    shipped = make_config(args, work, "shipped")
    if shipped.objective.sources():  # CD's teacher, ECT's and sCM's start
        write_teacher(shipped, work / TEACHER_FILE)
    # Counted at batch 1: FLOPs are linear in the batch, and the smallest one surely fits.
    flops = count_flops(build_trainer(make_config(args, work, "off"), device), 1)
    release(device)
    print(
        f"{name}; {args.config}; net {args.preset or 'from the config'}; "
        f"{shipped.loop.precision}; peak {args.peak_tflops} TFLOP/s"
    )
    rows: list[Row] = []
    for setting in args.settings:
        rows += run_setting(make_config(args, work, setting), setting, flops, args)
        release(device)
    if not rows:
        print("no setting ran: every batch was too large", file=sys.stderr)
        return 1
    result = {"device": name, "config": args.config, "tflop_per_image": flops / 1e12}
    result |= summary(shipped, rows, flops, args)
    if args.json:
        rows_out = {"rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(result | rows_out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
