"""One optimiser step: microbatches, mixed precision, clipping, the NaN guard, target and EMA.

No Ray here: the same function runs under Ray Train, in tests and in benchmarks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from cmray.core.ema import ema_update_
from cmray.train.config import LoopConfig, OptimConfig
from cmray.train.objectives import Draws, Objective, conditioned
from cmray.train.state import TrainState, unwrap

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The step's mixed precision: autocast to ``loop.precision``'s dtype, or nothing (fp32)."""
    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[precision])


def _no_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    # DDP all-reduces on every backward; accumulating microbatches only needs the last one.
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


@dataclass(frozen=True)
class Share:
    """This rank's part of the global batch: ``size`` samples over ``world`` ranks."""

    size: int
    world: int = 1


def microbatch_sizes(n: int, microbatch: int) -> list[int]:
    """A share of n images in passes of at most ``microbatch`` (0: one pass)."""
    if not microbatch or n <= microbatch:
        return [n]
    return [microbatch] * (n // microbatch) + ([n % microbatch] if n % microbatch else [])


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks of the process group (itself without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def _accumulate(
    state: TrainState,
    objective: Objective,
    x0: torch.Tensor,
    loop: LoopConfig,
    gen: Draws,
    labels: torch.Tensor | None,
    share: Share,
) -> float:
    """Forward and backward over this rank's microbatches; the mean loss over the global batch.

    Each sample's loss is weighted by world / global size, so DDP's mean over ranks is the mean
    over the global batch whatever each rank's share: the same optimisation at any world size.
    """
    sizes = microbatch_sizes(len(x0), loop.microbatch)
    weight = share.world / share.size
    chunks, label_chunks = x0.split(sizes), [None] * len(sizes)
    if labels is not None:
        label_chunks = list(labels.split(sizes))
    total = torch.zeros((), device=x0.device, dtype=torch.float64)
    for i, (chunk, y, draws) in enumerate(zip(chunks, label_chunks, gen.split(sizes), strict=True)):
        with _no_sync(state.online, i == len(chunks) - 1):
            with autocast(loop.precision, x0.device):
                nets = conditioned(state.online, y), conditioned(stopgrad_net(state), y)
                loss = objective.loss(*nets, chunk, state.step, draws, y).sum()
            scaled = loss * weight
            (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
        total += loss.detach().double()
    # One collective and one device sync for the step's loss, not one per microbatch.
    return float(global_sum(total)) / share.size


def stopgrad_net(state: TrainState) -> torch.nn.Module:
    """theta-: the EMA target network where there is one (CD, CT); otherwise the online
    weights themselves, unwrapped from DDP because no gradient flows through them (ECT, sCM)."""
    return state.target if state.target is not None else unwrap(state.online)


def _grad_norm(state: TrainState, clip: float) -> float:
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    params = [p for p in state.online.parameters() if p.grad is not None]
    max_norm = clip if clip > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _loss_scale_overflow(state: TrainState, loss: float) -> bool:
    """A finite loss whose fp16-scaled gradients overflowed while the scale is still >= 1: the
    scaler halves the scale and the next step retries, its normal way of finding the scale."""
    return state.scaler is not None and math.isfinite(loss) and state.scaler.get_scale() >= 1.0


def train_step(
    state: TrainState,
    objective: Objective,
    x0: torch.Tensor,
    loop: LoopConfig,
    optim: OptimConfig,
    gen: Draws,
    labels: torch.Tensor | None = None,
    share: Share | None = None,
) -> StepResult:
    """Algorithm 2/3 lines 4-9 for one batch: update theta, then theta- and the EMA copies.

    A step whose loss or gradient is not finite changes nothing but the counters, and
    ``loop.nonfinite_limit`` of them in a row raise ``NonFiniteLossError``; fp16's loss-scale
    overflows are skipped too but do not count towards the limit. ``labels`` are the batch's
    classes, for a class-conditional network; ``share`` says which part of the global batch
    ``x0`` is (default: all of it, on one rank).
    """
    state.optimizer.zero_grad(set_to_none=True)
    loss = _accumulate(state, objective, x0, loop, gen, labels, share or Share(len(x0)))
    grad_norm = _grad_norm(state, optim.grad_clip)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
        else:
            state.optimizer.step()
        _update_copies(state, objective.target_mu(state.step))
        state.nonfinite_run = 0
    else:
        state.skipped_steps += 1
        state.nonfinite_run += 0 if _loss_scale_overflow(state, loss) else 1
        if state.nonfinite_run >= loop.nonfinite_limit:
            raise NonFiniteLossError(
                f"{state.nonfinite_run} steps in a row had a non-finite loss or gradient (last "
                f"loss {loss}, step {state.step}); lower optim.lr or use loop.precision=bf16"
            )
    if state.scaler is not None:
        state.scaler.update()  # fp16 loss scaling backs off after an overflow
    state.step += 1
    return StepResult(loss, grad_norm, finite)


@torch.no_grad()
def _update_copies(state: TrainState, mu: float | None) -> None:
    online = unwrap(state.online)
    if mu is not None and state.target is not None:
        ema_update_(state.target, online, mu)
    state.ema.update_(online, state.step)
