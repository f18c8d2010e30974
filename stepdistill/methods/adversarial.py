"""Adversarial distillation: ADD (Sauer et al. 2023, SD-/SDXL-Turbo) and LADD (Sauer et al. 2024, SD3-Turbo).

Followed: METHODS.md §7.1-7.2 (both papers recalled; neither released training code) and, for what the papers leave
open, NVIDIA FastGen's LADD reimplementation (``fastgen/methods/distribution_matching/ladd.py``: the student's input,
separate noise and times for reals and fakes, the student updated every 5th step). One class serves both; the recipe
chooses (``add`` and ``ladd`` are this class with other defaults, ``methods/__init__.py``):

* the student: a K-step generator on the schedule's trailing grid (1000, 750, 500, 250 of 1000 for K = 4), x0
  prediction then re-noising between steps. A training step picks ``k ~ U{0..K-1}`` (the same on every rank) and feeds
  the student real data noised to ``t_k`` (ADD §3.1, FastGen; ``student_input: rollout`` feeds its own no-grad
  rollout instead); step 0 always gets pure noise, as zero terminal SNR demands (METHODS.md P1; DMD2's
  ``pure_noise_mask``);
* the "real" data: the data source (``real: data``, ADD) or the teacher's own samples with CFG (``real: teacher``,
  LADD: no real images), made once and cached like DMD's ODE pairs (``pairs.py``), prompts and all;
* the discriminator: a feature source (``nets/discriminator.py``: the frozen teacher's blocks, LADD; a trainable copy
  of the teacher's encoder, SDXL-Lightning; a frozen DINOv2 on decoded pixels, ADD) and one conditioned head per map
  (``nets/gan_head.py``). With a noisy source both reals and fakes are re-noised to ``t_hat``: logit-normal ``(m, s)``
  over rectified-flow time (LADD m = 1, s = 1, biased to high noise and global structure), mapped to the teacher's
  schedule by SNR. Heads see the noise level and the prompt (and, for ``dino``, ADD's image embedding of the real
  image the student's input came from);
* losses: hinge (ADD, LADD) or non-saturating (DMD2, FastGen) ``terms.gan_*``, optionally R1 (ADD gamma 1e-5);
  ADD's score-distillation term ``distill_weight * c(t) |x - sg x0_teacher(a_t x + s_t eps, t)|^2``, ``c(t) = a_t``
  (ADD's "exponential" weighting), ``t`` uniform over the teacher's timesteps, the teacher at ``distill_guidance``.

Phases ``("student", "discriminator")``: the student's adversarial (and distillation) loss with the heads and the
encoder frozen by the loop, gradients flowing through the feature network to the sample; then the heads (and the
encoder) on that sample, detached (or a fresh no-grad one on steps without a student update), and reals.
``train.update_every: {student: 5}`` is FastGen's LADD default.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..denoisers import guided
from ..nets.discriminator import SOURCES, TIME_DIM, DinoSource, EncoderSource, TeacherSource, text_dim, text_vector
from ..nets.discriminator import time_features as noise_features
from ..nets.gan_head import GANHead
from ..pairs import CleanSamples
from ..sampling import TEACHER_SAMPLERS, StudentGrid, prior_noise, sample_student
from ..schedules import LogitNormal, RectifiedFlow, map_time
from ..types import noise_like
from .base import Batch, HandOver, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .terms import GAN_LOSSES, gan_critic_loss, gan_generator_loss, r1_penalty, regression_loss, time_range


REALS = ("data", "teacher")
STUDENT_INPUTS = ("data", "rollout")
WEIGHTINGS = ("alpha", "one")


class Adversarial(Method):
    """Adversarial diffusion distillation (ADD) and its latent variant (LADD).

    Args:
        student_steps: steps of the student (ADD: 1-4; SD3-Turbo: 4).
        real: what the discriminator sees as real: ``data`` (ADD) or ``teacher`` samples (LADD).
        student_input: how steps after the first get their input: ``data`` (the reals noised to the step's time:
            ADD, FastGen) or ``rollout`` (the student's own no-grad steps, DMD2's backward simulation).
        source: the discriminator's features: ``teacher``, ``encoder`` or ``dino`` (``nets/discriminator.py``).
        layers: the feature blocks read (``None``: every block of the teacher or encoder, LADD; ``output``: the
            teacher's prediction, for the exact GMM teacher that has no blocks).
        head_width: the heads' width.
        loss: ``hinge`` (ADD, LADD) or ``ns`` (non-saturating: DMD2, FastGen).
        gan_weight: weight of the student's adversarial loss.
        r1_weight: ``gamma`` of the R1 penalty on the reals (ADD: 1e-5; 0: none).
        disc_time_mean, disc_time_std: LADD's logit-normal ``(m, s)`` of the discriminator's re-noising time.
        distill_weight: ADD's ``lambda`` (2.5) of the score-distillation loss; 0: none (LADD).
        distill_guidance: the teacher's CFG scale inside that loss (ADD leaves it open).
        distill_weighting: ``alpha`` (ADD's ``c(t) = a_t``) or ``one``.
        guidance_scale: CFG scale of the teacher's samples (``real: teacher``).
        num_pairs, pair_sampler, pair_steps, pair_cache: the teacher's sample set (``pairs.py``).
        dino_weights: a DINOv2 folder or hub id (``None``: ``facebook/dinov2-small``); ``dino_tiny``: a random tiny
            network, for tests.
        image_condition: ``dino`` heads also see ADD's image embedding (the CLS of the real image behind the input).
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
    """

    phases = ("student", "discriminator")
    teacher_grad = True

    def __init__(self, *, student_steps: int = 4, real: str = "data", student_input: str = "data",
                 source: str = "teacher", layers: list[int] | str | None = None, head_width: int = 256,
                 loss: str = "hinge", gan_weight: float = 1.0, r1_weight: float = 0.0, disc_time_mean: float = 1.0,
                 disc_time_std: float = 1.0, distill_weight: float = 0.0, distill_guidance: float = 1.0,
                 distill_weighting: str = "alpha", guidance_scale: float = 1.0, num_pairs: int = 2048,
                 pair_sampler: str = "ddim", pair_steps: int = 64, pair_cache: str | None = None,
                 dino_weights: str | None = None, dino_tiny: bool = False, image_condition: bool = True,
                 student_prediction: str | None = None):
        for key, value, allowed in (("real", real, REALS), ("student_input", student_input, STUDENT_INPUTS),
                                    ("source", source, SOURCES), ("loss", loss, GAN_LOSSES),
                                    ("distill_weighting", distill_weighting, WEIGHTINGS),
                                    ("pair_sampler", pair_sampler, tuple(TEACHER_SAMPLERS))):
            if value not in allowed:
                raise ValueError(f"method.{key} must be one of {list(allowed)}, got {value!r}")
        if student_steps < 1:
            raise ValueError(f"method.student_steps must be >= 1, got {student_steps}")
        if min(gan_weight, r1_weight, distill_weight) < 0 or min(distill_guidance, guidance_scale) < 1:
            raise ValueError("method: loss weights must be >= 0 and guidance scales >= 1")
        if disc_time_std <= 0 or head_width < 1:
            raise ValueError("method.disc_time_std and method.head_width must be positive")
        if layers == "output" and source != "teacher":
            raise ValueError("method.layers: output (the teacher's prediction) is for method.source: teacher")
        if isinstance(layers, str) and layers != "output":
            raise ValueError(f"method.layers must be a list of block indices, null (all) or 'output', got {layers!r}")
        if (dino_weights is not None or dino_tiny) and source != "dino":
            raise ValueError("method.dino_weights / dino_tiny are for method.source: dino")
        self.student_steps, self.real, self.student_input = student_steps, real, student_input
        self.source_name, self.head_width, self.loss = source, head_width, loss
        self.layers = tuple(layers) if isinstance(layers, list) else layers
        self.gan_weight, self.r1_weight = gan_weight, r1_weight
        self.disc_times = LogitNormal(disc_time_mean, disc_time_std)
        self.distill_weight, self.distill_guidance = distill_weight, distill_guidance
        self.distill_weighting, self.guidance_scale = distill_weighting, guidance_scale
        # the reals: the run's data, or the teacher's CFG samples made once and cached (LADD)
        self.clean = CleanSamples(real, num=num_pairs, sampler=pair_sampler, steps=pair_steps, cache=pair_cache)
        self.dino_weights, self.dino_tiny = dino_weights, dino_tiny
        self.image_condition = image_condition and source == "dino"
        self.student_prediction = student_prediction
        self.source = self._source()
        self.text_dim = 0  # the prompt vector's size, known once the teacher is (``_head``)
        self._grid: StudentGrid | None = None
        self.fakes = HandOver()  # the student phase's detached samples, for the heads' phase of the same step

    def _source(self):
        if self.source_name == "teacher":
            return TeacherSource(self.layers)
        if self.source_name == "encoder":
            return EncoderSource(self.layers)
        return None  # dino: loaded with the head (its channels size it), given its decoder in prepare()

    # ------------------------------------------------------------------------------------------------ interface
    @property
    def needs_real_data(self) -> str | None:
        if self.real == "data":
            return "the discriminator's real samples (method.real: data, ADD); method.real: teacher uses the teacher's"
        return None

    @property
    def reads_data(self) -> bool:
        return self.real == "data"

    def roles(self) -> dict[str, RoleSpec]:
        extra = self.source.roles() if self.source is not None else {}
        return {"student": RoleSpec(init="teacher", prediction=self.student_prediction), **extra,
                "discriminator": RoleSpec(build=self._head)}

    def _head(self, nets: Nets) -> GANHead:
        """The conditioned heads, sized for the source's maps (``RoleSpec.build``)."""
        if self.source is None:
            from ..nets.dino import load_dino  # transformers' DINOv2, only when asked for
            # 224 px (16x16 patches of ViT-S/14) as ADD; the released config's 518 would cost 5x more per image
            size = None if self.dino_tiny else 224
            self.source = DinoSource(load_dino(self.dino_weights, tiny=self.dino_tiny, resolution=size))
        self.text_dim = text_dim(nets.teacher)
        cond_dim = TIME_DIM * self.source.noised + self.text_dim + (self.source.dino.hidden_size
                                                                    if self.image_condition else 0)
        return GANHead(self.source.channels(nets), hidden=self.head_width, cond_dim=cond_dim)

    def owner(self, phase: str) -> str | tuple[str, ...]:
        return "student" if phase == "student" else ("discriminator", *self.source.trained_roles)

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self._grid is None:
            times = tuple(float(t) for t in nets.student.schedule.grid(self.student_steps)[:-1])
            self._grid = StudentGrid(times, transition="renoise" if self.student_steps > 1 else "ddim")
        return {}

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        self.fakes.clear()
        return ()

    def student_grid(self) -> StudentGrid:
        if self._grid is None:
            raise RuntimeError("Adversarial.student_grid() before update_schedule(): the grid needs the schedule")
        return self._grid

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """The teacher's samples (``real: teacher``), and the DINO network on the device with the VAE decode."""
        self.update_schedule(0, nets)
        if isinstance(self.source, DinoSource):
            self.source = DinoSource(self.source.dino.to(ctx.device), ctx.decode)
        self.clean.prepare(nets.teacher, ctx, who="discriminator's reals", guidance=self.guidance_scale,
                           key="method.real: teacher")

    # ------------------------------------------------------------------------------------------------ pieces
    def reals(self, batch: Batch) -> tuple[torch.Tensor, dict | None]:
        """``B`` real samples and their conditions: the batch's data (with its own captions or labels when it has
        them), or teacher samples drawn from the cached set."""
        return self.clean.draw(batch)

    def generate(self, student, real: torch.Tensor, cond, gen, shared) -> torch.Tensor:
        """The student's x0 at a step ``k ~ U{0..K-1}`` (drawn from ``shared``: alike on every rank): from pure noise
        at step 0, else from ``real`` noised to ``t_k`` (or the student's own rollout). The graph reaches the student
        through that one step."""
        sch, grid = student.schedule, self.student_grid()
        b = real.shape[0]
        k = int(torch.randint(0, grid.steps, (1,), generator=shared or gen)) if grid.steps > 1 else 0
        noise = noise_like(real, gen)
        if k == 0:
            x = prior_noise(sch, noise, grid.times[0])
        elif self.student_input == "data":
            x = sch.add_noise(real, noise, torch.full((b,), grid.times[k], dtype=torch.float64, device=real.device))
        else:
            x = sample_student(student, noise, grid, cond=cond, steps=k, new_noise=lambda like: noise_like(like, gen))
        return student(x, torch.full((b,), grid.times[k], dtype=torch.float64, device=real.device), cond).x0

    def disc_time(self, schedule, b: int, gen) -> torch.Tensor:
        """LADD's re-noising times: logit-normal rectified-flow time, mapped to ``schedule`` by SNR and onto its
        timesteps."""
        u = self.disc_times.sample(b, RectifiedFlow(), gen).clamp(max=1 - 1e-6)
        return schedule.snap(map_time(u, RectifiedFlow(), schedule)[0]).clamp(min=schedule.t_min, max=1.0)

    def judge(self, nets: Nets, x: torch.Tensor, cond, gen, image_embed=None, *, grad_input: bool = False):
        """The heads' logits ``[B, L]`` for samples ``x`` (re-noised first for a noisy source), and the input the
        feature network saw (``grad_input``: made a leaf that takes a gradient, for R1)."""
        sch, b = nets.teacher.schedule, x.shape[0]
        t = self.disc_time(sch, b, gen) if self.source.noised else torch.full((b,), sch.t_min, dtype=torch.float64)
        seen = sch.add_noise(x, noise_like(x, gen), t.to(x.device)) if self.source.noised else x
        if grad_input:
            seen = seen.detach().requires_grad_(True)
        parts = [noise_features(sch, t).to(x.device)] if self.source.noised else []
        text = text_vector(cond, self.text_dim)
        parts += [text] if text is not None else []
        parts += [image_embed] if self.image_condition else []
        c = torch.cat(parts, 1) if parts else None
        return nets["discriminator"](self.source(nets, seen, t, cond), c), seen

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """ADD's image condition: the DINO CLS of the real images (no gradient)."""
        if not self.image_condition:
            return None
        with torch.no_grad():
            return self.source.embed(x)[1]

    def distill(self, nets: Nets, x: torch.Tensor, cond, gen) -> torch.Tensor:
        """ADD's score-distillation loss of the student's ``x`` (graph kept): ``c(t) |x - sg x0_teacher(x_t)|^2``."""
        sch, b = nets.teacher.schedule, x.shape[0]
        t = time_range(sch, 0.0, 1.0).sample(b, sch, gen)
        with torch.no_grad():
            x_t = sch.add_noise(x.detach(), noise_like(x, gen), t.to(x.device))
            target = guided(nets.teacher, x_t, t, cond, self.distill_guidance).x0.to(x.dtype)
        c = sch.alpha(t).to(x.device, x.dtype) if self.distill_weighting == "alpha" else torch.ones_like(t)
        return c.to(x.device, x.dtype) * regression_loss(x, target, "mse")

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        return self.student_loss(nets, batch) if phase == "student" else self.discriminator_loss(nets, batch)

    def student_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """The generator: the heads' verdict on its sample through the frozen features (+ ADD's distillation)."""
        gen = batch.generator
        real, cond = self.reals(batch)
        x = self.generate(nets.student, real, cond, gen, batch.shared)
        embed = self.image_embedding(real)
        self.fakes.put(x.detach(), cond, embed)
        logits, _ = self.judge(nets, x, cond, gen, embed)
        adv = gan_generator_loss(logits, self.loss)
        loss = self.gan_weight * adv
        logs = {"loss_adv": adv.detach().mean(), "d_fake": logits.detach().mean()}
        if self.distill_weight > 0:
            dist = self.distill(nets, x, cond, gen)
            loss = loss + self.distill_weight * dist
            logs["loss_distill"] = dist.detach().mean()
        logs["loss"] = loss.detach().mean()
        return LossOutput(loss, logs)

    def discriminator_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """The heads (and encoder): detached fakes against reals, each re-noised on its own (FastGen's default), + R1
        on the reals. The fakes are the student phase's of this step when it ran (as DMD's critic takes them: one
        generator pass per step), else a no-grad sample drawn here."""
        gen = batch.generator
        real, cond = self.reals(batch)
        embed = self.image_embedding(real)
        handed = self.fakes.take()
        if handed is not None:
            fake, fake_cond, fake_embed = handed
        else:
            with torch.no_grad():
                fake = self.generate(nets.student, real, cond, gen, batch.shared)
            fake_cond, fake_embed = cond, embed
        logits_fake, _ = self.judge(nets, fake, fake_cond, gen, fake_embed)
        with sdpa_kernel(SDPBackend.MATH) if self.r1_weight > 0 else contextlib.nullcontext():
            # R1 differentiates the heads' gradient: fused attention kernels have no double backward, the math one has
            logits_real, seen = self.judge(nets, real, cond, gen, embed, grad_input=self.r1_weight > 0)
        cls = gan_critic_loss(logits_fake, logits_real, self.loss)
        loss, logs = cls, {"loss_cls": cls.detach().mean(), "d_real": logits_real.detach().mean(),
                           "d_fake": logits_fake.detach().mean()}
        if self.r1_weight > 0:
            r1 = r1_penalty(logits_real, seen)
            loss = loss + self.r1_weight * r1
            logs["r1"] = r1.detach().mean()
        logs["loss"] = loss.detach().mean()
        return LossOutput(loss, logs)
