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
from .parameterization import Coefficients, Prediction, ddim_step
from .schedules import _bcast
from .transitions import Transition
from .transitions import transition as transition_of
from .types import noise_like


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
        pred = guided(denoiser, x, t.expand(n), cond, w)
        if sch.alpha(t) < 1e-8:
            # alpha(t) = 0 up to rounding (rectified flow and TrigFlow at t = 1): sigma_bar is infinite there and the
            # trapezoid over an infinite interval is undefined (it returned NaN/inf), so this step is Euler (= DDIM),
            # as the last step to sigma = 0 is.
            x = ddim_step(pred, sch, s.expand(n))
        else:
            x = heun_step(denoiser, x, pred, t.expand(n), s.expand(n), cond, w)
        if callback is not None:
            callback(i, x, pred)
    return x


def heun_step(denoiser: Denoiser, x: torch.Tensor, pred, t: torch.Tensor, s: torch.Tensor, cond: Cond = None,
              w=1.0) -> torch.Tensor:
    """One Heun step of the scale-free PF-ODE ``dy/dsigma_bar = eps`` (``y = x / alpha``, ``sigma_bar = sigma /
    alpha``; Karras et al. 2022, Algorithm 1) from ``t`` to ``s`` (per-sample ``[B]``, ``alpha(t) > 0``), given the
    prediction ``pred`` at ``(x, t)``: one more evaluation, at the Euler point; a step to ``s = 0`` stays an Euler step
    (the paper's last step). Float64 inside."""
    sch = denoiser.schedule
    a_t, a_s = _bcast(sch.alpha(t), x), _bcast(sch.alpha(s), x)
    sb_t, sb_s = _bcast(sch.sigma(t), x) / a_t, _bcast(sch.sigma(s), x) / a_s  # sigma_bar
    y = x.double() / a_t
    d1 = pred.eps_64  # dy/dsigma_bar
    y_next = y + (sb_s - sb_t) * d1
    if (s > 0).all():
        pred2 = guided(denoiser, (y_next * a_s).to(x.dtype), s, cond, w)
        y_next = y + (sb_s - sb_t) * 0.5 * (d1 + pred2.eps_64)
    elif (s != 0).any():  # a mix of Euler and Heun rows: the caller must split them
        raise ValueError("heun_step: per-sample end times must be all positive or all 0")
    return (y_next * a_s).to(x.dtype)


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
    """The times a few-step student is sampled at, how it moves between them, and which network takes each step
    (DESIGN.md §2).

    Attributes:
        times: decreasing start times of each step, e.g. ``(1.0, 0.75, 0.5, 0.25)``; the last step lands on 0.
        transition: how a step moves to the next time (``transitions.py``): a ``Transition`` or its name,
            ``"ddim"`` (deterministic jumps: progressive distillation, one-step students), ``"renoise"`` ("denoise
            then re-noise with fresh Gaussian noise": consistency / DMD2 multi-step), ``"cm"``, ``"tcd"``.
        experts: the role that takes each step (phased DMD's per-phase students), or ``None``: the student takes
            every step.
    """

    times: tuple[float, ...]
    transition: Transition | str = "ddim"
    experts: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "transition", transition_of(self.transition))
        if any(b >= a for a, b in zip(self.times, self.times[1:])) or not self.times or self.times[-1] <= 0:
            raise ValueError(f"student grid times must be strictly decreasing and positive, got {self.times}")
        if self.experts is not None and len(self.experts) != len(self.times):
            raise ValueError(f"a student grid names one expert per step: {len(self.times)} steps, experts "
                             f"{self.experts}")

    @property
    def steps(self) -> int:
        return len(self.times)

    def with_end(self) -> torch.Tensor:
        return torch.tensor((*self.times, 0.0), dtype=torch.float64)

    def roles(self) -> tuple[str, ...]:
        """The roles that take steps, in order of first use."""
        return tuple(dict.fromkeys(self.experts or ("student",)))


