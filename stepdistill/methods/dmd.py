"""DMD (Yin et al., CVPR 2024) and DMD2 (Yin et al., NeurIPS 2024): distribution matching distillation.

Followed: METHODS.md §4 and the DMD2 official code (tianweiy/DMD2 ``main/sd_guidance.py``
``compute_distribution_matching_loss``, ``compute_loss_fake``, ``compute_cls_logits``; ``main/sd_unified_model.py``
backward simulation; ``main/train_sd.py`` update order). One method serves both papers; ``dmd`` and ``dmd2`` differ
only in their defaults (``methods/__init__.py``: DMD (v1)'s regression, weight 0.25, is on for ``dmd``). It composes
the shared terms of ``terms.py``:

* the distribution-matching gradient (DMD Eq. 7; DMD2 Eq. 2, ``terms.dm_loss``) of a generator sample ``x`` at
  ``x_t = a_t x + s_t eps``, ``t ~ U[t_min, t_max]`` (DMD2: indices ``[0.02 N, 0.98 N]``): the teacher with CFG
  ``guidance_scale`` against the fake score at ``w = 1``, normalised by ``mean |x - x0_real|``. f-distill (Xu et al.
  2025) weights it by ``h(r)`` of the density ratio read from the GAN head (``terms.density_ratio_weight``);
* the fake score (critic) trained by denoising on detached generator samples, ``t`` over the whole schedule, in
  ``fake_score_target`` (default: its own output, the teacher's training loss; ``eps`` is DMD2's SD code);
* DMD (v1)'s regression on teacher ODE pairs made once and cached (``ode_regression.py``), one-step only; or DMD2's
  ODE pretraining of its one-step SDXL student, the same loss alone for ``regression_warmup`` steps first. Why the
  mixtures need one of them: docs/experiments/dmd2-mixtures.md;
* DMD2's GAN term (``diffusion_gan.py``): a head on the fake score's bottleneck on diffusion-noised inputs
  (``t_gan ~ U[0, gan_t_max)``), trained with the fake score in one phase; its reals are the run's data (DMD2) or,
  data-free, the teacher's ODE samples made once and cached (``gan_real: teacher``, as SiDA and LADD allow);
* DMD2's multi-step student on ``schedule.grid(K)`` (999/749/499/249 on 1000 steps) with "denoise then re-noise"
  transitions and backward simulation (``sampling.backward_simulation``); ``multistep_matching: phased`` (after Phased
  DMD, Fan et al. 2025) judges step ``k``'s output only in its band ``(t_{k+1}, t_k]`` (``bands.py``). Why: README,
  "Quality: DMD and DMD2";
* ``conditioning_time``: DMD2's one-step SDXL student is fed pure noise but told t = 399.

Phases: ``("student", "fake_score")`` in DMD2's order, ``("regression", "fake_score")`` during the warm-up; the
two-time-scale rule is ``train.update_every: {student: 5}``. When both phases run in one step, the critic trains on
the student phase's own samples, detached, as DMD2's ``train_one_step`` does; otherwise it draws a no-grad sample.
Smaller departures from the DMD2 code: the fake score and the head are clipped separately (DMD2 clips them jointly)
and LR warmup counts a role's own updates (DMD2 steps every scheduler every iteration).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..denoisers import guided
from ..pairs import CleanSamples
from ..sampling import StudentGrid, backward_simulation
from ..types import noise_like
from .bands import Bands, StepTimes
from .base import Batch, HandOver, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .diffusion_gan import DiffusionGAN, gan_head
from .ode_regression import ODERegression
from .terms import DIVERGENCES, TIME_DENSITIES, denoising_loss, density_ratio_weight, dm_loss, drop_cond


MULTISTEP_MATCHING = ("mixture", "phased")


class DMD(Method):
    """Distribution matching distillation (DMD and DMD2).

    Args:
        student_steps: steps of the student (1 for one-step; DMD2 uses 4 with backward simulation).
        conditioning_time: one-step only: the time the student is told while it is fed pure noise (DMD2 SDXL
            1-step: t=399 of 1000, i.e. 0.4); ``None`` uses the start of the schedule.
        backward_simulation: multi-step inputs come from the student's own no-grad rollout (DMD2 default);
            ``False`` noises real data to the sampled step instead (needs a real-data source).
        guidance_scale: CFG scale of the real score (DESIGN.md §2 convention, 1 = none). The fake score never
            uses CFG.
        t_min, t_max: range of the DM loss's time (DMD2 ``min/max_step_percent`` 0.02 / 0.98), a fraction of the
            time axis: its noise level depends on the schedule (README: the digits student needs 0).
        dm_weight: weight of the DM loss (DMD2 ``dm_loss_weight``).
        divergence: ``reverse_kl`` (DMD), ``forward_kl`` or ``js`` (f-distill; needs the GAN head).
        gan_weight, gan_critic_weight, gan_t_max: the GAN term's (``diffusion_gan.DiffusionGAN``; ``gan_weight`` 0
            disables it).
        gan_real: the GAN's real samples: ``data`` (the run's data source, DMD2) or ``teacher`` (``num_pairs``
            teacher ODE samples with CFG ``guidance_scale``, made once and cached: data-free).
        time_density: how the DM, fake-score and GAN times are drawn within their ranges: ``uniform`` over the
            teacher's timesteps (DMD2's SD code) or ``karras``, uniform over a 1000-point Karras grid (DMD2's
            ImageNet/EDM code; within the teacher's own sigma range and on its timesteps, ``KarrasGrid``), which
            puts far more draws at low noise.
        regression_weight: weight of DMD (v1)'s regression loss on teacher ODE pairs (paper: 0.25; 0 disables).
        regression_loss, num_pairs, pair_sampler, pair_steps, pair_cache, lpips_net, lpips_weights: the
            regression's distance (``pseudo_huber``, ``mse`` or the paper's ``lpips``) and its pair set
            (``ode_regression.ODERegression``), which ``gan_real: teacher`` shares.
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
        multistep_matching: multi-step only: ``mixture`` (DMD2: every step's output judged at every noise level by
            a fake score of the mixture of steps, whose minimum only asks the mixture to match: steps may err in
            opposite directions) or ``phased`` (step ``k``'s output judged only in its band of times
            ``(t_{k+1}, t_k]``, by the DM loss, the fake score and the GAN: enough, since step ``k+1`` sees step
            ``k``'s output only re-noised to ``t_{k+1}``). One-step students ignore it.
        fake_score_target: parameterisation of the fake score's denoising MSE (``x0 | eps | v``); ``None`` uses the
            fake score's own output (the teacher's training loss).
        regression_warmup: one-step only: steps of regression alone on the teacher ODE pairs before distribution
            matching starts, with a fresh student optimizer then (DMD2's ODE pretraining of its one-step SDXL student,
            a separate run; 0: none). The critic trains on the student's samples meanwhile.
        fake_guidance: CFG scale of the fake score's own output in its denoising loss (SiD-LSG's kappa_1; 1: none,
            DMD2's), with ``cond_dropout``, the share of rows trained on the null condition so that its unconditional
            output means something (SiD-LSG: 10% when kappa_1 or kappa_2 is not 1).
    """

    #: ``regression`` runs only during ``regression_warmup`` (``active_phases``)
    phases = ("student", "fake_score", "regression")

    def __init__(self, *, student_steps: int = 1, conditioning_time: float | None = None,
                 backward_simulation: bool = True, guidance_scale: float = 1.0, t_min: float = 0.02,
                 t_max: float = 0.98, dm_weight: float = 1.0, divergence: str = "reverse_kl",
                 gan_weight: float = 0.0, gan_critic_weight: float = 1e-2, gan_t_max: float = 1.0,
                 time_density: str = "uniform", regression_weight: float = 0.0,
                 regression_loss: str = "pseudo_huber", num_pairs: int = 2048,
                 pair_sampler: str = "ddim", pair_steps: int = 64, pair_cache: str | None = None,
                 lpips_net: str = "vgg", lpips_weights: str | None = None,
                 student_prediction: str | None = None, fake_score_target: str | None = None,
                 multistep_matching: str = "mixture", regression_warmup: int = 0, fake_guidance: float = 1.0,
                 cond_dropout: float = 0.0, gan_real: str = "data"):
        if student_steps < 1:
            raise ValueError(f"method.student_steps must be >= 1, got {student_steps}")
        if conditioning_time is not None and (student_steps != 1 or not 0.0 < conditioning_time <= 1.0):
            raise ValueError("method.conditioning_time is for one-step students (student_steps: 1) and must be in "
                             f"(0, 1], got {conditioning_time} with student_steps {student_steps}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"method.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        for key, value, allowed in (("divergence", divergence, DIVERGENCES),
                                    ("time_density", time_density, TIME_DENSITIES),
                                    ("multistep_matching", multistep_matching, MULTISTEP_MATCHING),
                                    ("fake_score_target", fake_score_target, (None, "x0", "eps", "v")),
                                    ("gan_real", gan_real, ("data", "teacher"))):
            if value not in allowed:
                raise ValueError(f"method.{key} must be one of {allowed}, got {value!r}")
        for key, value in (("regression_weight", regression_weight), ("regression_warmup", regression_warmup)):
            if value > 0 and student_steps != 1:
                raise ValueError(f"method.{key}: the ODE-pair regression is defined for one-step students "
                                 f"(DMD v1, DMD2's SDXL pretraining); got student_steps {student_steps}")
        if not isinstance(regression_warmup, int) or regression_warmup < 0:
            raise ValueError(f"method.regression_warmup must be a number of steps >= 0, got {regression_warmup!r}")
        weights = (gan_weight, gan_critic_weight, regression_weight, dm_weight)
        if min(weights) < 0 or min(guidance_scale, fake_guidance) < 1:
            raise ValueError("method: loss weights must be >= 0 and guidance scales >= 1")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"method.cond_dropout must be in [0, 1), got {cond_dropout}")
        if multistep_matching == "phased" and time_density != "uniform":
            raise ValueError("method.multistep_matching: phased draws times uniformly within each step's band; "
                             f"time_density {time_density!r} is not supported with it")
        self.student_steps, self.conditioning_time = student_steps, conditioning_time
        self.backward_simulation, self.guidance_scale = backward_simulation, guidance_scale
        self.t_min, self.t_max, self.dm_weight, self.divergence = t_min, t_max, dm_weight, divergence
        self.regression_weight, self.regression_warmup = regression_weight, regression_warmup
        self.ode = ODERegression(loss=regression_loss, num_pairs=num_pairs, sampler=pair_sampler, steps=pair_steps,
                                 cache=pair_cache, lpips_net=lpips_net, lpips_weights=lpips_weights)
        self.times = StepTimes(time_density)  # ``phased``: its bands are set with the grid
        # the GAN's reals take the regression's pair settings, so that the two share one cached set
        reals = CleanSamples(gan_real, num=num_pairs, sampler=pair_sampler, steps=pair_steps, cache=pair_cache)
        self.gan = DiffusionGAN(weight=gan_weight, critic_weight=gan_critic_weight, t_max=gan_t_max, reals=reals,
                                times=self.times)
        self.student_prediction, self.fake_score_target = student_prediction, fake_score_target
        self.fake_guidance, self.cond_dropout = fake_guidance, cond_dropout
        self.phased = multistep_matching == "phased" and student_steps > 1
        self.fakes = HandOver()  # the student phase's detached samples, for the critic of the same step
        self._grid: StudentGrid | None = None

    # ------------------------------------------------------------------------------------------------ interface
    @property
    def uses_head(self) -> bool:
        """The GAN head exists for the GAN term and for the density ratio of the f-divergence weighting."""
        return self.gan.weight > 0 or self.divergence != "reverse_kl"

    @property
    def needs_real_data(self) -> str | None:
        instead = "; method.gan_real: teacher uses the teacher's samples"
        if self.gan.reals.source == "data" and self.gan.weight > 0:
            return f"the GAN term (method.gan_weight > 0{instead})"
        if self.gan.reals.source == "data" and self.divergence != "reverse_kl":
            return f"the density ratio of method.divergence {self.divergence!r} (a GAN head{instead})"
        if self.student_steps > 1 and not self.backward_simulation:
            return "multi-step training without backward simulation"
        return None

    @property
    def reads_data(self) -> bool:
        return self.needs_real_data is not None

    def roles(self) -> dict[str, RoleSpec]:
        specs = {
            "student": RoleSpec(init="teacher", prediction=self.student_prediction),
            "fake_score": RoleSpec(init="teacher"),
        }
        if self.uses_head:
            specs["discriminator"] = RoleSpec(build=gan_head)
        return specs

    def owner(self, phase: str) -> str | tuple[str, ...]:
        if phase in ("student", "regression"):
            return "student"
        return ("fake_score", "discriminator") if self.uses_head else "fake_score"

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        if self._grid is None:
            sch = nets.student.schedule
            if self.conditioning_time is not None:
                t = torch.tensor(float(self.conditioning_time), dtype=torch.float64)
                times = (float(sch.snap(t)),)  # a discrete teacher's timestep: 0.4 -> 399 of 1000 (DMD2's SDXL)
            else:
                times = tuple(float(t) for t in sch.grid(self.student_steps)[:-1])
            self._grid = StudentGrid(times, transition="renoise" if self.student_steps > 1 else "ddim")
            self.times.bands = Bands.of_grid(times) if self.phased else None
            self._check_ranges(sch)
        return {}

    def active_phases(self, step: int, update_every: Mapping[str, int]) -> tuple[str, ...]:
        """During the regression warm-up its own ``regression`` phase steps the student every iteration (the
        two-time-scale rule is for the DM gradient, which is not read yet) and the critic tracks it; then
        ``train.update_every`` as usual."""
        if step < self.regression_warmup:
            return ("regression", "fake_score")
        return tuple(p for p in super().active_phases(step, update_every) if p != "regression")

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        self.fakes.clear()
        # distribution matching starts as DMD2's run after its ODE pretraining does: with a fresh student optimizer
        return ("student",) if step == self.regression_warmup > 0 else ()

    def student_grid(self) -> StudentGrid:
        if self._grid is None:
            raise RuntimeError("DMD.student_grid() before update_schedule(): the grid needs the schedule")
        return self._grid

    def _check_ranges(self, schedule) -> None:
        """Every time range must hold a time to draw: the GAN's at least one timestep, and with ``phased`` bands each
        range a time in every step's band."""
        ranges = {"DM loss (method.t_min/t_max)": (self.t_min, self.t_max)}
        if self.uses_head:
            ranges["GAN (method.gan_t_max)"] = (0.0, self.gan.t_max)
            if self.times.bands is None:
                self.gan.check_range(schedule, self.times.density)
        self.times.check(schedule, ranges)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """Make or load the teacher ODE pairs of the regression loss (DMD v1) and the GAN's teacher reals when used."""
        self.update_schedule(0, nets)
        if self.regression_weight > 0 or self.regression_warmup > 0:
            self.ode.prepare(nets.teacher, ctx, guidance=self.guidance_scale, key="method.regression_weight")
        reals = self.gan.reals
        if self.uses_head and reals.source == "teacher":
            if self.ode.pairs is not None:  # the regression's set, made with the same settings: held once
                reals.pairs, reals.cond = self.ode.pairs, self.ode.pair_cond
            else:
                reals.prepare(nets.teacher, ctx, who="the GAN's reals", guidance=self.guidance_scale,
                              key="method.gan_real")

    # ------------------------------------------------------------------------------------------------ pieces
    def generate(self, student, noise: torch.Tensor, cond, gen, *, data: torch.Tensor | None = None,
                 shared: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """A generator sample whose graph reaches the student through one step ``k`` only, and ``k``
        (``sampling.backward_simulation``; ``backward_simulation=False``: step ``k``'s input is ``data`` noised)."""
        pred, k = backward_simulation(student, noise, self.student_grid(), cond=cond, generator=gen, shared=shared,
                                      data=None if self.backward_simulation else data)
        return pred.x0, k

    def dm_term(self, x: torch.Tensor, nets: Nets, cond, gen, k: int = 0) -> tuple[torch.Tensor, dict]:
        """The DM loss of step ``k``'s output ``x`` (``terms.dm_loss``): the teacher with CFG and the fake score at a
        noised copy; with an f-divergence, the head's density ratio weights each sample."""
        sch, b = nets.teacher.schedule, x.shape[0]
        t = self.times.draw(sch, b, self.t_min, self.t_max, gen, k)
        with torch.no_grad():
            x_t = sch.add_noise(x.detach(), noise_like(x, gen), t.to(x.device))
            real = guided(nets.teacher, x_t, t, cond, self.guidance_scale).x0_64
            weight = None
            if self.divergence == "reverse_kl":
                fake = nets["fake_score"](x_t, t, cond).x0_64
            else:
                head = nets["discriminator"]
                pred, feats = nets["fake_score"].with_features(x_t, t, cond, head.layers)
                fake = pred.x0_64
                weight = density_ratio_weight(head(feats).sum(1), t, self.divergence, self.t_min, self.t_max)
        return dm_loss(x, real, fake, weight)

    def regression(self, nets: Nets, b: int, device, gen) -> torch.Tensor:
        """DMD (v1) regression on cached teacher ODE pairs: one student step from ``z`` against the teacher's ``y``."""
        return self.ode(nets.student, self.student_grid().times[0], b, device, gen)

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput | Iterator[LossOutput]:
        if phase == "regression":
            return self.warmup_loss(nets, batch)
        return self.student_loss(nets, batch) if phase == "student" else self.fake_score_loss(nets, batch)

    def warmup_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """The regression warm-up's student update: the ODE-pair regression alone."""
        reg = self.regression(nets, batch.size, batch.x0.device, batch.generator)
        return LossOutput(reg, {"loss_reg": reg.detach().mean(), "loss": reg.detach().mean()})

    def student_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """Generator update: DM loss (+ GAN generator loss, + regression)."""
        gen, cond, b = batch.generator, self._generation_cond(batch), batch.size
        x, k = self.generate(nets.student, batch.noise(), cond, gen, data=batch.x0, shared=batch.shared)
        self.fakes.put(x.detach(), k, cond)
        dm, logs = self.dm_term(x, nets, cond, gen, k)
        loss = self.dm_weight * dm
        logs["loss_dm"] = dm.detach().mean()
        if self.gan.weight > 0:
            gan = self.gan.generator_loss(x, nets, cond, gen, k)
            loss = loss + self.gan.weight * gan
            logs["loss_gan"] = gan.detach().mean()
        if self.regression_weight > 0:
            reg = self.regression(nets, b, x.device, gen)
            loss = loss + self.regression_weight * reg
            logs["loss_reg"] = reg.detach().mean()
        logs["loss"] = loss.detach().mean()
        return LossOutput(loss, logs)

    def fake_score_loss(self, nets: Nets, batch: Batch) -> Iterator[LossOutput]:
        """Critic update: denoising on detached generator samples (+ the GAN head's classification loss).

        With the head, the two terms go to backward one after the other (``Method.__call__``): first the GAN
        classification on the features of noised fakes and reals, then the denoising loss. Only one term's graph is
        alive at a time, which sets the critic step's peak memory (docs/experiments/gpu-h200.md); DMD2's own code sums
        them into one loss, and the gradients are the same. Every draw happens before either term, in the order of
        that sum. The samples are the student phase's of this step when it ran (DMD2's ``train_one_step``: one
        generator pass per iteration, ``.detach()`` for the guidance loss), else a no-grad sample drawn here."""
        gen, b = batch.generator, batch.size
        handed = self.fakes.take()
        if handed is not None:
            x, k, cond = handed
        else:
            cond = self._generation_cond(batch)
            with torch.no_grad():
                x, k = self.generate(nets.student, batch.noise(), cond, gen, data=batch.x0, shared=batch.shared)
        fake_net = nets["fake_score"]
        sch = fake_net.schedule
        t = self.times.draw(sch, b, 0.0, 1.0, gen, k)
        eps = noise_like(x, gen)
        x_t = sch.add_noise(x, eps, t.to(x.device))
        if self.uses_head:
            yield self.gan.critic_loss(x, k, cond, batch, nets, gen)
        pred = guided(fake_net, x_t, t, drop_cond(fake_net, cond, self.cond_dropout, gen), self.fake_guidance)
        loss = denoising_loss(pred, x, eps, self.fake_score_target or fake_net.prediction)
        yield LossOutput(loss, {"loss_denoise": loss.detach().mean(), "loss": loss.detach().mean()})

    def _generation_cond(self, batch: Batch):
        """The condition the student generates with: the batch's prompts, or, when multi-step training starts from
        noised real images instead of backward simulation, those images' own conditions (their captions)."""
        if self.student_steps > 1 and not self.backward_simulation:
            return batch.x0_cond
        return batch.cond
