"""Continuous-time consistency distillation on TrigFlow: sCM (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", ICLR 2025), METHODS.md §3.5, §1.3, §1.7.

Followed: FastGen ``methods/consistency_model/sCM.py`` (the "JVP rearrangement" of the tangent, per-sample tangent
normalisation by the root-mean-square of ``g`` (its ``g_norm_spatial_invariance``: the paper's ``|g|`` would shrink
the per-element tangent with the image size), prior weight ``1 / sigma``, the warm-up factor on the second term only)
and the paper (Eq. 8-9, §4); the squared error is a mean over elements (the paper's ``|.|^2 / D``; FastGen divides
by ``D`` once more, which the learned weight absorbs).
Per step, in TrigFlow angle ``theta`` (``x = cos(theta) x0 + sin(theta) z``, ``z ~ N(0, sd^2)``):

    tan(theta) = exp(tau) / sd,  tau ~ N(p_mean, p_std^2)                 (sigma = sd tan(theta) is log-normal)
    x_theta = cos x0 + sin z                                              (x0: data, or the teacher's ODE samples)
    dx/dtheta = sd F_T(x_theta, theta)                                    (the teacher's PF-ODE, with CFG scale w)
    cs dF/dtheta = JVP of F_theta- along (cs dx/dtheta, cs),  cs = cos sin     (no grad; ``denoisers.jvp``)
    g = -cos^2 (sd F_theta- - dx/dtheta) - r (cs x_theta + sd cs dF/dtheta)   (r: the tangent warm-up, 0 -> 1)
    g <- g / (rms(g) + c)                                          (tangent normalisation, c = 0.1, per sample)
    loss = exp(-u(theta)) / sigma * mean (F_theta - F_theta- - g)^2 + u(theta)     (u: learned log-variance, EDM2)

where ``F`` is the network's TrigFlow output (``f(x, theta) = cos x - sd sin F = x0``: the consistency function is
the clean estimate, and ``f(x, 0) = x`` holds without boundary scalings) and ``F_theta-`` is the same network's
output under stop-grad. With ``r = 1``, ``g`` is ``cos(theta)`` times the total derivative ``df-/dtheta`` along the
teacher's ODE, so the loss's gradient is that of the continuous-time consistency loss (sCM Eq. 8).

rCM (``method.dmd``, registered as ``rcm``; NVlabs/rcm ``t2v_model_distill_rcm.py``) adds DMD's distribution-matching
loss on the student's own samples after the warm-up, composing ``methods/dmd.py`` (its fake score, critic phase and
DM term) rather than copying it.

The student is the teacher's own backbone seen in TrigFlow time (``denoisers.Reparameterized``: the SNR-matched
time change of METHODS.md §1.3), so it keeps its native output (epsilon, v, flow) and timesteps and exports as the
stock model it is. It samples on the teacher's trailing grid (one step from its noisiest time; two steps add the
middle timestep, e.g. 511 of 1024, at TrigFlow angle 1.27 on SD-type betas, near FastGen's 1.1), re-noising between
steps as LCMScheduler does: ``x = cos x0 + sin z``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..denoisers import Reparameterized, guided
from ..nets.log_variance import LogVariance
from ..pairs import CleanSamples
from ..sampling import StudentGrid
from ..schedules import LogNormalSigma, TrigFlow, _bcast
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .dmd import DMD
from .time_view import TimeView


def tangent(F_minus: torch.Tensor, dF: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, theta: torch.Tensor,
            sigma_data: float, r: float) -> torch.Tensor:
    """sCM's tangent ``g`` before normalisation (Lu & Song 2024, Eq. 8 with the warm-up factor ``r``; FastGen's
    "JVP rearrangement"): ``dF`` is ``cos sin dF-/dtheta`` and ``dx`` is ``dx/dtheta``, all float64. With ``r = 1``
    it is ``cos(theta) df-/dtheta``, ``f- = cos x - sd sin F-`` (tests/test_scm.py checks this by autograd)."""
    cos, sin = _bcast(torch.cos(theta), x), _bcast(torch.sin(theta), x)
    return -cos**2 * (sigma_data * F_minus - dx) - r * (cos * sin * x + sigma_data * dF)


class SCM(Method):
    """sCM loss object (continuous-time consistency distillation).

    Args:
        student_steps: the student's sampling steps on the teacher's trailing grid (sCM: 1 or 2).
        sigma_data: TrigFlow's ``sd``, the data's standard deviation (0.5 for images in [-1, 1]).
        p_mean, p_std: the time density, ``ln(sd tan theta) ~ N(p_mean, p_std^2)`` (sCM on CIFAR-10: -1.0, 1.4).
        tangent_warmup: student updates over which ``r`` rises linearly from 0 to 1 (FastGen: 10000).
        tangent_c: the tangent normalisation's ``c`` (0.1); 0 turns normalisation off.
        adaptive_weight: learn ``u(theta)`` (a ``LogVariance`` role, ``weight``); off: ``u = 0``.
        prior_weight: the prior weight ``1 / sigma = 1 / (sd tan theta)`` (sCM §4.3).
        guidance: the teacher's CFG scale in its velocity (our convention ``p_u + w (p_c - p_u)``; 1: none).
        jvp: ``auto`` (forward-mode AD where the backbone allows it, else a central difference, said once in the
            log), ``exact`` (refused at start where the backbone cannot) or ``finite_difference``.
        jvp_step: the central difference's step along the tangent (``denoisers.jvp``).
        x0_source, num_pairs, pair_sampler, pair_steps, pair_cache: where ``x0`` comes from (``pairs.CleanSamples``).
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
        dmd: rCM (Zheng et al. 2025, METHODS.md §3.5): DMD's distribution-matching loss as a regulariser of the same
            student, with these ``DMD`` settings (``{}``: its defaults; ``dm_weight`` scales it against the sCM loss,
            ``guidance_scale`` defaults to ``guidance``); ``None``: plain sCM. Its fake score (and any GAN head) are
            DMD's roles and its critic phase is DMD's own (``methods/dmd.py``), run after the tangent warm-up; from
            then on ``train.update_every`` sets the two time scales, as for DMD2.
    """

    phases = ("student",)
    makes_samples = True

    def __init__(self, *, student_steps: int = 2, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup: int = 10000, tangent_c: float = 0.1, adaptive_weight: bool = True,
                 prior_weight: bool = True, guidance: float = 1.0, jvp: str = "auto", jvp_step: float = 1e-4,
                 x0_source: str = "auto", num_pairs: int = 4096, pair_sampler: str = "heun", pair_steps: int = 32,
                 pair_cache: str | None = None, student_prediction: str | None = None, dmd: dict | None = None):
        if student_steps < 1:
            raise ValueError(f"method.student_steps must be at least 1, got {student_steps}")
        for key, value in (("sigma_data", sigma_data), ("p_std", p_std)):
            if not value > 0:
                raise ValueError(f"method.{key} must be positive, got {value}")
        if tangent_warmup < 0 or tangent_c < 0:
            raise ValueError("method.tangent_warmup and method.tangent_c must be >= 0")
        self.student_steps, self.sigma_data, self.p_mean, self.p_std = student_steps, sigma_data, p_mean, p_std
        self.tangent_warmup, self.tangent_c = tangent_warmup, tangent_c
        self.adaptive_weight, self.prior_weight, self.guidance = adaptive_weight, prior_weight, guidance
        self.clean = CleanSamples(x0_source, num=num_pairs, sampler=pair_sampler, steps=pair_steps, cache=pair_cache)
        self.student_prediction = student_prediction
        self.trig = TrigFlow(sigma_data=sigma_data)
        self.view = TimeView(self.trig, "trigflow", transition="renoise", jvp=jvp, jvp_step=jvp_step)
        self.r = 0.0 if tangent_warmup else 1.0
        self.dmd = None if dmd is None else DMD(**{"student_steps": student_steps, "guidance_scale": guidance, **dmd})
        self.step = 0
        self.phases = ("student",) if self.dmd is None else ("student", "fake_score")

    @property
    def needs_real_data(self) -> str | None:
        return self.clean.needs_real_data("sCM")

    @property
    def reads_data(self) -> bool:
        return self.clean.reads_data

    def roles(self) -> dict[str, RoleSpec]:
        roles = {"student": RoleSpec(init="teacher", prediction=self.student_prediction)}
        if self.adaptive_weight:
            roles["weight"] = RoleSpec(build=lambda nets: LogVariance())
        if self.dmd is not None:
            roles.update({k: v for k, v in self.dmd.roles().items() if k != "student"})
        return roles

    def owner(self, phase: str) -> str | tuple[str, ...]:
        if phase != "student":
            return self.dmd.owner(phase)
        return ("student", "weight") if self.adaptive_weight else ("student",)

    def _dmd_on(self, step: int) -> bool:
        return self.dmd is not None and step >= self.tangent_warmup

    def active_phases(self, step: int, update_every) -> tuple[str, ...]:
        """rCM's schedule: sCM alone every step during the tangent warm-up, then ``train.update_every`` as for DMD2
        (rCM's ``student_update_freq`` 5 is ``update_every: {student: 5}``: the critic every step)."""
        if self.dmd is not None and not self._dmd_on(step):
            return ("student",)
        return super().active_phases(step, update_every)

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        return () if self.dmd is None else self.dmd.begin_step(step, nets)

    # ------------------------------------------------------------------------------------------------ schedule
    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self.view.grid is None:
            self.view.use(nets.student.schedule, self.student_steps)
        self.r = min(1.0, step / self.tangent_warmup) if self.tangent_warmup else 1.0
        self.step = step
        if self.dmd is not None:
            self.dmd.update_schedule(step, nets)
        return {"tangent_r": self.r}

    def student_grid(self) -> StudentGrid:
        return self.view.student_grid()

    def grid_for(self, k: int) -> StudentGrid:
        """The trailing ``k``-step grid with re-noising: a consistency student samples at any step count."""
        return self.view.grid_for(k)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """The grid and time span; teacher samples when they stand in for data; an ``exact`` JVP tried once."""
        self.view.use(nets.student.schedule, self.student_steps)
        self.clean.prepare(nets.teacher, ctx, who="sCM", guidance=self.guidance)
        if self.dmd is not None:
            self.dmd.prepare(nets, ctx)
        self.view.check_exact(nets.student, ctx)

    # ------------------------------------------------------------------------------------------------ the loss
    def draw_times(self, b: int, gen) -> torch.Tensor:
        """TrigFlow times ``t = 2 theta / pi`` with ``ln(sd tan theta) ~ N(p_mean, p_std^2)``, kept inside the span
        the backbone was trained on (SD's betas end at angle 1.536; timestep 0 starts at 0.047)."""
        t = LogNormalSigma(self.p_mean, self.p_std).sample(b, self.trig, gen)
        return t.clamp(*self.view.span)

    @torch.no_grad()
    def derivatives(self, student: Reparameterized, teacher: Reparameterized, x_t: torch.Tensor, t: torch.Tensor,
                    cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dx/dtheta, cos sin dF-/dtheta)`` at TrigFlow time ``t``: the teacher's PF-ODE velocity with CFG, and
        the student's time derivative along it (in the angle: ``dtheta = pi/2 dt``), float64."""
        theta = 0.5 * math.pi * t
        dx = self.sigma_data * guided(teacher, x_t, t, cond, self.guidance).get("trigflow", exact=True)
        cs = torch.cos(theta) * torch.sin(theta)
        _, dF = self.view.derivative(student, x_t, t, _bcast(cs, dx) * dx, cs / (0.5 * math.pi), cond)
        return dx, dF

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput | Iterator[LossOutput]:
        if phase == "fake_score":
            return self.dmd.fake_score_loss(nets, batch)
        if not self._dmd_on(self.step):
            return self.scm_loss(nets, batch)
        return iter((self.scm_loss(nets, batch), self.dmd.student_loss(nets, batch)))

    def scm_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """The sCM loss of the module docstring, per sample."""
        gen, sd = batch.generator, self.sigma_data
        x0, cond = self.clean.draw(batch)
        b, device = x0.shape[0], x0.device
        t = self.draw_times(b, gen)
        theta = 0.5 * math.pi * t
        z = noise_like(x0, gen)
        x_t = self.trig.add_noise(x0, z, t)
        student = self.view(nets.student)
        dx, dF = self.derivatives(student, self.view(nets.teacher), x_t, t, cond)
        F = student(x_t, t, cond).get("trigflow", exact=True)
        F_minus = F.detach()
        with torch.no_grad():
            g = tangent(F_minus, dF, x_t.double(), dx, theta.to(device), sd, self.r)
            norm = g.flatten(1).square().mean(1).sqrt()  # per element (FastGen's g_norm_spatial_invariance)
            if self.tangent_c:
                g = g / _bcast(norm + self.tangent_c, g)
        mse = (F - F_minus - g).square().flatten(1).mean(1)
        log_sigma = torch.log(sd * torch.tan(theta)).to(device)
        weight = torch.exp(-log_sigma) if self.prior_weight else torch.ones_like(log_sigma)
        u = nets["weight"](log_sigma).double() if self.adaptive_weight else torch.zeros_like(log_sigma)
        loss = (weight * torch.exp(-u) * mse + u).float()
        logs = {"loss": loss.detach().mean(), "mse": mse.detach().mean(), "tangent_norm": norm.mean()}
        if self.adaptive_weight:
            logs["log_variance"] = u.detach().mean()
        return LossOutput(loss, logs)
