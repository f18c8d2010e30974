"""Phased DMD (Fan et al. 2025, arXiv 2510.27684): distribution matching over SNR subintervals, one expert per phase.

Followed: METHODS.md §6 and ModelTC/LightX2V ``lightx2v_train/trainers/phased_dmd`` (``math.py``, ``rollout.py``,
``trainer.py``), the authors' organisation's two-region implementation, generalised to K phases and any schedule.

The student's grid of N deterministic (DDIM) steps is cut into K phases at grid times
``1 >= t_0 > t_1 > ... > t_K = 0`` (``phase_boundaries`` or an even split); phase k takes the steps from ``t_k``
down to ``t_{k+1}``, with its own expert G_k (``experts: per_phase``) or one shared student, and its own fake score F_k
(``fake_scores: per_phase``). For phase k, per training step:

    rollout:  x_j = the no-grad rollout of the earlier experts from pure noise to step j ~ U{steps of phase k}
              (SGTS restricted to the phase), then p = G_k(x_j, t_j) with its graph
    anchor:   x_s = a_s x0_p + s_s eps_p       the DDIM jump of that prediction to the phase's end s = t_{k+1}
              (the last phase: x_s = x0_p)
    DM loss:  t ~ U(s + margin, t_k] (the teacher's timesteps),  x_t = q(x_t | x_s) (``noise_travel``)
              L = dm_loss(x0_p, teacher_cfg(x_t).x0, F_k(x_t).x0)           (``terms.dm_loss``)
    critic:   F_k trained by subinterval score matching (``terms.subinterval_target``), t drawn alike, on the
              phase's real output: a full no-grad rollout to its end (the last phase: the sample)

The loss sits on ``x0_p``, as in the official code, not on the anchor: ``x_s`` depends on ``x0_p`` through the positive
scalar ``a_s - s_s a_j / s_j`` (``x_j`` is fixed), so the gradient direction is the same and DMD's per-sample
normaliser absorbs the scale. Matching at ``t > s`` suffices: the marginal at ``t`` of ``x_s`` noised forward is the
teacher's ``p_t`` exactly when ``x_s ~ p_s``; the critic never sees ``t`` at or below ``s`` (the margin keeps
``1 / beta`` of its target finite).

Schedule (``schedule``): ``alternate`` as the official trainer, phase ``(step // every) % K`` where ``every`` is the
student's ``train.update_every`` ratio (one student update of a phase, then ``every`` critic updates of that phase,
LightX2V's ``fake_update_ratio``), or ``all`` phases every step. The loop's phases are ``student@k`` and
``fake_score@k``; ``train.update_every`` names them ``student`` and ``fake_score``.

Why the critic sees the rollout's output and not the anchors the DM loss moves (as DMD2's critic sees the
backward-simulation step's output): a phase of several steps makes a mixture of projections, one per ``j``, and a
critic of that mixture stops the gradient once the mixture matches, with its parts erring in opposite directions. On
the 2-D ring they did: the last phase's two steps put the modes at radius 0.67 and 0.73 (teacher 0.695), the sample
at 0.73 (docs/experiments/phased-dmd.md). With the rollout's output as the critic's data, the gradient vanishes only
when the sample itself matches.

Departures, written down: the official low region also alternates between Wan 2.2's two teacher experts (our teacher
is one network); its optional ``fake_low_high`` critic is not built; no GAN term.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..denoisers import guided
from ..parameterization import ddim_step
from ..sampling import StudentGrid, sample_student, sampling_denoiser
from ..transitions import noise_travel
from ..types import noise_like
from .bands import Bands
from .base import Batch, LossOutput, Method, Nets, RoleSpec
from .terms import denoising_loss, dm_loss, subinterval_target


EXPERTS = ("shared", "per_phase")
SCHEDULES = ("alternate", "all")


class PhasedDMD(Method):
    """Phased DMD: per-phase experts and subinterval distribution matching (module docstring).

    Args:
        student_steps: the student's deterministic steps N (on the teacher's trailing grid).
        num_phases: K, the phases of an even split of the N steps (N must be a multiple of K); ignored when
            ``phase_boundaries`` is given.
        phase_boundaries: the times (fractions of the time axis, decreasing) between phases, each a time of the
            student grid (the official config's check), e.g. ``[0.5]`` for two phases of a 4-step student.
        experts: ``per_phase`` (phase k's own student ``student_k``; ``student`` is phase 0's) or ``shared`` (one
            student for every phase, exported like any few-step student).
        fake_scores: ``per_phase`` (``fake_score_k``, the paper's F_k; ``fake_score`` is phase 0's) or ``shared``
            (one time-conditioned critic: the phases' bands are disjoint, so it models each phase's output on its own
            band).
        schedule: ``alternate`` (one phase per block of steps, the official trainer) or ``all`` (every phase every
            step).
        guidance_scale: CFG scale of the teacher inside the DM loss (1: none; LightX2V ``guidance_distill`` 6.0).
        margin: the gap (a fraction of the time axis, 20 of 1000 timesteps officially) kept above a phase's end ``s``
            for its draws of ``t``; none at ``s = 0``.
        dm_weight: weight of the DM loss.
        fake_score_target: parameterisation of the critic's MSE (``x0 | eps | v``; ``None``: the critic's own output,
            the teacher's training loss; the official flow code's velocity MSE).
        student_prediction: the experts' output parameterisation; ``None`` keeps the teacher's.
    """

    #: the loop's phases are ``student@k`` / ``fake_score@k`` (``active_phases``); these name them in
    #: ``train.update_every``
    phases = ("student", "fake_score")

    def __init__(self, *, student_steps: int = 4, num_phases: int = 2, phase_boundaries: list[float] | None = None,
                 experts: str = "per_phase", fake_scores: str = "per_phase", schedule: str = "alternate",
                 guidance_scale: float = 1.0, margin: float = 0.02, dm_weight: float = 1.0,
                 fake_score_target: str | None = None, student_prediction: str | None = None):
        if experts not in EXPERTS or fake_scores not in EXPERTS:
            raise ValueError(f"method.experts and method.fake_scores must be one of {EXPERTS}, got {experts!r}, "
                             f"{fake_scores!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if phase_boundaries is not None:
            num_phases = len(phase_boundaries) + 1
        if not isinstance(student_steps, int) or student_steps < 1:
            raise ValueError(f"method.student_steps must be a number of steps >= 1, got {student_steps!r}")
        if not isinstance(num_phases, int) or not 1 <= num_phases <= student_steps:
            raise ValueError(f"method.num_phases: {num_phases!r} phases for a {student_steps}-step student; a phase "
                             "takes at least one student step")
        if phase_boundaries is None and student_steps % num_phases:
            raise ValueError(f"method.num_phases: {student_steps} steps do not split evenly into {num_phases} "
                             "phases; give method.phase_boundaries (times of the student grid)")
        if not 0.0 <= margin < 1.0 or guidance_scale < 1.0 or dm_weight < 0:
            raise ValueError(f"method: margin must be in [0, 1), guidance_scale >= 1, dm_weight >= 0; got {margin}, "
                             f"{guidance_scale}, {dm_weight}")
        if fake_score_target not in (None, "x0", "eps", "v"):
            raise ValueError(f"method.fake_score_target must be x0, eps, v or null, got {fake_score_target!r}")
        self.student_steps, self.num_phases = student_steps, num_phases
        self.boundaries = None if phase_boundaries is None else [float(b) for b in phase_boundaries]
        self.experts, self.fake_scores, self.schedule = experts, fake_scores, schedule
        self.guidance_scale, self.margin, self.dm_weight = guidance_scale, margin, dm_weight
        self.fake_score_target, self.student_prediction = fake_score_target, student_prediction
        self._grid: StudentGrid | None = None
        self._starts: tuple[int, ...] = ()  # the first grid step of each phase, then N
        self.bands: Bands | None = None  # phase k's subinterval of times, set with the grid

    # ------------------------------------------------------------------------------------------------ roles
    def expert(self, k: int) -> str:
        """Phase ``k``'s student role."""
        return "student" if k == 0 or self.experts == "shared" else f"student_{k}"

    def critic(self, k: int) -> str:
        """Phase ``k``'s fake score role."""
        return "fake_score" if k == 0 or self.fake_scores == "shared" else f"fake_score_{k}"

    def roles(self) -> dict[str, RoleSpec]:
        specs = {"student": RoleSpec(init="teacher", prediction=self.student_prediction)}
        for k in range(1, self.num_phases):  # each expert starts as the student (the teacher, or a fresh network)
            specs.setdefault(self.expert(k), RoleSpec(init="student", optim_of="student"))
        specs["fake_score"] = RoleSpec(init="teacher")
        for k in range(1, self.num_phases):
            specs.setdefault(self.critic(k), RoleSpec(init="teacher", optim_of="fake_score"))
        return specs

    def sampling_roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.expert(k) for k in range(self.num_phases)))

    def owner(self, phase: str) -> str | tuple[str, ...]:
        kind, _, k = phase.partition("@")
        name = self.expert if kind == "student" else self.critic
        if k:
            return name(int(k))
        return tuple(dict.fromkeys(name(i) for i in range(self.num_phases)))

    def active_phases(self, step: int, update_every: Mapping[str, int]) -> tuple[str, ...]:
        """``alternate``: phase ``(step // e) % K`` with ``e`` the student's ratio, its student update at the block's
        first step and its critic by its own ratio; ``all``: every phase by the ratios."""
        every, every_fake = update_every.get("student", 1), update_every.get("fake_score", 1)
        ks = [(step // every) % self.num_phases] if self.schedule == "alternate" else range(self.num_phases)
        out = []
        for k in ks:
            out += [f"student@{k}"] if step % every == 0 else []
            out += [f"fake_score@{k}"] if step % every_fake == 0 else []
        return tuple(out)

    # ------------------------------------------------------------------------------------------------ grid
    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self._grid is None:
            sch = nets.student.schedule
            times = tuple(float(t) for t in sch.grid(self.student_steps)[:-1])
            self._starts = self._phase_starts(times) + (len(times),)
            owners = tuple(self.expert(k) for k in range(self.num_phases)
                           for _ in range(self._starts[k], self._starts[k + 1]))
            self._grid = StudentGrid(times, transition="ddim",
                                     experts=owners if len(set(owners)) > 1 else None)
            edges = self._grid.with_end().tolist()
            self.bands = Bands(tuple(edges[i] for i in self._starts), self.margin)
            self._check_bands(nets.teacher.schedule)
        return {}

    def prepare(self, nets: Nets, ctx) -> None:
        self.update_schedule(0, nets)  # the grid (and its checks) before anything samples or is written

    def _phase_starts(self, times: tuple[float, ...]) -> tuple[int, ...]:
        if self.boundaries is None:
            per = len(times) // self.num_phases
            return tuple(range(0, len(times), per))
        starts = [0]
        for b in self.boundaries:
            hits = [i for i, t in enumerate(times) if abs(t - b) < 1e-9]
            if not hits or hits[0] <= starts[-1]:
                raise ValueError(f"method.phase_boundaries: {b} is not a time of the student grid {times} after the "
                                 "previous boundary (a phase boundary must coincide with a student step)")
            starts.append(hits[0])
        return tuple(starts)

    def phase_times(self, k: int) -> tuple[float, float]:
        """Phase ``k``'s start time and end time ``s`` (0 for the last phase). Its DM loss and critic draw ``t`` in
        its band ``(s + margin, start]`` (no margin at ``s = 0``)."""
        return self.bands.edges[k], self.bands.edges[k + 1]

    def _check_bands(self, schedule) -> None:
        for k in range(self.num_phases):
            if self.bands.empty(schedule, k):
                raise ValueError(f"method.margin: {self.margin} leaves phase {k} (times {self.phase_times(k)}) no "
                                 "time to match at; use a smaller margin or fewer phases")

    def student_grid(self) -> StudentGrid:
        if self._grid is None:
            raise RuntimeError("PhasedDMD.student_grid() before update_schedule(): the grid needs the schedule")
        return self._grid

    # ------------------------------------------------------------------------------------------------ pieces
    def rollout(self, nets: Nets, k: int, noise: torch.Tensor, cond, gen, shared=None):
        """Phase ``k``'s generator output: step ``j`` drawn in the phase (from ``shared``, alike on every rank), the
        no-grad rollout of the earlier steps' experts to it, phase ``k``'s expert at ``x_j`` with its graph, and the
        anchor (its DDIM jump to the phase's end; its x0 in the last phase). Returns ``(prediction, anchor)``."""
        grid, sch = self.student_grid(), nets.student.schedule
        lo, hi = self._starts[k], self._starts[k + 1]
        j = lo + int(torch.randint(0, hi - lo, (1,), generator=shared or gen)) if hi - lo > 1 else lo
        times = grid.with_end().to(noise.device)
        x = sample_student(sampling_denoiser(nets, grid, use_ema=False), noise, grid, cond=cond, steps=j)
        b = noise.shape[0]
        pred = nets[self.expert(k)](x, times[j].expand(b), cond)
        anchor = pred.x0 if hi == grid.steps else ddim_step(pred, sch, times[hi].expand(b))
        return pred, anchor

    def draw(self, schedule, k: int, like: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` in phase ``k``'s band and standard normal noise shaped ``like``."""
        t = self.bands.draw(schedule, k, like.shape[0], gen).to(like.device)
        return t, noise_like(like, gen)

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        kind, _, k = phase.partition("@")
        return (self.student_loss if kind == "student" else self.fake_score_loss)(int(k), nets, batch)

    def student_loss(self, k: int, nets: Nets, batch: Batch) -> LossOutput:
        """Phase ``k``'s expert update: the DM loss on its step's x0, judged in the phase's band."""
        gen, cond = batch.generator, batch.cond
        noise = batch.noise()
        pred, anchor = self.rollout(nets, k, noise, cond, gen, batch.shared)
        sch = nets.teacher.schedule
        t, n = self.draw(sch, k, anchor, gen)
        with torch.no_grad():
            x_t = noise_travel(anchor.detach(), sch, torch.full_like(t, self.phase_times(k)[1]), t, n)
            real = guided(nets.teacher, x_t, t, cond, self.guidance_scale).x0_64
            fake = nets[self.critic(k)](x_t, t, cond).x0_64
        dm, logs = dm_loss(pred.x0, real, fake)
        loss = self.dm_weight * dm
        return LossOutput(loss, {**logs, "loss_dm": dm.detach().mean(), "loss": loss.detach().mean()})

    def fake_score_loss(self, k: int, nets: Nets, batch: Batch) -> LossOutput:
        """Phase ``k``'s critic update: subinterval score matching on the phase's output, a full no-grad rollout of the
        experts to the phase's end (the official trainer's ``_run_full_fake_rollout``)."""
        gen, cond = batch.generator, batch.cond
        grid, last = self.student_grid(), self._starts[k + 1]
        with torch.no_grad():
            noise = batch.noise()
            x_end = sample_student(sampling_denoiser(nets, grid, use_ema=False), noise, grid, cond=cond,
                                   steps=None if last == grid.steps else last)
        critic = nets[self.critic(k)]
        t, n = self.draw(critic.schedule, k, x_end, gen)
        x_t, x0, eps = subinterval_target(x_end, critic.schedule, torch.full_like(t, self.phase_times(k)[1]), t, n)
        pred = critic(x_t.to(x_end.dtype), t, cond)
        loss = denoising_loss(pred, x0, eps, self.fake_score_target or critic.prediction)
        return LossOutput(loss, {"loss_denoise": loss.detach().mean(), "loss": loss.detach().mean()})
