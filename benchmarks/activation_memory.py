"""Memory of the LSUN-256 training step, counted without a GPU: what one pass saves for backward.

    python benchmarks/activation_memory.py            # CD-LPIPS as shipped, bf16
    python benchmarks/activation_memory.py --config configs/lsun_bedroom256_ct_lpips.yaml
    python benchmarks/activation_memory.py --config configs/lsun_bedroom256_scd.yaml  # sCM

The loss of the shipped config's real step (``objective.loss``, under the step's autocast) runs
on fake tensors (``torch._subclasses.FakeTensorMode``): every operator computes shapes and
dtypes only, so a 526M-parameter pass takes seconds on a CPU. A saved-tensors hook records each
storage autograd keeps for backward. Counted once each, those are the activations a pass holds
when its backward starts, which is when the step's memory peaks. The networks' weights are
left out (they are counted with the fixed memory below); their autocast copies (bf16 weights
kept for the backward of every layer) are counted. A test checks that fake tensors count what
real ones save. Autocast follows its CPU rules here; for these operators (convolution, linear
and attention in bf16, the rest as given) CUDA's rules agree.

Two passes (``--batches``, default 1 and 2) split the saved bytes into a part that does not
grow with the batch (the autocast weight copies) and a part per image. The step's fixed memory
is added to them: the weights of every network, the gradients, and the optimizer's moments.
That predicts the memory of a pass of B images and the largest B that fits on a GPU of
``--gib`` GiB.

Activation checkpointing is off, as shipped: its own hooks would hide what it keeps. The
networks themselves are real, so at LSUN size the script needs about 15 GB of memory and half
a minute.

The baseline is the estimate behind the shipped ``loop.microbatch: 8``: a pass of 32 images
holds about 115 GiB of activations. The ratio printed is counted / estimated.

What this does not see, so a GPU's peak is higher: the CUDA caching allocator's rounding and
fragmentation, cuDNN and cuBLAS workspaces, and transient buffers inside a kernel. Kernels
choose what to save as their CPU versions do here: a CPU flash attention saves its log-sum-exp
like the CUDA kernels, and convolutions save their input and weight on both.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from common import start
from gpu_cd_step import (
    TEACHER_FILE,
    VGG16_FILE,
    make_config,
    write_random_vgg16,
    write_teacher,
)
from gpu_cd_step import parse_args as step_args
from torch._subclasses.fake_tensor import FakeTensorMode

from cmray.train.loop import Trainer, batch_draws, build_trainer
from cmray.train.step import autocast, stopgrad_net

ESTIMATED_GIB_AT_32 = 115.0  # the estimate the shipped configs' comments cite
GIB = 2**30


def weights_bytes(trainer: Trainer) -> int:
    """Every network's weights, the gradients, and Adam/RAdam's two moments per weight."""
    state, objective = trainer.state, trainer.objective
    # The objective holds the CD teacher and LPIPS as attributes.
    held = [m for m in vars(objective).values() if isinstance(m, torch.nn.Module)]
    seen: dict[int, int] = {}
    for net in [state.online, state.target, *state.ema.copies, *held]:
        if net is not None:
            for p in [*net.parameters(), *net.buffers()]:
                seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    trainable = sum(p.numel() * p.element_size() for p in state.online.parameters())
    return sum(seen.values()) + 3 * trainable  # gradients and two moments


def saved_bytes(trainer: Trainer, batch: int, fake: bool = True) -> dict[str, int]:
    """Bytes by dtype of the storages one pass of ``batch`` images saves for backward; on fake
    tensors unless ``fake`` is False (the same count, computed for real: slow at LSUN size)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        saved: dict[int, tuple[int, str]] = {}
        kept: list[torch.Tensor] = []  # alive to the end, so no storage's address is reused

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):  # weights are counted in weights_bytes
                storage = t.untyped_storage()
                saved[storage._cdata] = (storage.nbytes(), str(t.dtype).removeprefix("torch."))
                kept.append(t)
            return t

        res = trainer.cfg.net.resolution
        x0 = torch.rand(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
        state, hooks = trainer.state, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, autocast(trainer.cfg.loop.precision, trainer.device):
            target = stopgrad_net(state)  # the EMA target, or ECT's and sCM's online net
            draws = batch_draws(trainer, batch)
            trainer.objective.loss(state.online, target, x0, state.step, draws)
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return by_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/lsun_bedroom256_cd_lpips.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--preset", default=None, help="a UNET_PRESETS net instead")
    parser.add_argument("--batches", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--gib", type=float, default=80.0, help="GPU memory (H100: 80)")
    args = parser.parse_args(argv)
    start("cpu", None)
    forwarded = ["--config", args.config, "--device", "cpu"]
    # sCM's tangent: forward-mode AD cannot run on fake tensors; the finite difference, under
    # no_grad like the JVP, saves the same for backward (nothing).
    forwarded += [w for kv in [*args.set, "objective.scm.jvp=fd"] for w in ("--set", kv)]
    forwarded += ["--preset", args.preset] if args.preset else []
    step = step_args(forwarded)
    # The random teacher and VGG16 files are gigabytes at LSUN size: always removed.
    with tempfile.TemporaryDirectory(prefix="cmray-activation-memory-") as tmp:
        work = Path(tmp)
        shipped = make_config(step, work, "shipped")
        if shipped.objective.metric == "lpips":
            write_random_vgg16(work / VGG16_FILE)
        if shipped.objective.sources():  # CD's teacher, ECT's and sCM's start
            write_teacher(shipped, work / TEACHER_FILE)
        trainer = build_trainer(make_config(step, work, "off"), torch.device("cpu"))
    report(trainer, shipped.loop.microbatch or shipped.worker_batch(), args)
    return 0


def report(trainer: Trainer, shipped_pass: int, args: argparse.Namespace) -> None:
    small, large = args.batches
    counted = {b: saved_bytes(trainer, b) for b in (small, large)}
    totals = {b: sum(v.values()) for b, v in counted.items()}
    per_image = (totals[large] - totals[small]) / (large - small)
    fixed = totals[small] - small * per_image
    weights = weights_bytes(trainer)
    cfg = trainer.cfg
    print(f"{args.config}; net {args.preset or 'from the config'}; {cfg.loop.precision}")
    for b, by_dtype in counted.items():
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(by_dtype.items()))
        print(f"saved for backward, pass of {b}: {totals[b] / GIB:.2f} GiB ({parts})")
    print(f"per image: {per_image / GIB:.3f} GiB; the rest of a pass: {fixed / GIB:.2f} GiB")
    print(f"weights, gradients and moments: {weights / GIB:.2f} GiB")
    for b in sorted({shipped_pass, 32}):
        print(f"a pass of {b}: {(weights + fixed + b * per_image) / GIB:.1f} GiB in all")
    room = args.gib * GIB - weights - fixed
    print(f"largest pass on {args.gib:g} GiB (before allocator overhead): {int(room // per_image)}")
    ratio = 32 * per_image / GIB / ESTIMATED_GIB_AT_32
    print(f"activations of 32 images, counted / {ESTIMATED_GIB_AT_32:g} GiB estimated: {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
