"""A small CNN classifier of 8x8 digits; its penultimate layer is the feature space of the digits Frechet distance."""

from __future__ import annotations

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    """conv(1->32) -> conv(32->64, stride 2) -> conv(64->64) -> mean-pool -> 64-d features -> 10 logits."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8]`` in [-1, 1] -> ``[B, 64]``."""
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
