"""sCM's learned adaptive weight w_phi(t) (Lu & Song 2024, Sec. 4.2 and Eq. 8).

A tiny network of the noise level alone: the loss at each level is divided by exp(w_phi(t)) and
w_phi(t) is added, so w_phi learns the log of that level's loss scale and every level
contributes comparably, without a hand-made weighting (EDM2's uncertainty weighting).
"""

from __future__ import annotations

import torch
from torch import nn

from cmray.nets.unet import timestep_embedding


class AdaptiveWeight(nn.Module):
    """w_phi: sinusoidal features of the network's noise condition -> one linear layer -> [B].

    Zero-initialised, so training starts at w_phi = 0 (weight 1) everywhere.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, noise_cond: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(noise_cond.reshape(-1), self.channels)
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(-1)
