"""SDXL-Lightning (Lin, Wang & Yang 2024): progressive adversarial distillation.

Followed: METHODS.md §7.3 (the paper, recalled; only weights were released). Progressive distillation's stages
(``progressive.py``: the student halves the steps of the stage's teacher, which is the previous stage's student,
handed over in ``begin_step`` with a fresh optimizer) with the first ``mse_stages`` trained by PD's MSE and the rest by
an adversarial loss that keeps the student on the teacher's trajectory:

* a stage's step ``x_t -> x_s`` (one student DDIM jump over two of its teacher's steps) is judged against the teacher's
  own two steps from the same ``x_t``, the "real" ``x_s``; at the first step ``x_t`` is pure noise (training at
  t = 999 with pure noise, METHODS.md P1), later steps noise the data to ``t``; the last step lands on x0;
* the discriminator is conditional (Lightning §3.3: it judges ``x_s`` *given* ``x_t``, which preserves the ODE
  trajectory and so the teacher's modes): the heads see the features of ``x_s`` at ``s`` beside those of ``x_t`` at
  ``t``, from a trainable copy of the teacher's encoder (``method.source: encoder``, the paper's) or the frozen
  teacher; for the last ``relaxed_steps`` steps of each adversarial stage the objective is "relaxed": the ``x_t`` half
  is zeroed, so the heads judge ``x_s`` alone (the paper's unconditional fine-tune, which fixes artefacts);
* non-saturating losses (``terms.gan_*``), the heads conditioned on ``s`` and the prompt.

Trailing timesteps come with PD's grids (``snap(i / n)``: 999, 749, 499, 249 for 4 steps of 1000); a one-step model
predicting x0 is the recipe's ``student_prediction: x0``.
"""

from __future__ import annotations

import torch

from ..nets.discriminator import TIME_DIM, EncoderSource, TeacherSource, text_dim, text_vector
from ..nets.discriminator import time_features as noise_features
from ..nets.gan_head import GANHead
from ..parameterization import ddim_step
from ..sampling import StudentGrid, prior_noise
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .progressive import ProgressiveDistillation
from .terms import GAN_LOSSES, gan_critic_loss, gan_generator_loss


LIGHTNING_SOURCES = ("encoder", "teacher")


