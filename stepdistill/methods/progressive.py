"""Progressive distillation (Salimans & Ho, ICLR 2022), with guided PD for CFG teachers (Meng et al., CVPR 2023).

Followed: google-research ``diffusion_distillation/dpm.py`` ``Model.training_losses`` (METHODS.md §2). Per step, with
the student taking N steps on the grid ``t_i = i / N``:

    i ~ U{0..N-1},  t = (i+1)/N,  x_t = a_t x + s_t eps
    two teacher DDIM steps t -> t - 1/(2N) -> s = t - 1/N give z_s
    x~ = (z_s - (s_s/s_t) x_t) / (a_s - (s_s/s_t) a_t)          (Algorithm 2: one student DDIM step lands on z_s)
    loss = max(|x_theta - x~|^2, |eps_theta - eps~|^2) = max(SNR, 1) |x_theta - x~|^2   ("snr_trunc")

On a discrete-time teacher (SD's 1000 timesteps) every time above is rounded to the nearest timestep
(``schedule.snap``), so no stage queries a timestep the teacher was never trained at (32 steps on 1000 would be
index 30.25): ``snap(i/N) = snap(2i/2N)``, so each stage's grid is the even points of the next finer one. It is
diffusers' ``trailing`` grid for that step count, the one the exported scheduler replays, whenever ``N_train / N``
is exact in floating point (every count that divides ``N_train``, and 16, 32, 64 on 1000); at counts like 48 on 1000
numpy's float ``arange`` rounds a few points the other way.

For the last step (``s = 0``) the target is the teacher's x0 from the midpoint evaluation, as the paper prescribes
(``dpm.py``: ``where(i == 0, x_pred, x_target)``; the formula agrees wherever sigma(0) = 0). Stages halve N;
between stages the teacher becomes the student (``stage_teacher <- student``, or its EMA), in ``begin_step``;
``update_schedule`` only tracks the stage. Guided PD: with ``guidance=(w_min, w_max)`` the teacher is queried with
CFG at a per-sample ``w ~ U[w_min, w_max]`` and the student receives ``w`` as the input ``cond["guidance"]``; later
stages distil the w-conditioned previous student without CFG. (Meng et al. run a separate first stage that matches
the CFG teacher at equal steps; here that regression is folded into the first halving unless ``regression_steps``
asks for it.)

Regression stage (``regression_steps > 0``, Meng et al. 2023 §4.1 stage one): before the first halving, the student
learns the (guided) teacher's own x0 prediction at the teacher's step count, with the same weighting. The student
starts from the teacher's weights; when the teacher predicts eps (SD1.5, SDXL) and the student v, those weights read
as v are far from the teacher (at t = 1 their x0 estimate is about -eps), and PD assumes a student that starts close
to its teacher. This stage is where the student learns to output v; without it such a run is refused.
"""

from __future__ import annotations

import math
import sys

import torch

from ..denoisers import guided
from ..parameterization import ddim_step, ddim_x0_target
from ..sampling import StudentGrid
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .terms import GuidanceRange


WEIGHTINGS = ("snr_trunc", "constant", "snr", "v_mse")


