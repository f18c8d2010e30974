"""Time bands of a multi-step student: the noise levels at which step (or phase) ``k``'s output is judged.

Phased DMD (Fan et al. 2025, arXiv 2510.27684; METHODS.md §6) judges phase ``k``'s output only at times inside the
phase's subinterval ``(s_k + margin, t_k]``, and DMD's ``multistep_matching: phased`` does the same per student step
(one step per band, no margin). Both read their bands, draws and emptiness checks from this one object;
``StepTimes`` is DMD's choice between the two ways of judging a multi-step student's steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .terms import band_times, time_range


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


class StepTimes:
    """Where step ``k``'s output of a student is judged (DMD's ``multistep_matching``): at any time of the range asked
    for (``mixture``, DMD2; drawn by ``density``, ``terms.time_range``) or only inside step ``k``'s band (``phased``:
    ``bands`` is set once the student grid is known)."""

    def __init__(self, density: str = "uniform"):
        self.density = density
        self.bands: Bands | None = None

    def draw(self, schedule, n: int, lo: float, hi: float, gen, k: int = 0, *, closed: bool = True) -> torch.Tensor:
        """``n`` times in ``[lo, hi]`` (``closed=False``: ``hi`` left out) for step ``k``'s output."""
        if self.bands is not None:
            return self.bands.draw(schedule, k, n, gen, lo, hi)
        return time_range(schedule, lo, hi, self.density, closed=closed).sample(n, schedule, gen)

    def check(self, schedule, ranges: dict[str, tuple[float, float]]) -> None:
        """With bands, each named range must hold a time in every step's band; a ``ValueError`` names the first that
        does not."""
        if self.bands is None:
            return
        for what, (lo, hi) in ranges.items():
            for k in range(len(self.bands.edges) - 1):
                if self.bands.empty(schedule, k, lo, hi):
                    raise ValueError(f"method.multistep_matching: phased: the {what} range [{lo}, {hi}] leaves no "
                                     f"time in step {k}'s band of the student grid {self.bands.edges[:-1]}")