class Lightning(Method):
    """Progressive adversarial distillation (SDXL-Lightning).

    Args:
        teacher_steps: steps of the teacher's DDIM sampler that the first stage halves.
        stages: the student's steps in each stage, each half the previous (the first half of ``teacher_steps``),
            e.g. ``[16, 8, 4, 2]`` from 32 (Lightning: 128 -> 32 by MSE, then 32 -> 8 -> 4 -> 2 -> 1 adversarially).
        mse_stages: how many of the first stages train by PD's MSE before the adversarial ones.
        steps_per_stage: training steps per stage.
        relaxed_steps: the last steps of each adversarial stage that use the relaxed (unconditional) objective.
        disc_warmup: the first steps of each adversarial stage in which only the discriminator trains. At a stage
            boundary the student *is* its stage teacher's one-step jump and the heads start at chance; a student
            updated on a chance discriminator's gradient moves by noise (Adam scales it to full steps) and drifts off
            the trajectory before the heads can tell anything (docs/experiments/adversarial.md).
        source: the discriminator's features: ``encoder`` (a trainable copy of the teacher's encoder, the paper's) or
            ``teacher`` (its frozen blocks).
        layers: the feature blocks read (``None``: every one).
        head_width: the heads' width.
        loss: ``ns`` (the paper's non-saturating loss) or ``hinge``.
        student_prediction, guidance, sample_guidance, regression_steps, weighting: as progressive distillation's.
    """

    phases = ("student", "discriminator")
    #: the generator's loss runs through another network's input (the frozen teacher's blocks, or the trained encoder
    #: copy)
    teacher_grad = True

    def __init__(self, *, teacher_steps: int = 16, stages: list[int] | None = None, mse_stages: int = 1,
                 steps_per_stage: int = 1000, relaxed_steps: int = 0, disc_warmup: int = 0, source: str = "encoder",
                 layers: list[int] | None = None, head_width: int = 256, loss: str = "ns",
                 student_prediction: str = "v", guidance: tuple[float, float] | None = None,
                 sample_guidance: float | None = None, regression_steps: int = 0, weighting: str = "snr_trunc"):
        stages = list(stages or [teacher_steps // 2 ** k for k in range(1, 4)])
        if not stages or any(n < 1 or 2 * n != prev for n, prev in zip(stages, [teacher_steps, *stages])):
            raise ValueError(f"method.stages must halve the steps stage by stage from method.teacher_steps "
                             f"{teacher_steps} (e.g. {[teacher_steps // 2 ** k for k in range(1, 4)]}), got {stages}")
        if not 0 <= mse_stages < len(stages):
            raise ValueError(f"method.mse_stages must leave at least one adversarial stage: 0..{len(stages) - 1}, "
                             f"got {mse_stages}")
        if source not in LIGHTNING_SOURCES or loss not in GAN_LOSSES:
            raise ValueError(f"method.source must be one of {list(LIGHTNING_SOURCES)} and method.loss one of "
                             f"{list(GAN_LOSSES)}, got {source!r}, {loss!r}")
        for key, value in (("relaxed_steps", relaxed_steps), ("disc_warmup", disc_warmup)):
            if not 0 <= value <= steps_per_stage:
                raise ValueError(f"method.{key} must be in [0, steps_per_stage], got {value}")
        # the stages are PD's: its grids, targets, hand-over and MSE
        self.pd = ProgressiveDistillation(teacher_steps=teacher_steps, final_steps=stages[-1],
                                          steps_per_stage=steps_per_stage, weighting=weighting,
                                          student_prediction=student_prediction, guidance=guidance,
                                          sample_guidance=sample_guidance, regression_steps=regression_steps)
        self.mse_stages, self.relaxed_steps, self.disc_warmup, self.loss = mse_stages, relaxed_steps, disc_warmup, loss
        self.source = EncoderSource(tuple(layers) if layers else None) if source == "encoder" else TeacherSource(
            tuple(layers) if layers else None)
        self.head_width = head_width
        self.text_dim = 0
        self.relaxed = False

    # ------------------------------------------------------------------------------------------------ interface
    def roles(self) -> dict[str, RoleSpec]:
        return {**self.pd.roles(), **self.source.roles(), "discriminator": RoleSpec(build=self._head)}

    def _head(self, nets: Nets) -> GANHead:
        """Conditioned heads on the maps of ``x_s`` and ``x_t`` side by side (twice each map's channels)."""
        self.text_dim = text_dim(nets.teacher)
        return GANHead([2 * c for c in self.source.channels(nets)], hidden=self.head_width,
                       cond_dim=TIME_DIM + self.text_dim)

    def owner(self, phase: str) -> str | tuple[str, ...]:
        return "student" if phase == "student" else ("discriminator", *self.source.trained_roles)

    @property
    def adversarial(self) -> bool:
        return self.pd.stage >= self.mse_stages

    def active_phases(self, step, update_every) -> tuple[str, ...]:
        if self.pd.stage_at(step) < self.mse_stages:
            return ("student",)  # PD's MSE stages (and its regression stage): no discriminator yet
        phases = super().active_phases(step, update_every)
        return tuple(p for p in phases if p != "student") if self._offset(step) < self.disc_warmup else phases

    def _offset(self, step: int) -> int:
        """How many steps of its stage came before ``step``."""
        return (step - self.pd.regression_steps) % self.pd.steps_per_stage

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        logs = self.pd.update_schedule(step, nets)
        self.relaxed = self.adversarial and self._offset(step) >= self.pd.steps_per_stage - self.relaxed_steps
        return {**logs, "relaxed": float(self.relaxed)}

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        return self.pd.begin_step(step, nets)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        self.pd.prepare(nets, ctx)

    def student_grid(self) -> StudentGrid:
        return self.pd.student_grid()

    # ------------------------------------------------------------------------------------------------ pieces
    def jumps(self, nets: Nets, batch: Batch):
        """One stage step per sample: ``x_t`` (pure noise at the first step), the student's condition, the teacher's
        two-step ``x_s`` (no gradient) and the times ``t``, ``s``; and the student's jump as a function."""
        x0, gen, n = batch.x0, batch.generator, self.pd.student_steps
        sch, b = nets.student.schedule, x0.shape[0]
        i = torch.randint(0, n, (b,), generator=gen).double()
        t, t_mid, s = (sch.snap(k / (2 * n)) for k in (2 * i + 2, 2 * i + 1, 2 * i))
        eps = noise_like(x0, gen)
        first = (i == n - 1).view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        x_t = torch.where(first, prior_noise(sch, eps, 1.0), sch.add_noise(x0, eps, t))
        student_cond, teacher_step = self.pd.stage_teacher(nets, batch)
        last = (i == 0).view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        with torch.no_grad():
            z_s, pred = self.pd.two_steps(teacher_step, nets.teacher.schedule, x_t, t, t_mid, s)
            real = torch.where(last, pred.x0_64, z_s.double()).to(x0.dtype)

        def student_jump():
            p = nets.student(x_t, t, student_cond)
            return torch.where(last, p.x0, ddim_step(p, sch, s).to(x0.dtype))

        return x_t, t, s, real, student_jump, student_cond

    def judge(self, nets: Nets, x_s, s, x_t, t, cond) -> torch.Tensor:
        """The heads' logits for ``x_s`` given ``x_t`` (relaxed: the ``x_t`` half zeroed)."""
        sch = nets.teacher.schedule
        s_seen = s.clamp(min=sch.t_min)  # the last step's x0, judged at the schedule's clean end
        feats = self.source(nets, x_s, s_seen, cond)
        if self.relaxed:
            given = [torch.zeros_like(f) for f in feats]
        else:
            given = self.source(nets, x_t, t, cond)
        parts = [noise_features(sch, s_seen).to(x_s.device)]
        text = text_vector(cond, self.text_dim)
        c = torch.cat(parts + ([text] if text is not None else []), 1)
        return nets["discriminator"]([torch.cat([f, g.to(f.dtype)], 1) for f, g in zip(feats, given)], c)

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        if not self.adversarial:
            return self.pd(phase, nets, batch)
        x_t, t, s, real, student_jump, cond = self.jumps(nets, batch)
        if phase == "student":
            logits = self.judge(nets, student_jump(), s, x_t, t, cond)
            loss = gan_generator_loss(logits, self.loss)
            return LossOutput(loss, {"loss": loss.detach().mean(), "d_fake": logits.detach().mean()})
        with torch.no_grad():
            fake = student_jump()
        logits_fake = self.judge(nets, fake, s, x_t, t, cond)
        logits_real = self.judge(nets, real, s, x_t, t, cond)
        loss = gan_critic_loss(logits_fake, logits_real, self.loss)
        return LossOutput(loss, {"loss": loss.detach().mean(), "d_real": logits_real.detach().mean(),
                                 "d_fake": logits_fake.detach().mean()})
