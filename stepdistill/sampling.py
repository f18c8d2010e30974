"""Samplers as plain functions: teacher ODE solvers and the few-step student sampler.

Each takes ``(denoiser, x, times, *, cond=None, w=1.0)`` where ``times`` decreases from the start time to 0
(``schedule.grid(steps)``), in the manner of k-diffusion's ``sample_*`` functions. The deterministic solvers work on
the probability-flow ODE written in the scale-free variables ``y = x / alpha`` and ``sigma_bar = sigma / alpha``
(Karras et al. 2022, Eq. 4 with s(t) = alpha), where it reads ``dy/dsigma_bar = eps``; so the same code serves every
schedule and matches diffusers' DDIM, Heun and DPM-Solver++ schedulers on VP models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoisers import Cond, Denoiser, guided
from .parameterization import ddim_step


def prior_noise(schedule, noise: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Scale standard normal ``noise`` to the marginal scale at time ``t``: ``sqrt(alpha^2 + sigma^2)``.

    That is 1 for VP and rectified flow (plain noise, as diffusers pipelines start), ``sqrt(1 + sigma_max^2)``
    for EDM and ``sigma_data`` for TrigFlow at its noise end.
    """
    scale = (schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2).sqrt()
    return (noise.double() * scale).to(noise.dtype)


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, times: torch.Tensor, *, cond: Cond = None, w=1.0,
                callback=None) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12): ``x_s = a_s x0_hat + s_s eps_hat``.

    This is also the Euler method on the scale-free PF-ODE (Karras et al. 2022, Alg. 1 without the Heun correction),
    so it doubles as ``sample_euler``. One network evaluation per step.
    """
    for i in range(len(times) - 1):
        pred = guided(denoiser, x, times[i], cond, w)
        x = ddim_step(pred, denoiser.schedule, times[i + 1].expand(x.shape[0]))
        if callback is not None:
            callback(i, x, pred)
    return x


sample_euler = sample_ddim


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, times: torch.Tensor, *, cond: Cond = None, w=1.0,
                callback=None) -> torch.Tensor:
    """Heun's 2nd-order method on the scale-free PF-ODE (Karras et al. 2022, Algorithm 1, deterministic).

    The last step to ``t = 0`` is an Euler step, as in the paper and diffusers' ``HeunDiscreteScheduler``;
    ``2 * steps - 1`` network evaluations. A first step from ``alpha = 0`` (rectified flow, TrigFlow at ``t = 1``)
    is an Euler step too, since ``sigma_bar`` is infinite there (one evaluation fewer).
    """
    sch = denoiser.schedule
    n = x.shape[0]
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        a_t, a_s = sch.alpha(t), sch.alpha(s)
        pred = guided(denoiser, x, t.expand(n), cond, w)
        if a_t < 1e-8:
            # alpha(t) = 0 up to rounding (rectified flow and TrigFlow at t = 1): sigma_bar is infinite there and the
            # trapezoid over an infinite interval is undefined (it returned NaN/inf), so this step is Euler (= DDIM),
            # as the last step to sigma = 0 is.
            x = ddim_step(pred, sch, s.expand(n))
        else:
            sb_t, sb_s = sch.sigma(t) / a_t, sch.sigma(s) / a_s  # sigma_bar
            y = x.double() / a_t
            d1 = pred.eps_64  # dy/dsigma_bar
            y_next = y + (sb_s - sb_t) * d1
            if s > 0:
                pred2 = guided(denoiser, (y_next * a_s).to(x.dtype), s.expand(n), cond, w)
                y_next = y + (sb_s - sb_t) * 0.5 * (d1 + pred2.eps_64)
            x = (y_next * a_s).to(x.dtype)
        if callback is not None:
            callback(i, x, pred)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, times: torch.Tensor, *, cond: Cond = None, w=1.0,
                    callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the data-prediction form, with ``lambda = log(a/s)``.

    The first step and a final step to ``t = 0`` are first order, as in k-diffusion and diffusers'
    ``DPMSolverMultistepScheduler(lower_order_final=True)``. One network evaluation per step.
    """
    sch = denoiser.schedule
    n = x.shape[0]
    x0_prev, h_prev = None, None
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        pred = guided(denoiser, x, t.expand(n), cond, w)
        x0 = pred.x0_64
        if s == 0:
            x = x0.to(x.dtype)
        else:
            lam_t, lam_s = 0.5 * sch.logsnr(t), 0.5 * sch.logsnr(s)
            h = lam_s - lam_t
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = ((sch.sigma(s) / sch.sigma(t)) * x.double() - sch.alpha(s) * torch.expm1(-h) * d).to(x.dtype)
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, x, pred)
    return x


TEACHER_SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations a teacher sampler spends for ``steps`` (CFG doubles the batch, not the count)."""
    return 2 * steps - 1 if sampler == "heun" else steps


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudentGrid:
    """The times a few-step student is sampled at, and how it moves between them (DESIGN.md §2).

    Attributes:
        times: decreasing start times of each step, e.g. ``(1.0, 0.75, 0.5, 0.25)``; the last step lands on 0.
        transition: ``"ddim"`` for a deterministic jump (progressive distillation), ``"renoise"`` for
            "denoise then re-noise with fresh Gaussian noise" (consistency / DMD2 multi-step).
    """

    times: tuple[float, ...]
    transition: str = "ddim"

    def __post_init__(self):
        if self.transition not in ("ddim", "renoise"):
            raise ValueError(f"StudentGrid.transition must be 'ddim' or 'renoise', got {self.transition!r}")
        if any(b >= a for a, b in zip(self.times, self.times[1:])) or not self.times or self.times[-1] <= 0:
            raise ValueError(f"student grid times must be strictly decreasing and positive, got {self.times}")

    @property
    def steps(self) -> int:
        return len(self.times)

    def with_end(self) -> torch.Tensor:
        return torch.tensor((*self.times, 0.0), dtype=torch.float64)


@torch.no_grad()
def sample_student(student: Denoiser, noise: torch.Tensor, grid: StudentGrid, *, cond: Cond = None, w=1.0,
                   generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Sample a few-step student on its declared grid from standard normal ``noise`` (scaled by ``prior_noise``).

    For VP schedules with non-zero terminal SNR the first input is plain noise, which is how diffusers pipelines
    start; DMD2 trains on exactly that, PD on ``a_1 x0 + s_1 eps`` (``a_1`` = 0.068 for SD's betas: a small shift).
    ``callback(i, x, pred)`` runs after each step, as in the teacher samplers (``pred.x0``: the step's clean estimate).
    """
    sch = student.schedule
    times = grid.with_end()
    x = prior_noise(sch, noise, grid.times[0])
    n = x.shape[0]
    for i in range(grid.steps):
        pred = guided(student, x, times[i].expand(n), cond, w)
        t_next = times[i + 1].expand(n)
        if times[i + 1] == 0:  # the last step lands on the data: the clean estimate (sigma(0) may be > 0)
            x = pred.x0_64.to(x.dtype)
        elif grid.transition == "ddim":
            x = ddim_step(pred, sch, t_next)
        else:
            z = student.fresh_noise(x, generator)
            x = (sch.alpha(times[i + 1]) * pred.x0_64 + sch.sigma(times[i + 1]) * z.double()).to(x.dtype)
        if callback is not None:
            callback(i, x, pred)
    return x
