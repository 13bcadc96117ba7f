"""Target network and saved EMA copies.

Paper Algorithm 2/3: theta- <- stopgrad(mu theta- + (1 - mu) theta). mu = 0 makes the target a
plain stop-gradient copy of the online net (iCT). Separately, the released code keeps EMA copies
at fixed rates (e.g. 0.9999, 0.99994, 0.9999432189950708) for sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, mu: float) -> None:
    """Algorithm 2 line 9: theta- <- mu theta- + (1 - mu) theta, in place; mu = 0 copies exactly."""
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"EMA rate mu = {mu}: accepted 0 <= mu < 1")
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if mu == 0.0:
        # lerp with weight 1 can round; a copy is bit-exact.
        torch._foreach_copy_(t_params, o_params)
    else:
        torch._foreach_lerp_(t_params, o_params, 1.0 - mu)
    for t_buf, o_buf in zip(target.buffers(), online.buffers(), strict=True):
        t_buf.copy_(o_buf)


def ema_rate_rampup(rate: float, k: int, ratio: float) -> float:
    """EDM's EMA warm-up (Karras et al. 2022, training_loop.py, ema_rampup_ratio): the rate at
    step k whose half-life is at most ``ratio`` of the steps taken so far.

    Without it a copy started from random weights still holds rate^k of them after k steps
    (0.999: 67% at 400 steps). ratio = 0 turns the warm-up off.
    """
    if ratio <= 0.0 or rate == 0.0:
        return rate
    if k == 0:
        return 0.0
    # A rate's half-life in steps is ln 0.5 / ln rate; cap it at ratio * k.
    return min(rate, 0.5 ** (1.0 / (ratio * k)))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that takes no gradient: the starting point of a target or EMA network."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone


class EMABank(nn.Module):
    """EMA copies of the online network at fixed rates, for sampling (not the CM target)."""

    def __init__(self, online: nn.Module, rates: Iterable[float], rampup: float = 0.0):
        super().__init__()
        self.rates = tuple(float(r) for r in rates)
        self.rampup = float(rampup)
        self.copies = nn.ModuleList(frozen_copy(online) for _ in self.rates)

    def update_(self, online: nn.Module, k: int) -> None:
        """One EMA step after optimiser step ``k`` (0-based: the warm-up needs it)."""
        for rate, ema in zip(self.rates, self.copies, strict=True):
            ema_update_(ema, online, ema_rate_rampup(rate, k, self.rampup))

    def by_rate(self, rate: float) -> nn.Module:
        return self.copies[self.rates.index(rate)]

    @staticmethod
    def copy_state(bank_state: dict[str, torch.Tensor], index: int = 0) -> dict[str, torch.Tensor]:
        """The weights of copy ``index`` in a bank's state dict, to load into a bare network
        without building the bank (another copy of every weight)."""
        prefix = f"copies.{index}."
        return {k.removeprefix(prefix): v for k, v in bank_state.items() if k.startswith(prefix)}
