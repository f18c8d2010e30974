"""Gaussian mixtures that are not in the shipped recipes, for judging teachers and students on harder problems.

Each family is a function of a seed, so a study can tune on some seeds and report on others it never saw:

* ``grid``: 2-D, 25 narrow modes on a 5x5 grid in [-0.8, 0.8] (spacing 0.4), per-mode std a tenth of the spacing or
  less, unequal weights (the largest about 6x the smallest);
* ``highdim``: 32-D, 6 modes at random directions, radius 0.6-0.9, std 0.08-0.12, unequal weights (0.35 .. 0.04);
* ``many``: 8-D, 40 narrow modes, weights spanning 20x.

``mixture_teacher(name, seed)`` returns the ``teacher.gmm`` mapping a recipe takes (means, stds, weights).
"""

from __future__ import annotations

import torch


def grid(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-0.8, 0.8, 5, dtype=torch.float64)
    means = torch.cartesian_prod(axis, axis)
    stds = 0.025 + 0.015 * torch.rand(25, generator=g, dtype=torch.float64)  # <= 0.04 = spacing / 10
    weights = 1.0 + 5.0 * torch.rand(25, generator=g, dtype=torch.float64)
    return _teacher(means, stds, weights)


def highdim(seed: int = 0, dim: int = 32) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    directions = torch.randn(6, dim, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    means = directions * (0.6 + 0.3 * torch.rand(6, 1, generator=g, dtype=torch.float64))
    stds = 0.08 + 0.04 * torch.rand(6, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.35, 0.25, 0.16, 0.12, 0.08, 0.04], dtype=torch.float64)
    weights = weights[torch.randperm(6, generator=g)]
    return _teacher(means, stds, weights)


def many(seed: int = 0, dim: int = 8, modes: int = 40) -> dict:
    g = torch.Generator().manual_seed(2000 + seed)
    means = (torch.rand(modes, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    stds = 0.03 + 0.02 * torch.rand(modes, generator=g, dtype=torch.float64)
    weights = torch.exp(torch.rand(modes, generator=g, dtype=torch.float64) * 3.0)  # e^0 .. e^3: 20x
    return _teacher(means, stds, weights)


def _teacher(means, stds, weights) -> dict:
    return {"means": means.tolist(), "stds": stds.tolist(), "weights": (weights / weights.sum()).tolist()}


MIXTURES = {"grid": grid, "highdim": highdim, "many": many}


def mixture_teacher(name: str, seed: int = 0) -> dict:
    """The ``teacher.gmm`` mapping (without ``denoiser``) of mixture family ``name`` drawn with ``seed``."""
    return MIXTURES[name](seed)