class Piecewise(Denoiser):
    """A student of several experts (``StudentGrid.experts``) as one denoiser: a time in step ``i``'s interval
    ``(t_{i+1}, t_i]`` goes to that step's expert, so sampling and evaluation run unchanged; a stock pipeline holds one
    backbone, so export refuses it (``plain_backbone``)."""

    def __init__(self, experts: dict, grid: StudentGrid):
        first = experts[grid.experts[0]]
        super().__init__(first.schedule, first.prediction)
        self.experts = torch.nn.ModuleDict(experts)
        self.grid = grid

    @property
    def backbone(self):
        return self.experts[self.grid.experts[0]].backbone

    def null_cond(self, cond):
        return self.experts[self.grid.experts[0]].null_cond(cond)

    def fresh_noise(self, like, generator=None):
        return self.experts[self.grid.experts[0]].fresh_noise(like, generator)

    def forward(self, x_t, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        lower = torch.tensor((*self.grid.times[1:], 0.0), dtype=torch.float64, device=t.device)
        step = ((t[:, None] <= lower[None]).sum(1)).clamp(max=self.grid.steps - 1)  # (t_{i+1}, t_i] -> i
        x0, eps = torch.empty_like(x_t, dtype=torch.float64), torch.empty_like(x_t, dtype=torch.float64)
        for i in step.unique().tolist():
            rows = step == i
            sub = None if cond is None else {k: v[rows] for k, v in cond.items()}
            pred = self.experts[self.grid.experts[i]](x_t[rows], t[rows], sub)
            x0[rows], eps[rows] = pred.x0_64, pred.eps_64
        return Prediction(x0, eps, Coefficients.at(self.schedule, t, x_t), x_t.dtype)

    def plain_backbone(self):
        raise ValueError(f"export: a student of {len(self.grid.roles())} experts ({', '.join(self.grid.roles())}) "
                         "has no stock pipeline (one backbone); sample and evaluate it with stepdistill")


def sampling_denoiser(nets, grid: StudentGrid, *, use_ema: bool = True) -> Denoiser:
    """The denoiser that samples ``grid``: the student (or each step's expert), by its EMA ``<role>_ema`` where the run
    keeps one and ``use_ema``."""
    def pick(role):
        return nets[f"{role}_ema"] if use_ema and f"{role}_ema" in nets else nets[role]

    roles = grid.roles()
    if len(roles) == 1:
        return pick(roles[0])
    return Piecewise({role: pick(role) for role in roles}, grid)


@torch.no_grad()
def sample_student(student: Denoiser, noise: torch.Tensor, grid: StudentGrid, *, cond: Cond = None, w=1.0,
                   generator: torch.Generator | None = None, steps: int | None = None, new_noise=None,
                   callback=None) -> torch.Tensor:
    """The student rollout: sample a few-step student on its declared grid from standard normal ``noise`` (scaled by
    ``prior_noise``), one step per grid time, moving between times by the grid's transition. The one rollout for
    sampling, evaluation, export checks and training-time simulation (DMD2's backward simulation).

    For VP schedules with non-zero terminal SNR the first input is plain noise, which is how diffusers pipelines
    start; DMD2 trains on exactly that, PD on ``a_1 x0 + s_1 eps`` (``a_1`` = 0.068 for SD's betas: a small shift).

    Args:
        steps: run only the first ``steps`` steps and return the input of step ``steps`` (``x`` at ``times[steps]``);
            ``None`` runs them all and returns the sample.
        new_noise: ``new_noise(like)`` draws the fresh noise of stochastic transitions; default ``student.fresh_noise``
            with ``generator`` (the family's stock layout, so a seeded pipeline call draws the same numbers).
        callback: ``callback(i, x, pred)`` after each step, as in the teacher samplers (``pred.x0``: the step's clean
            estimate).
    """
    sch, move = student.schedule, grid.transition
    times = grid.with_end()
    x = prior_noise(sch, noise, grid.times[0])
    n = x.shape[0]
    draw = new_noise or (lambda like: student.fresh_noise(like, generator))
    for i in range(grid.steps if steps is None else steps):
        pred = guided(student, x, times[i].expand(n), move.inputs(cond, times[i + 1].expand(n)), w)
        if times[i + 1] == 0:  # the last step lands on the data (its clean estimate, or TCD's timestep 0)
            x = move.last(pred, sch)
        else:
            x = move.step(pred, sch, times[i + 1].expand(n), lambda like=x: draw(like))
        if callback is not None:
            callback(i, x, pred)
    return x


def backward_simulation(student: Denoiser, noise: torch.Tensor, grid: StudentGrid, *, cond: Cond = None, generator,
                        shared: torch.Generator | None = None,
                        data: torch.Tensor | None = None) -> tuple[Prediction, int]:
    """DMD2's backward simulation (Yin et al. 2024, §4.5; ``sd_unified_model.py``): a multi-step student's training
    input made the way it is sampled. Draw a step ``k ~ U{0..K-1}`` (from ``shared`` when given: alike on every rank,
    so sharded ranks make the same number of student calls), run the student's rollout without gradient from pure
    noise for ``k`` steps, and return its prediction at step ``k`` with the graph, and ``k``. ``data`` instead noises
    real samples to step ``k``'s time (training without simulation). Fresh noise of the rollout's transitions comes
    from ``generator``."""
    times = torch.tensor(grid.times, dtype=torch.float64, device=noise.device)
    b = noise.shape[0]
    k = int(torch.randint(0, grid.steps, (1,), generator=shared or generator)) if grid.steps > 1 else 0

    def fresh_noise(like):
        return noise_like(like, generator)

    if k > 0 and data is not None:
        x = student.schedule.add_noise(data, fresh_noise(noise), times[k].expand(b))
    else:
        x = sample_student(student, noise, grid, cond=cond, steps=k, new_noise=fresh_noise)
    return student(x, times[k].expand(b), cond), k
