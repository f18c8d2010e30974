"""Time pairs ``(t, r)`` with curricula for consistency losses: ECT's continuous pairs (Geng et al., "Consistency
Models Made Easy", ICLR 2025, §3; METHODS.md §3.4) and iCT's discrete log-normal pairs on a doubling Karras grid
(Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024, §3.3-3.5; METHODS.md §3.3). The
teacher's ladder of LCM/CD/PCM/TCD lives in ``consistency.py``; ``parse_times`` reads ``method.times``.

ECT followed: locuslab/ect ``training/loss.py`` ``ECMLoss`` (``t_to_r_sigmoid``, ``snrplusk_wt``). In EDM's sigma:

    ln sigma_t ~ N(p_mean, p_std^2)
    sigma_r = max(0, sigma_t (1 - q^-(stage + 1) (1 + k sigmoid(-b sigma_t))))
    weight  = (sigma_t^2 + sd^2) / (sigma_t sd)^2                      (EDM's lambda: "SNR + 1 / sd^2")

At stage 0 the gap is widest (``r = 0`` wherever ``q^-1 (1 + k sigmoid(-b t)) >= 1``: the consistency target is the
data, as in diffusion pre-training), and every stage divides the gap by ``q``, annealing towards the continuous-time
consistency condition. Both times are mapped onto the student's schedule by SNR; a time below its cleanest is its
boundary, where the consistency function is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ECTPairs:
    """ECT's ``(t, r)`` sampler.

    Attributes:
        stage_steps: student updates per stage (ECT's ``--double``), after which the gap ``t - r`` shrinks by ``q``.
        q, k, b: the gap's schedule (ECT's defaults 4, 8, 1).
        p_mean, p_std: ``ln sigma_t ~ N(p_mean, p_std^2)`` (ECT and iCT: -1.1, 2.0).
        sigma_data: ``sd`` of the weight.
    """

    stage_steps: int = 1000
    q: float = 4.0
    k: float = 8.0
    b: float = 1.0
    p_mean: float = -1.1
    p_std: float = 2.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if not self.stage_steps >= 1:
            raise ValueError(f"method.times: ECT's stage_steps (updates per stage) must be at least 1, got "
                             f"{self.stage_steps}")
        if not self.q > 1 or self.k < 0 or self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError("method.times: ECT needs q > 1, k >= 0, p_std > 0 and sigma_data > 0")

    def stage(self, step: int) -> int:
        return step // self.stage_steps

    def curriculum(self, step: int) -> dict[str, float]:
        """Where the curriculum is at ``step``, for the log."""
        return {"ect_stage": float(self.stage(step))}

    def gap_ratio(self, sigma: torch.Tensor, stage: int) -> torch.Tensor:
        """``sigma_r / sigma_t`` at ``stage`` (ECT's ``t_to_r_sigmoid``), at least 0."""
        decay = self.q ** -(stage + 1)
        return (1 - decay * (1 + self.k * torch.sigmoid(-self.b * sigma))).clamp(min=0)

    def draw(self, n: int, schedule, step: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, r, weight)``: ``n`` pairs ``r <= t`` on ``schedule`` (float64) at ``step``, and ECT's weight."""
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=gen, dtype=torch.float64))
        sigma_r = sigma * self.gap_ratio(sigma, self.stage(step))
        t = _time_of(sigma, schedule)
        r = torch.minimum(_time_of(sigma_r, schedule), t)
        s_t = schedule.sigma(t) / schedule.alpha(t)  # the sigma the clamped time really has
        weight = (s_t**2 + self.sigma_data**2) / (s_t * self.sigma_data) ** 2
        return t, r, weight


@dataclass(frozen=True)
class ICTPairs:
    """iCT's pairs: adjacent points ``sigma_i < sigma_{i+1}`` of an ``N(k)``-point Karras grid, ``i`` drawn from the
    discretised log-normal ``p(i) ~ erf((ln s_{i+1} - P_m) / (sqrt2 P_s)) - erf((ln s_i - P_m) / (sqrt2 P_s))``,
    weighted ``1 / (sigma_{i+1} - sigma_i)``; the grid doubles ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` over a run of ``K = total_steps`` updates (paper, §3.3-3.5; no
    official code: recalled from the paper, as METHODS.md notes).

    Attributes:
        total_steps: ``K``, the updates the curriculum spans (the run's ``train.max_steps``).
        s0, s1: the grid's first and last number of intervals (10, 1280).
        p_mean, p_std: the log-normal (-1.1, 2.0).
        sigma_min, sigma_max, rho: the Karras grid (0.002, 80, 7), narrowed to the schedule's own sigma range.
    """

    total_steps: int = 10000
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        if self.total_steps < 1 or not 1 <= self.s0 <= self.s1 or self.p_std <= 0:
            raise ValueError("method.times: iCT needs total_steps >= 1, 1 <= s0 <= s1 and p_std > 0")

    def intervals(self, step: int) -> int:
        """``N(k) - 1``: the grid's intervals at update ``step``."""
        per = max(1, self.total_steps // (int(math.log2(self.s1 // self.s0)) + 1))
        return min(self.s0 * 2 ** (step // per), self.s1)

    def curriculum(self, step: int) -> dict[str, float]:
        return {"ict_intervals": float(self.intervals(step))}

    def sigmas(self, step: int) -> torch.Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + torch.linspace(0, 1, self.intervals(step) + 1, dtype=torch.float64) * (hi - lo)) ** self.rho

    def draw(self, n: int, schedule, step: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma = self.sigmas(step)
        cdf = torch.erf((torch.log(sigma) - self.p_mean) / (math.sqrt(2) * self.p_std))
        i = torch.multinomial(cdf[1:] - cdf[:-1], n, replacement=True, generator=gen)
        t, r = _time_of(sigma[i + 1], schedule), _time_of(sigma[i], schedule)
        return t, torch.minimum(r, t), 1.0 / (sigma[i + 1] - sigma[i])


def _time_of(sigma: torch.Tensor, schedule) -> torch.Tensor:
    """The schedule's time with EDM sigma ``sigma`` (0 -> its cleanest time), inside its span."""
    t = schedule.t_from_logsnr(-2.0 * torch.log(sigma.clamp(min=1e-300)))
    return torch.where(sigma > 0, t, torch.zeros_like(t)).clamp(min=schedule.t_min, max=1.0)


PAIRS = {"ect": ECTPairs, "ict": ICTPairs}


def parse_times(spec) -> ECTPairs | ICTPairs | None:
    """``method.times``: ``ladder`` (``None``: the teacher's ladder), ``ect``, ``ict`` or a mapping
    ``{name: ect | ict, key: value, ...}`` of the sampler's settings."""
    if spec in (None, "ladder"):
        return None
    if isinstance(spec, str) and spec in PAIRS:
        return PAIRS[spec]()
    if isinstance(spec, dict) and spec.get("name") in PAIRS:
        cls = PAIRS[spec["name"]]
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - allowed - {"name"})
        if unknown:
            raise ValueError(f"method.times: unknown {spec['name']} settings {unknown}; allowed: {sorted(allowed)}")
        return cls(**{k: v for k, v in spec.items() if k != "name"})
    raise ValueError(f"method.times must be ladder, ect, ict or a mapping with name: ect | ict, got {spec!r}")
