"""Consistency distillation: CD (Song et al., ICML 2023), LCM / LCM-LoRA (Luo et al. 2023), PCM (Wang et al.,
NeurIPS 2024) and TCD (Zheng et al. 2024) as settings of one loss (METHODS.md §3.1, §3.2, §3.6, §3.7, §1.7); and ECT
(Geng et al., ICLR 2025, §3.4), the same loss on continuous time pairs (``time_pairs.ECTPairs``), as consistency
training (``solver: forward``, no teacher) or distillation.

Followed: diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` (LCM), G-U-N/Phased-Consistency-
Model ``train_pcm_lora_sd15.py`` (PCM), openai/consistency_models ``consistency_losses`` (CD's Heun step, target EMA,
shared dropout RNG); TCD has no released training code, so its target follows the paper (§4.2). Per step:

    the teacher ladder: N + 1 times tau_0 < tau_1 < ... < tau_N, tau_j the trailing N-step grid (LCM's
        20 (j+1) - 1 on 1000 timesteps for N = 50, the skipping step k = T / N) and tau_0 the boundary: timestep 0 of a
        discrete teacher (LCM's ``max(t - k, 0)``), t = 0 of a continuous one
    j ~ U{1..N},  t = tau_j,  t_n = tau_{j-1},  x_t = a_t x0 + s_t eps      (x0: data, or the teacher's ODE samples)
    w ~ U[w_min, w_max]  (CFG inside the solver, our convention: LCM's omega is w - 1)
    x_prev = one teacher step t -> t_n with CFG w (DDIM, or Heun: CD)                               (no grad)
    loss = d( f_theta(x_t, t), sg f_target(x_prev, t_n) )      f_target: an EMA of the student, or the student itself

The consistency function ``f`` is where the variants differ (``endpoint``):

* ``data`` (CD, LCM): the clean estimate with LCM's boundary scalings, ``f = c_skip(n) x + c_out(n) x0_hat`` at the
  backbone's timestep ``n`` (``parameterization.consistency_output``; ``f = x`` at timestep 0, ``c_skip < 7e-6`` from
  timestep 19 on), what diffusers' ``LCMScheduler`` applies, so the exported pipeline replays the student;
* ``phase`` (PCM): the DDIM jump of the prediction to the end of the phase the online time lies in; the ``M =
  student_steps`` phases split the ladder evenly (tau_0, tau_{N/M}, ...), so the phase ends are the trailing M-step
  grid that DDIM replays. At a phase edge (``t_n`` is the end) the target is ``x_prev`` itself (PCM's ``c_skip = 1``);
* ``random`` (TCD): the DDIM jump to ``s ~ U[0, t_n]`` (on a discrete teacher, the nearest timestep), the same ``s``
  for both sides: the trajectory-consistency function ``f(x, t, s)`` of TCD's first-order form.

Sampling: ``data`` re-noises the clean estimate between the steps LCMScheduler takes for ``student_steps`` on the
N-step grid (999/759/499/259 for 4 of 50); ``random`` uses TCD's strategic stochastic sampling (``gamma``);
``phase`` jumps deterministically along the phase ends. Departures: CD runs on the teacher's own (VP) time ladder with
LCM's boundary scalings rather than on an EDM Karras grid with EDM's, so that stock schedulers replay it; PCM's phases
are even on the ladder (the official ``floor(linspace(0, 50, M))`` edges are uneven for N = 50, M = 4).
"""

from __future__ import annotations

import torch

from ..denoisers import guided
from ..nets.lpips import LPIPS, lpips_for_samples
from ..pairs import CleanSamples
from ..parameterization import consistency_output, ddim_step
from ..sampling import StudentGrid, heun_step
from ..schedules import VPDiscrete, _bcast
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .terms import DISTANCES, GuidanceRange, regression_loss
from .time_pairs import parse_times


ENDPOINTS = ("data", "phase", "random")
SOLVERS = ("ddim", "heun", "forward")


