"""Time bands of a multi-step student: the noise levels at which step (or phase) ``k``'s output is judged.

Phased DMD (Fan et al. 2025, arXiv 2510.27684; METHODS.md §6) judges phase ``k``'s output only at times inside the
phase's subinterval ``(s_k + margin, t_k]``, and DMD's ``multistep_matching: phased`` does the same per student step
(one step per band, no margin). Both read their bands, draws and emptiness checks from this one object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .terms import band_times


@dataclass(frozen=True)
class Bands:
    """Bands between descending ``edges``: band ``k`` is ``(edges[k+1] + margin, edges[k]]``; the last edge is the
    clean end, 0, which takes no margin (the last band reaches the data).

    Attributes:
        edges: ``t_0 > t_1 > ... > 0``, the start of every band and the end of the last.
        margin: how far above its end a band starts (Phased DMD's margin; 0 for DMD's per-step bands).
    """

    edges: tuple[float, ...]
    margin: float = 0.0

    @classmethod
    def of_grid(cls, times) -> Bands:
        """One band per student step of a grid's start ``times`` (the last band ends at 0; no margin)."""
        return cls((*(float(t) for t in times), 0.0))

    def band(self, k: int, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
        """Band ``k``, cut to ``[lo, hi]``: ``(low end, high end)``."""
        start, end = self.edges[k], self.edges[k + 1]
        return max(lo, end + self.margin if end > 0 else 0.0), min(hi, start)

    def draw(self, schedule, k: int, n: int, gen, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """``n`` times in band ``k`` cut to ``[lo, hi]`` (``terms.band_times``: a discrete teacher's timesteps)."""
        return band_times(schedule, *self.band(k, lo, hi), n, gen)

    def empty(self, schedule, k: int, lo: float = 0.0, hi: float = 1.0) -> bool:
        """Band ``k`` cut to ``[lo, hi]`` holds no time of ``schedule`` to draw."""
        low, high = self.band(k, lo, hi)
        return low >= high or band_times(schedule, low, high, 1, None).numel() == 0
