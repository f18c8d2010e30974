"""Continuous time pairs for consistency losses: ECT's ``(t, r)`` curriculum (Geng et al., "Consistency Models Made
Easy", ICLR 2025, §3; METHODS.md §3.4). The discrete alternative, the teacher's ladder of LCM/CD/PCM/TCD, lives in
``consistency.py``.

Followed: locuslab/ect ``training/loss.py`` ``ECMLoss`` (``t_to_r_sigmoid``, ``snrplusk_wt``). In EDM's sigma:

    ln sigma_t ~ N(p_mean, p_std^2)
    sigma_r = max(0, sigma_t (1 - q^-(stage + 1) (1 + k sigmoid(-b sigma_t))))
    weight  = (sigma_t^2 + sd^2) / (sigma_t sd)^2                      (EDM's lambda: "SNR + 1 / sd^2")

At stage 0 the gap is widest (``r = 0`` wherever ``q^-1 (1 + k sigmoid(-b t)) >= 1``: the consistency target is the
data, as in diffusion pre-training), and every stage divides the gap by ``q``, annealing towards the continuous-time
consistency condition. Both times are mapped onto the student's schedule by SNR; a time below its cleanest is its
boundary, where the consistency function is the identity.
"""

from __future__ import annotations

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

    @classmethod
    def parse(cls, spec) -> ECTPairs | None:
        """``method.times``: ``ladder`` (``None``: the teacher's ladder), ``ect`` or ``{name: ect, key: value}``."""
        if spec in (None, "ladder"):
            return None
        if spec == "ect":
            return cls()
        if isinstance(spec, dict) and spec.get("name") == "ect":
            allowed = set(cls.__dataclass_fields__)
            unknown = sorted(set(spec) - allowed - {"name"})
            if unknown:
                raise ValueError(f"method.times: unknown ECT settings {unknown}; allowed: {sorted(allowed)}")
            return cls(**{k: v for k, v in spec.items() if k != "name"})
        raise ValueError(f"method.times must be ladder, ect or a mapping with name: ect, got {spec!r}")

    def stage(self, step: int) -> int:
        return step // self.stage_steps

    def gap_ratio(self, sigma: torch.Tensor, stage: int) -> torch.Tensor:
        """``sigma_r / sigma_t`` at ``stage`` (ECT's ``t_to_r_sigmoid``), at least 0."""
        decay = self.q ** -(stage + 1)
        return (1 - decay * (1 + self.k * torch.sigmoid(-self.b * sigma))).clamp(min=0)

    def draw(self, n: int, schedule, stage: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, r, weight)``: ``n`` pairs ``r <= t`` on ``schedule`` (float64) and ECT's weight of each."""
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=gen, dtype=torch.float64))
        sigma_r = sigma * self.gap_ratio(sigma, stage)
        lo = schedule.t_min

        def time_of(s):
            t = schedule.t_from_logsnr(-2.0 * torch.log(s.clamp(min=1e-300)))
            return torch.where(s > 0, t, torch.zeros_like(t)).clamp(min=lo, max=1.0)

        t = time_of(sigma)
        r = torch.minimum(time_of(sigma_r), t)
        s_t = schedule.sigma(t) / schedule.alpha(t)  # the sigma the clamped time really has
        weight = (s_t**2 + self.sigma_data**2) / (s_t * self.sigma_data) ** 2
        return t, r, weight