class Consistency(Method):
    """Consistency distillation loss object (CD, LCM, PCM, TCD; ``methods/__init__.py`` names their defaults).

    Args:
        student_steps: the student's sampling steps (PCM: its phases, each one step).
        teacher_steps: N, the teacher ladder's steps (LCM's ``num_ddim_timesteps``, 50 on SD); on a discrete teacher
            it must divide the T timesteps (the skipping step ``k = T / N``).
        endpoint: ``data`` (CD, LCM), ``phase`` (PCM) or ``random`` (TCD); see the module docstring.
        solver: the teacher step, ``ddim`` (LCM, PCM, TCD) or ``heun`` (CD: two teacher passes per step); or
            ``forward``: no teacher, ``x_{t_n}`` is the same data and noise at ``t_n`` (consistency *training*: ECT,
            iCT; a real data source is required).
        target_ema: decay of the target network, an EMA of the student updated after each student update (CD and
            LCM: 0.95); 0 takes the target from the student itself under no grad (PCM, iCT).
        distance: ``mse`` (LCM's default), ``huber`` (LCM/PCM's ``--loss_type huber``, per element with
            ``huber_c``), ``pseudo_huber`` (iCT's, over the whole sample), ``l2`` (ECT's norm) or ``lpips`` (CD's;
            pixel images only).
        huber_c: ``c`` of ``huber`` (0.001 in the LCM/PCM scripts).
        times: where ``(t, t_n)`` come from: ``ladder`` (a link of the teacher ladder), ECT's continuous pairs
            (``ect`` or ``{name: ect, stage_steps: ..., q: ..., ...}``, ``time_pairs.ECTPairs``, weighted
            ``1 / sigma^2 + 1 / sd^2``) or iCT's (``ict`` or ``{name: ict, total_steps: ..., ...}``,
            ``time_pairs.ICTPairs``, weighted ``1 / (sigma_{i+1} - sigma_i)``).
        weight_power: ``p`` of the per-sample loss weight ``(sigma_t - sigma_{t_n})^-p`` in EDM's sigma: 0 is uniform
            (CD, LCM, PCM), 1 is iCT's ``1 / (sigma_{i+1} - sigma_i)`` (Song & Dhariwal 2023, §3.2). Positive powers
            keep the low-noise links of the ladder from being unlearnt under the larger high-noise errors, which
            multi-step sampling needs, at the cost of the one-step map (docs/experiments/consistency.md).
        guidance: ``[w_min, w_max]`` of the CFG-augmented solver in our convention (the diffusers script's
            ``w_min=5, w_max=15`` are 6..16 here), or ``None`` (no CFG in the target: PCM's ``--not_apply_cfg_solver``,
            the student then takes ordinary CFG at inference). A range gives the student a w input (LCM's
            w-embedding); ``[w, w]`` bakes one scale in (LCM-LoRA).
        sample_guidance: the scale a w-conditioned student samples and exports with; default the middle of the range.
        timestep_scaling: LCM's boundary-scaling factor (10); ``endpoint: data`` only.
        gamma: TCD's sampling stochasticity (``eta`` of ``TCDScheduler``), in [0, 1]; ``endpoint: random`` only.
        x0_source: where ``x_t``'s clean sample comes from: ``data`` (the run's data source), ``teacher`` (the
            teacher's ODE samples, made once and cached as DMD's pairs are) or ``auto`` (data when the run has a data
            source, else teacher samples).
        num_pairs, pair_sampler, pair_steps, pair_cache, pair_guidance: the teacher samples (``x0_source: teacher``):
            how many, the sampler and its steps, the cache file, and the CFG scale of text teachers (default the
            middle of ``guidance``, else 1).
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
        lpips_net, lpips_weights: the LPIPS backbone and its weights folder (``distance: lpips``).
    """

    phases = ("student",)
    makes_samples = True

    def __init__(self, *, student_steps: int = 4, teacher_steps: int = 64, endpoint: str = "data",
                 solver: str = "ddim", target_ema: float = 0.95, distance: str = "mse", huber_c: float = 1e-3,
                 weight_power: float = 0.0, times: str | dict = "ladder",
                 guidance: tuple[float, float] | None = None, sample_guidance: float | None = None,
                 timestep_scaling: float = 10.0, gamma: float = 0.3, x0_source: str = "auto", num_pairs: int = 4096,
                 pair_sampler: str = "heun", pair_steps: int = 32, pair_cache: str | None = None,
                 pair_guidance: float | None = None, student_prediction: str | None = None,
                 lpips_net: str = "vgg", lpips_weights: str | None = None):
        for key, value, allowed in (("endpoint", endpoint, ENDPOINTS), ("solver", solver, SOLVERS),
                                    ("distance", distance, DISTANCES)):
            if value not in allowed:
                raise ValueError(f"method.{key} must be one of {allowed}, got {value!r}")
        if not 1 <= student_steps <= teacher_steps:
            raise ValueError(f"method.student_steps must be in [1, method.teacher_steps = {teacher_steps}], got "
                             f"{student_steps}")
        if endpoint == "phase" and teacher_steps % student_steps:
            raise ValueError(f"method.student_steps: PCM's {student_steps} phases must split the teacher's "
                             f"{teacher_steps} steps evenly")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"method.target_ema must be in [0, 1), got {target_ema}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"method.gamma (TCD's eta) must be in [0, 1], got {gamma}")
        if not 0.0 <= weight_power <= 2.0:
            raise ValueError(f"method.weight_power must be in [0, 2], got {weight_power}")
        if huber_c <= 0:
            raise ValueError(f"method.huber_c must be positive, got {huber_c}")
        self.pairs = parse_times(times)
        if self.pairs is not None and endpoint != "data":
            raise ValueError(f"method.times: continuous pairs need method.endpoint: data (the {endpoint!r} endpoint "
                             "lives on the teacher's ladder)")
        if solver == "forward" and x0_source == "teacher":
            raise ValueError("method.solver: forward is consistency training on real data; it cannot take "
                             "method.x0_source: teacher")
        self.student_steps, self.teacher_steps, self.endpoint, self.solver = (student_steps, teacher_steps, endpoint,
                                                                              solver)
        self.target_ema, self.distance, self.huber_c, self.weight_power = target_ema, distance, huber_c, weight_power
        self.guidance = GuidanceRange.parse(guidance, sample_guidance)
        self.timestep_scaling, self.gamma = timestep_scaling, gamma
        self.clean = CleanSamples(x0_source, num=num_pairs, sampler=pair_sampler, steps=pair_steps, cache=pair_cache)
        self.pair_guidance = pair_guidance
        self.student_prediction, self.lpips_net, self.lpips_weights = student_prediction, lpips_net, lpips_weights
        self.step = 0  # the curricula's step (``update_schedule``)
        self.ladder: torch.Tensor | None = None  # tau_0..tau_N (float64), from the schedule (``_use_schedule``)
        self.lpips: LPIPS | None = None

    @property
    def needs_real_data(self) -> str | None:
        if self.solver == "forward":
            return "consistency training (method.solver: forward)"
        return self.clean.needs_real_data("consistency distillation")

    @property
    def reads_data(self) -> bool:
        return self.clean.reads_data

    def roles(self) -> dict[str, RoleSpec]:
        takes_w = self.guidance is not None and self.guidance.takes_w
        roles = {"student": RoleSpec(init="teacher", prediction=self.student_prediction,
                                     guidance=self.guidance.sample if takes_w else None)}
        if self.target_ema > 0:
            roles["target"] = RoleSpec(ema_of="student", decay=self.target_ema)
        return roles

    # ------------------------------------------------------------------------------------------------ the ladder
    def _use_schedule(self, schedule) -> None:
        """The teacher ladder tau_0..tau_N on ``schedule``: the trailing N-step grid, with the boundary first."""
        n = self.teacher_steps
        if isinstance(schedule, VPDiscrete) and schedule.num_train_timesteps % n:
            raise ValueError(f"method.teacher_steps: {n} steps do not divide the teacher's "
                             f"{schedule.num_train_timesteps} timesteps (the skipping step T / N must be whole)")
        ladder = schedule.grid(n).flip(0)
        ladder[0] = schedule.t_min  # timestep 0 of a discrete teacher, where LCM's boundary scalings give f = x
        self.ladder = ladder

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self.ladder is None:
            self._use_schedule(nets.student.schedule)
        self.step = step
        return {} if self.pairs is None else self.pairs.curriculum(step)

    def student_grid(self) -> StudentGrid:
        return self.grid_for(self.student_steps)

    def grid_for(self, k: int) -> StudentGrid:
        """The grid of ``k`` sampling steps: a consistency student samples at any step count (``student_grid`` is the
        grid of ``student_steps``); PCM's, trained for its phases, only at ``student_steps``."""
        if self.ladder is None:
            raise RuntimeError("Consistency.student_grid() before prepare() or update_schedule(): the grid needs the "
                               "schedule")
        n = self.teacher_steps
        if not 1 <= k <= n or (self.endpoint == "phase" and k != self.student_steps):
            raise ValueError(f"a consistency student samples 1 to {n} steps (PCM only its {self.student_steps} "
                             f"phases), not {k}")
        if self.endpoint == "phase":  # one deterministic jump per phase, from the top of each
            steps = [n - m * (n // k) for m in range(k)]
            return StudentGrid(times=tuple(self.ladder[steps].tolist()), transition="ddim")
        steps = [n - (m * n) // k for m in range(k)]  # LCMScheduler's pick: floor(linspace(0, N, K, endpoint=False))
        move = {"name": "tcd", "gamma": self.gamma} if self.endpoint == "random" else "renoise"
        return StudentGrid(times=tuple(self.ladder[steps].tolist()), transition=move)

    # ------------------------------------------------------------------------------------------------ prepare
    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """The ladder; teacher samples when they stand in for data (said in the log); LPIPS."""
        teacher = nets.teacher
        self._use_schedule(nets.student.schedule)
        if self.solver == "heun" and float(teacher.schedule.alpha(torch.tensor(1.0))) < 1e-8:
            raise ValueError("method.solver: heun divides by the signal scale, which is 0 at the start of this "
                             "teacher's schedule (a flow teacher); use ddim (Euler)")
        w = self.pair_guidance
        if w is None:
            w = 1.0 if self.guidance is None else (self.guidance.lo + self.guidance.hi) / 2
        self.clean.prepare(teacher, ctx, who="consistency", guidance=w)
        if self.distance == "lpips":
            self.lpips = lpips_for_samples(ctx.sample_shape, self.lpips_net, self.lpips_weights, ctx.device,
                                           key="method.distance")

    # ------------------------------------------------------------------------------------------------ the loss
    def consistency_fn(self, net, x: torch.Tensor, t: torch.Tensor, end: torch.Tensor | None, cond) -> torch.Tensor:
        """``f(x, t)`` of network ``net`` (float64): with ``end`` (per-sample times <= ``t``), the DDIM jump of its
        prediction to ``end`` (exactly ``x`` where ``end = t``); without, the clean estimate with LCM's boundary
        scalings."""
        pred = net(x, t, cond)
        if end is None:
            return consistency_output("lcm", net.schedule, x, pred.x0_64, t, timestep_scaling=self.timestep_scaling)
        sch = net.schedule
        a, s = _bcast(sch.alpha(end), pred.x0_64), _bcast(sch.sigma(end), pred.x0_64)
        jump = a * pred.x0_64 + s * pred.eps_64
        stay = (end >= t).to(jump.device).view(-1, *([1] * (jump.ndim - 1)))
        return torch.where(stay, x.double(), jump)

    def _end(self, j: torch.Tensor, t_n: torch.Tensor, schedule, gen) -> torch.Tensor | None:
        """The time both sides of the loss map to: none (data), the phase end, or TCD's ``s ~ U[0, t_n]``."""
        if self.endpoint == "phase":
            per = self.teacher_steps // self.student_steps
            return self.ladder[((j - 1) // per) * per]
        if self.endpoint == "random":
            s = torch.rand(j.shape[0], generator=gen, dtype=torch.float64) * t_n
            return schedule.snap(s)
        return None

    @torch.no_grad()
    def teacher_step(self, teacher, x_t: torch.Tensor, t: torch.Tensor, t_n: torch.Tensor, cond, w) -> torch.Tensor:
        """``x_prev``: one step of the CFG teacher (scale ``w``, per sample) from ``t`` to ``t_n`` by ``solver``."""
        pred = guided(teacher, x_t, t, cond, w)
        if self.solver == "heun":
            return heun_step(teacher, x_t, pred, t, t_n, cond, w)
        return ddim_step(pred, teacher.schedule, t_n)

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        gen, sch, teacher = batch.generator, nets.student.schedule, nets.teacher
        x0, cond = self.clean.draw(batch)
        b, device = x0.shape[0], x0.device
        if self.pairs is None:  # a link of the teacher's ladder
            j = torch.randint(1, self.teacher_steps + 1, (b,), generator=gen)
            t, t_n = self.ladder[j], self.ladder[j - 1]
            end, weight = self._end(j, t_n, sch, gen), None
        else:  # ECT's or iCT's pair at this step of its curriculum, with its weight
            t, t_n, weight = self.pairs.draw(b, sch, self.step, gen)
            end = None
        eps = noise_like(x0, gen)
        x_t = sch.add_noise(x0, eps, t)
        w, student_cond = 1.0, cond
        if self.guidance is not None:
            w = self.guidance.draw(b, gen)
            student_cond = self.guidance.student_cond(cond, w, device)

        target_net = nets["target"] if "target" in nets else nets.student
        with torch.no_grad():
            if self.solver == "forward":  # consistency training: the same data and noise at t_n, no teacher
                x_prev = sch.add_noise(x0, eps, t_n)
            else:
                x_prev = self.teacher_step(teacher, x_t, t, t_n, cond, w)
            # the target pass draws its dropout masks from the RNG state the online pass then starts from (CD's
            # shared dropout RNG): fork_rng restores the state on exit
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                target = self.consistency_fn(target_net, x_prev, t_n, end, student_cond)
        online = self.consistency_fn(nets.student, x_t, t, end, student_cond)
        loss = regression_loss(online, target, self.distance, self.lpips, huber_c=self.huber_c)
        if self.weight_power:  # (sigma_t - sigma_{t_n})^-p, EDM's sigma = s / a
            link = (sch.sigma(t) / sch.alpha(t)) - (sch.sigma(t_n) / sch.alpha(t_n))
            loss = loss / link.to(loss.device) ** self.weight_power
        if weight is not None:
            loss = loss * weight.to(loss.device)
        loss = loss.float()
        return LossOutput(loss, {"loss": loss.detach().mean()})