class ProgressiveDistillation(Method):
    """Progressive distillation loss object.

    Args:
        teacher_steps: steps of the original teacher's DDIM sampler that the first student halves (e.g. 64).
        final_steps: steps of the last student (e.g. 4); ``teacher_steps / final_steps`` must be a power of two.
        steps_per_stage: training steps per halving (the paper uses 50k on CIFAR-10).
        weighting: ``snr_trunc`` (default, paper), ``constant`` (x-MSE), ``snr`` (eps-MSE) or ``v_mse``.
        student_prediction: the student's output, ``x0``, ``v`` or, for flow teachers, ``flow_match`` (eps-prediction
            fails, METHODS.md §2 pitfalls).
        guidance: ``(w_min, w_max)`` for guided PD, or ``None``. With ``w_min == w_max`` the student distils the
            CFG teacher at that one scale and takes no w input. With a range the student takes ``w`` as an input:
            SD1.5/SDXL UNets through the LCM w-embedding (``time_cond_proj_dim``, which stock SD pipelines feed from
            ``guidance_scale``), FLUX through FLUX.1-dev's guidance embedder; a teacher without one gives the
            student a new, zero-initialised one (``roles.mode: full``).
        sample_guidance: the scale a w-conditioned student samples and exports with (its pipeline's default
            ``guidance_scale``); default: the middle of the range.
        regression_steps: training steps of a first stage at the teacher's own step count (see above); needed when
            a student initialised from the teacher predicts another quantity than the teacher.
    """

    phases = ("student",)

    def __init__(self, *, teacher_steps: int = 64, final_steps: int = 4, steps_per_stage: int = 1000,
                 weighting: str = "snr_trunc", student_prediction: str = "v",
                 guidance: tuple[float, float] | None = None, sample_guidance: float | None = None,
                 regression_steps: int = 0):
        ratio = teacher_steps / final_steps
        if final_steps < 1 or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"method.teacher_steps / method.final_steps must be a power of two >= 2, got "
                             f"{teacher_steps}/{final_steps}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"method.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if student_prediction not in ("x0", "v", "flow_match"):
            raise ValueError(f"method.student_prediction must be 'x0', 'v' or 'flow_match' (eps fails for PD), got "
                             f"{student_prediction!r}")
        if regression_steps < 0:
            raise ValueError(f"method.regression_steps must be >= 0, got {regression_steps}")
        if steps_per_stage < 1:
            raise ValueError(f"method.steps_per_stage must be >= 1, got {steps_per_stage}")
        self.teacher_steps, self.final_steps = teacher_steps, final_steps
        self.steps_per_stage, self.regression_steps = steps_per_stage, regression_steps
        self.num_stages = round(math.log2(ratio))
        self.weighting, self.student_prediction = weighting, student_prediction
        self.guidance = GuidanceRange.parse(guidance, sample_guidance)
        self.sample_guidance = None if self.guidance is None else self.guidance.sample
        self.stage = 0  # the halving under way; -1 during the regression stage
        self._schedule = None  # the student's (prepare / update_schedule): its snap() rounds times to its timesteps

    @property
    def total_steps(self) -> int:
        return self.regression_steps + self.num_stages * self.steps_per_stage

    @property
    def student_steps(self) -> int:
        return self.teacher_steps // 2 ** (self.stage + 1)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """Refuse a student that starts from the teacher's weights, reads them as another prediction and has no
        regression stage to learn it in; note a learning-rate period that does not restart at the stage boundaries
        (Salimans & Ho anneal the rate to 0 within each stage), and an EMA too slow for the stages it hands on."""
        self._use_schedule(nets.student.schedule)  # student_grid() works before the first step (samples, export)
        teacher_pred = nets.teacher.prediction
        if ctx.student_init == "teacher" and teacher_pred != self.student_prediction and not self.regression_steps:
            raise ValueError(
                f"method.regression_steps: the student starts from the teacher's weights, which predict "
                f"{teacher_pred!r}, but predicts {self.student_prediction!r}; give it a first stage at the teacher's "
                "step count to learn that (e.g. method.regression_steps: 1000)")
        period = ctx.lr_periods.get("student")
        stages = {self.steps_per_stage, *([self.regression_steps] if self.regression_steps else [])}
        if period is not None and stages != {period} and ctx.is_main_process:
            print(f"note: optim.student.period is {period} but the stages last {sorted(stages)} steps "
                  "(method.steps_per_stage, method.regression_steps): the learning rate will not restart at the "
                  "stage boundaries", file=sys.stderr)
        kept, shortest = ctx.ema_decay ** min(stages), min(stages)
        if kept > 0.1 and ctx.is_main_process:  # the EMA becomes the next stage's teacher and student (begin_step)
            print(f"note: train.ema_decay {ctx.ema_decay} still weighs a stage's starting weights {kept:.0%} in the "
                  f"EMA after its {shortest} steps, and the EMA is what each stage hands on (the official stages "
                  "last 50k steps); lower the decay or lengthen the stages", file=sys.stderr)

    def roles(self) -> dict[str, RoleSpec]:
        return {
            "student": RoleSpec(init="teacher", prediction=self.student_prediction,
                                guidance=self.sample_guidance if self._takes_w else None),
            # The previous stage's student, frozen: the teacher of every stage after the first.
            "stage_teacher": RoleSpec(init="student", trainable=False, checkpointed=True),
        }

    @property
    def _takes_w(self) -> bool:
        """A guidance range: the student takes w as an input (a fixed scale is baked in instead)."""
        return self.guidance is not None and self.guidance.takes_w

    def owner(self, phase: str) -> str:
        return "student"

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        """The stage ``step`` belongs to (bookkeeping only: the weights move in ``begin_step``)."""
        if self._schedule is None:
            self._use_schedule(nets.student.schedule)
        self.stage = self.stage_at(step)
        return {"stage": float(self.stage), "student_steps": float(self.student_steps)}

    def stage_at(self, step: int) -> int:
        """The halving ``step`` belongs to (-1: the regression stage)."""
        halving = step - self.regression_steps
        return -1 if halving < 0 else min(halving // self.steps_per_stage, self.num_stages - 1)

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        """Stage boundaries, run by the loop once as ``step`` starts. The student just trained becomes the teacher
        of the next halving and starts its optimizer afresh, as the official notebook does ("student becomes new
        teacher", "reset student optimizer for next distillation iteration", ``diffusion_distillation.ipynb``): the
        previous stage's moments belong to another target. With a student EMA, as there, it is the EMA that becomes
        the teacher, and the next student starts from it ("init_params = teacher_state.ema_params"). The regression
        stage ends the same way, with no stage teacher to fill. Returns the roles whose optimizer restarts."""
        halving = step - self.regression_steps
        stage, offset = divmod(halving, self.steps_per_stage)
        if halving < 0 or offset or stage >= self.num_stages or (stage == 0 and not self.regression_steps):
            return ()
        ema = nets.extra.get("student_ema")
        if stage > 0:
            nets["stage_teacher"].load_role_state_dict((nets.student if ema is None else ema).role_state_dict())
        if ema is not None:
            nets.student.load_role_state_dict(ema.role_state_dict())
        return ("student",)

    def _use_schedule(self, schedule) -> None:
        """Adopt the student's schedule, whose ``snap`` rounds times to its timesteps; the finest grid the run
        queries (the teacher's steps) must put each point on its own timestep."""
        times = schedule.snap(torch.arange(self.teacher_steps + 1, dtype=torch.float64) / self.teacher_steps)
        if (times.diff() <= 0).any():
            raise ValueError(f"method.teacher_steps: {self.teacher_steps} steps need as many distinct timesteps, "
                             f"the teacher has {schedule.num_train_timesteps}")
        self._schedule = schedule

    def student_grid(self) -> StudentGrid:
        if self._schedule is None:
            raise RuntimeError("ProgressiveDistillation.student_grid() before prepare() or update_schedule(): "
                               "the grid needs the schedule")
        n = self.student_steps
        times = self._schedule.snap(torch.arange(n, 0, -1, dtype=torch.float64) / n)
        return StudentGrid(times=tuple(times.tolist()), transition="ddim")

    def stage_teacher(self, nets: Nets, batch: Batch):
        """The student's condition and the stage's teacher as ``teacher_step(x, t) -> Prediction``: the CFG teacher
        (first stage) or the previous, already guided, student. The noised data is seen with its own condition where
        it has one (labels, captions), else with the batch's prompts."""
        cond = batch.x0_cond if batch.x0_cond is not None else batch.cond
        student_cond, w = cond, 1.0
        if self.guidance is not None:
            w = self.guidance.draw(batch.size, batch.generator)
            student_cond = self.guidance.student_cond(cond, w, batch.x0.device)
        if self.stage <= 0:
            teacher, teacher_cond, teacher_w = nets.teacher, cond, w
        else:
            teacher, teacher_cond, teacher_w = nets["stage_teacher"], student_cond, 1.0
        return student_cond, lambda x, t: guided(teacher, x, t, teacher_cond, teacher_w)

    @staticmethod
    def two_steps(teacher_step, schedule, x_t, t, t_mid, s):
        """Two teacher DDIM steps ``t -> t_mid -> s`` on ``schedule``: ``z_s`` and the prediction made at ``t_mid``."""
        pred = teacher_step(x_t, t)
        z_mid = ddim_step(pred, schedule, t_mid)
        pred = teacher_step(z_mid, t_mid)
        return ddim_step(pred, schedule, s), pred

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        x0 = batch.x0
        n_steps, b = self.student_steps, x0.shape[0]
        sch = nets.student.schedule
        gen = batch.generator

        # Sample a student step and noise the data to its start time.
        i = torch.randint(0, n_steps, (b,), generator=gen).double()
        t, t_mid, s = (sch.snap(k / (2 * n_steps)) for k in (2 * i + 2, 2 * i + 1, 2 * i))
        eps = noise_like(x0, gen)
        x_t = sch.add_noise(x0, eps, t)

        student_cond, teacher_step = self.stage_teacher(nets, batch)
        with torch.no_grad():
            if self.stage < 0:  # regression stage: the teacher's own x0 at t (the student takes the teacher's steps)
                x_target = teacher_step(x_t, t).x0_64
            else:  # two teacher DDIM steps t -> t_mid -> s, then the x-target of Algorithm 2
                z_s, pred = self.two_steps(teacher_step, nets.teacher.schedule, x_t, t, t_mid, s)
                x_target = ddim_x0_target(x_t, z_s, sch, t, s)
                # the last step lands on the data: its target is the midpoint's x0 (dpm.py), which the formula
                # gives only where sigma(0) = 0
                last = (i == 0).view(-1, *([1] * (x0.ndim - 1))).to(x_target.device)
                x_target = torch.where(last, pred.x0_64, x_target)

        # Student prediction and the weighted regression.
        pred = nets.student(x_t, t, student_cond)
        a_t, s_t = pred.coeffs.a, pred.coeffs.s
        eps_target = (x_t.double() - a_t * x_target) / s_t
        dims = tuple(range(1, x0.ndim))
        x_err = ((pred.x0_64 - x_target) ** 2).mean(dims)
        eps_err = ((pred.eps_64 - eps_target) ** 2).mean(dims)
        if self.weighting == "snr_trunc":
            loss = torch.maximum(x_err, eps_err)
        elif self.weighting == "constant":
            loss = x_err
        elif self.weighting == "snr":
            loss = eps_err
        else:
            v_target = a_t * eps_target - s_t * x_target
            loss = ((pred.get("v", exact=True) - v_target) ** 2).mean(dims)
        loss = loss.float()
        return LossOutput(loss, {"loss": loss.detach().mean(), "x_mse": x_err.detach().mean()})
