"""MeanFlow distillation (Geng et al., "Mean Flows for One-step Generative Modeling", 2025), METHODS.md §3.8.

On the rectified-flow path ``z_t = (1 - t) x + t e`` the average velocity over ``[r, t]`` is
``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``, so ``z_r = z_t - (t - r) u`` and one step from noise is
``x = z_1 - u(z_1, 0, 1)``. Differentiating ``(t - r) u = int_r^t v`` in ``t`` gives the MeanFlow identity (Eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,      du/dt = v . d_z u + d_t u      (r held fixed)

and the loss (Eq. 9-10, adaptive weight of §4.3)

    u_tgt = sg(v - (t - r) du/dt),   loss = |u - u_tgt|^2 / sg(|u - u_tgt|^2 + c)^p      (|.|^2: sum over elements)

where ``du/dt`` is one JVP of the student along ``(v, 1)`` with ``r`` fixed (``denoisers.jvp``, shared with sCM through
``time_view.TimeView``). Distillation (ours): ``v`` is the teacher's PF-ODE velocity at ``z_t`` (with CFG), not the
conditional ``e - x`` of training from scratch, and ``x`` comes from the data or the teacher's ODE samples
(``pairs.CleanSamples``).

Followed: Meta's py-meanflow (the PyTorch release; its CIFAR-10 defaults: ``ratio`` 0.75 of the batch with ``r != t``,
``t`` logit-normal (-0.6, 1.6), ``r`` logit-normal (-4.0, 1.6), the pair sorted so that ``r <= t``, ``norm_p`` 0.75,
``norm_eps`` 1e-3) and the paper's ImageNet settings as the alternative (both times logit-normal (-0.4, 1.0), 25% with
``r != t``, ``p = 1``).

The student is the teacher's backbone seen in rectified-flow time (``denoisers.Reparameterized``), reading its output
as the velocity ``e - x0`` (``flow_match``: on rectified flow the PF-ODE velocity, read without the schedule's
derivatives, which forward-mode AD cannot take). It takes ``r`` as a second time input (``RoleSpec(end_time=True)``:
UNet2DModel's 'timestep' class embedding, zero-initialised, fed the gap ``t - r`` in timesteps), so at the start
``u(z, r, t) = v(z, t)``, the teacher's own velocity. A jump ``z_r = z_t - (t - r) u`` is the DDIM jump of the same
prediction on the teacher's schedule, so the student samples on the teacher's trailing grid with the ``flow_map``
transition (the network told each step's end) and exports as a single-file pipeline (``pipelines/flow_map.py``): no
stock one passes ``r``.
"""

from __future__ import annotations

import torch

from ..denoisers import Reparameterized, guided
from ..pairs import CleanSamples
from ..sampling import StudentGrid
from ..schedules import LogitNormal, RectifiedFlow, _bcast
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .time_view import TimeView


