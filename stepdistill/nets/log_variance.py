"""A learned per-time loss weight: the log-variance network of EDM2 (Karras et al., CVPR 2024, §5 "Learned
uncertainty", Eq. 21), which sCM uses as its adaptive weighting ``w_phi(t)`` (Lu & Song 2024, §4.3).

The loss ``exp(-u(t)) L(t) + u(t)`` is minimised by ``u(t) = log E[L(t)]``, so every time's loss is divided by its
own running magnitude and the times where the loss is large (high noise) cannot drown the others. ``u`` is a linear
layer on fixed random Fourier features of ``c_noise = ln(sigma) / 4`` (EDM2's ``MPFourier`` then ``logvar_linear``);
the layer starts at zero, so training starts with uniform weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LogVariance(nn.Module):
    """``ln sigma [B] -> u [B]`` (float32).

    Args:
        channels: the number of Fourier features (EDM2: 128).
        seed: draws the fixed frequencies and phases; the same on every process (they are also checkpointed).
    """

    def __init__(self, channels: int = 128, *, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        c_noise = (log_sigma.float() / 4).to(self.freqs.device)[:, None]
        features = math.sqrt(2) * torch.cos(c_noise * self.freqs + self.phases)  # unit variance per feature
        return self.linear(features / math.sqrt(self.freqs.numel())).squeeze(-1)