class MeanFlow(Method):
    """MeanFlow loss object (average-velocity distillation).

    Args:
        student_steps: the student's sampling steps on the teacher's trailing grid (MeanFlow: 1 or 2).
        ratio: the share of each batch with ``r != t`` (the rest train the instantaneous velocity, ``r = t``).
        t_mean, t_std: ``t`` is logit-normal, ``logit(t) ~ N(t_mean, t_std^2)``.
        r_mean, r_std: so is the other time; the pair is sorted so that ``r <= t``.
        norm_p, norm_eps: the adaptive weight ``1 / sg(|u - u_tgt|^2 + norm_eps)^norm_p`` (0: plain squared error).
        guidance: the teacher's CFG scale in its velocity (our convention ``p_u + w (p_c - p_u)``; 1: none).
        jvp: ``auto | exact | finite_difference`` (``denoisers.jvp``); jvp_step: the difference's step.
        x0_source, num_pairs, pair_sampler, pair_steps, pair_cache: where ``x`` comes from (``pairs.CleanSamples``).
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
    """

    phases = ("student",)
    makes_samples = True

    def __init__(self, *, student_steps: int = 1, ratio: float = 0.75, t_mean: float = -0.6, t_std: float = 1.6,
                 r_mean: float = -4.0, r_std: float = 1.6, norm_p: float = 0.75, norm_eps: float = 1e-3,
                 guidance: float = 1.0, jvp: str = "auto", jvp_step: float = 1e-4, x0_source: str = "auto",
                 num_pairs: int = 4096, pair_sampler: str = "heun", pair_steps: int = 32,
                 pair_cache: str | None = None, student_prediction: str | None = None):
        if student_steps < 1:
            raise ValueError(f"method.student_steps must be at least 1, got {student_steps}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"method.ratio (the share of pairs with r != t) must be in [0, 1], got {ratio}")
        for key, value in (("t_std", t_std), ("r_std", r_std), ("norm_eps", norm_eps)):
            if not value > 0:
                raise ValueError(f"method.{key} must be positive, got {value}")
        if norm_p < 0:
            raise ValueError(f"method.norm_p must be >= 0, got {norm_p}")
        self.student_steps, self.ratio, self.norm_p, self.norm_eps = student_steps, ratio, norm_p, norm_eps
        self.t_density, self.r_density = LogitNormal(t_mean, t_std), LogitNormal(r_mean, r_std)
        self.guidance, self.student_prediction = guidance, student_prediction
        self.clean = CleanSamples(x0_source, num=num_pairs, sampler=pair_sampler, steps=pair_steps, cache=pair_cache)
        self.rf = RectifiedFlow()
        self.view = TimeView(self.rf, "flow_match", transition="flow_map", jvp=jvp, jvp_step=jvp_step)

    @property
    def needs_real_data(self) -> str | None:
        return self.clean.needs_real_data("MeanFlow")

    @property
    def reads_data(self) -> bool:
        return self.clean.reads_data

    def roles(self) -> dict[str, RoleSpec]:
        return {"student": RoleSpec(init="teacher", prediction=self.student_prediction, end_time=True)}

    # ------------------------------------------------------------------------------------------------ schedule
    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self.view.grid is None:
            self.view.use(nets.student.schedule, self.student_steps)
        return {}

    def student_grid(self) -> StudentGrid:
        return self.view.student_grid()

    def grid_for(self, k: int) -> StudentGrid:
        """The trailing ``k``-step grid of flow-map jumps: the student samples at any step count."""
        return self.view.grid_for(k)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """The grid and time span; teacher samples when they stand in for data; an ``exact`` JVP tried once."""
        self.view.use(nets.student.schedule, self.student_steps)
        self.clean.prepare(nets.teacher, ctx, who="MeanFlow", guidance=self.guidance)
        self.view.check_exact(nets.student, ctx, {"r": torch.zeros(1, dtype=torch.float64)})

    # ------------------------------------------------------------------------------------------------ the loss
    def draw_times(self, b: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, r)``: two logit-normal times sorted so that ``r <= t``, with ``r = t`` for all but the first
        ``round(ratio * b)`` rows; ``t`` kept inside the span the backbone was trained on (``r`` may reach 0, the
        data)."""
        t, r = self.t_density.sample(b, self.rf, gen), self.r_density.sample(b, self.rf, gen)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        t = t.clamp(*self.view.span)
        jumps = torch.arange(b) < round(self.ratio * b)
        return t, torch.where(jumps, r.clamp(max=t), t)

    def target(self, student: Reparameterized, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor,
               cond) -> torch.Tensor:
        """``u_tgt = v - (t - r) du/dt`` (Eq. 9), ``du/dt`` along ``(v, 1)`` with ``r`` fixed; float64, no graph."""
        _, du_dt = self.view.derivative(student, z, t, v, torch.ones_like(t), {**(cond or {}), "r": r})
        return v - _bcast(t - r, v) * du_dt

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        gen = batch.generator
        x0, cond = self.clean.draw(batch)
        b, device = x0.shape[0], x0.device
        t, r = self.draw_times(b, gen)
        t, r = t.to(device), r.to(device)
        e = noise_like(x0, gen)
        z = self.rf.add_noise(x0, e, t)
        student = self.view(nets.student)
        with torch.no_grad():
            v = guided(self.view(nets.teacher), z, t, cond, self.guidance).get("flow_match", exact=True)
        u_tgt = self.target(student, z, t, r, v, cond)
        u = student(z, t, {**(cond or {}), "r": r}).get("flow_match", exact=True)
        sq = (u - u_tgt).square().flatten(1).sum(1)
        weight = 1.0 / (sq.detach() + self.norm_eps) ** self.norm_p
        loss = (weight * sq).float()
        jumps = r < t
        logs = {"loss": loss.detach().mean(), "sq_error": sq.detach().mean(),
                "sq_error_jump": sq.detach()[jumps].mean() if jumps.any() else torch.zeros((), device=device)}
        return LossOutput(loss, logs)
