"""SiD: Score identity Distillation (Zhou et al., ICML 2024), SiD-LSG (Zhou et al., ICLR 2025) and SiDA (the
diffusion-GAN term of the official ``sida`` branch), METHODS.md §5 and §9.6.

Followed: mingyuanzhou/SiD ``training/sid_loss.py`` (``SID_EDMLoss.generator_loss``: the loss, the NaN-row filter,
the detached per-sample ``mean|x_g - y_r|`` clipped at 1e-5) and METHODS.md §5 for SiD-LSG's four guidance scales.
Per training step, in SiD's order (one fake-score update, then one generator update, each on a fresh generator
sample; ratios through ``train.update_every``):

    fake score:  denoising loss on detached generator samples (DMD's critic phase, ``DMD.fake_score_loss``), its
                 output guided by kappa_1, a share of null conditions (``cond_dropout``) when kappa_1 or kappa_2 != 1
    generator:   x_g = G(z)  (through ``DMD.generate``: one step, or backward simulation for multi-step students)
                 t ~ U[t_min, t_max],  x_t = a_t x_g + s_t n                 (the graph kept through x_g)
                 y_r = teacher(x_t) with CFG kappa_4,  y_f = fake(x_t) with CFG kappa_2   (x0, graphs kept)
                 L = (1 - alpha) |y_r - y_f|^2 w + (y_r - y_f) . (y_f - x_g) w,   w = 1 / sg(mean|x_g - y_r|)

The generator loss back-propagates *through the inputs* of the teacher and the fake score, whose parameters the loop
keeps frozen in this phase (``teacher_grad``: the teacher then gets gradient checkpointing and sharding like a trained
role); DMD's surrogate stops the gradient there instead, and porting SiD onto it would silently change the method
(``terms.sid_loss``; tests/test_sid.py proves the path). The gradient reaching the generator goes through
``nan_to_num(0, +-1e5)`` as the official code does to its parameters' gradients. SiDA adds DMD2's GAN term on the fake
score's bottleneck (``diffusion_gan.DiffusionGAN``, held by ``DMD``), reused rather than copied; its reals
are real data or, data-free, the teacher's cached ODE samples (``gan_real: teacher``).

Departures, written down: the fake score's loss is DMD's (uniform timesteps over the whole schedule; ``eps`` MSE by
default as SiD-LSG's SD code, without its ``snr / (snr + 1)`` weight for v-prediction teachers); the one-step
generator's input at ``init_time`` is pure noise told that time (DMD2's conditioning-timestep convention), where
SiD-LSG feeds ``sqrt(1 - abar_625) z`` (7% smaller on SD's betas); multi-step students train by DMD2's backward
simulation on the trailing grid (SiD-LSG's untrained re-noising of a one-step generator is ``grid_for(k)``, the
baseline to report beside them).
"""

from __future__ import annotations

import torch

from ..denoisers import guided
from ..sampling import StudentGrid
from ..types import noise_like
from .base import Batch, LossOutput, Method, Nets, PrepareContext, RoleSpec
from .dmd import DMD
from .terms import sid_loss, sid_partials


#: how the generator loss reaches the generator (``SiD.backward``)
BACKWARDS = ("joint", "sequential")


def _finite_gradient(grad: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5)


class SiD(Method):
    """SiD loss object (score identity distillation; SiD-LSG's guidance scales; SiDA's GAN term).

    Args:
        alpha: the weight of SiD's ``|y_r - y_f|^2`` term (``L`` above), in (0, 2]; 1.2 for EDM-type teachers, 1.0
            for SD (SiD-LSG).
        student_steps: the generator's steps (1: SiD; more: DMD2's backward simulation on the trailing grid).
        init_time: one-step only: the time the generator is told while fed pure noise (SiD-LSG: timestep 625 of
            1000, 0.625); ``None``: the start of the schedule.
        t_min, t_max: the generator loss's time range, a fraction of the time axis (SiD-LSG: timesteps 20 to 979).
        time_density: ``uniform`` over the teacher's timesteps or ``karras`` (``DMD``).
        guidance_real: kappa_4, the teacher's CFG scale inside the generator loss (our convention; 1: none).
        guidance_fake: kappa_2 = kappa_3, the fake score's CFG scale inside the generator loss.
        guidance_fake_train: kappa_1, the CFG scale of the fake score's output in its own denoising loss.
        cond_dropout: the share of the fake score's training rows on the null condition; ``None``: 0.1 when kappa_1
            or kappa_2 is not 1 (SiD-LSG), else 0.
        gan_weight, gan_critic_weight, gan_t_max: SiDA's GAN term on the fake score's bottleneck (``DMD``; 0: SiD).
        gan_real: its real samples: ``data`` (the run's data source) or ``teacher`` (the teacher's ODE samples, made
            once and cached with the pair settings below: data-free SiDA).
        fake_score_target: the fake score's denoising target (``eps``: SiD-LSG's; ``None``: its own output).
        backward_simulation: multi-step inputs from the student's own rollout (``DMD``).
        multistep_matching: multi-step only: ``mixture`` (DMD2's: every step's output judged at every noise level by
            one fake score of the mixture of steps) or ``phased`` (step ``k``'s output judged, by the generator loss
            and the fake score, only in its band of times ``(t_{k+1}, t_k]``; ``DMD``).
        student_prediction: the generator's output parameterisation; ``None`` keeps the teacher's.
        regression_warmup: one-step only: steps of regression on cached teacher ODE pairs before SiD starts (DMD2's
            ODE pretraining, ``DMD``: the generator then starts from the teacher's own noise-to-data map rather than
            its one-step point mass); num_pairs, pair_sampler, pair_steps, pair_cache: those pairs (``DMD``).
        backward: ``joint`` (one backward through the student, the teacher and the fake score together) or
            ``sequential``: the teacher's and then the fake score's input gradients are taken one at a time into a
            detached copy of the generator output (``terms.sid_partials`` gives the loss's partials from a no-grad
            fake-score pass), then the student's backward runs once; the same gradient, with one score network's
            graph alive at a time instead of both, for one more fake-score forward.
    """

    #: ``regression`` runs only during ``regression_warmup`` (``active_phases``)
    phases = ("fake_score", "student", "regression")
    teacher_grad = True

    def __init__(self, *, alpha: float = 1.2, student_steps: int = 1, init_time: float | None = None,
                 t_min: float = 0.02, t_max: float = 0.98, time_density: str = "uniform", guidance_real: float = 1.0,
                 guidance_fake: float = 1.0, guidance_fake_train: float = 1.0, cond_dropout: float | None = None,
                 gan_weight: float = 0.0, gan_critic_weight: float = 1e-2, gan_t_max: float = 1.0,
                 fake_score_target: str | None = "eps", backward_simulation: bool = True,
                 multistep_matching: str = "mixture",
                 student_prediction: str | None = None, backward: str = "joint", regression_warmup: int = 0,
                 num_pairs: int = 2048, pair_sampler: str = "ddim", pair_steps: int = 64,
                 pair_cache: str | None = None, gan_real: str = "data"):
        if backward not in BACKWARDS:
            raise ValueError(f"method.backward must be one of {BACKWARDS}, got {backward!r}")
        if not 0.0 < alpha <= 2.0:
            raise ValueError(f"method.alpha must be in (0, 2], got {alpha}")
        if init_time is not None and not 0.0 < init_time <= 1.0:
            raise ValueError(f"method.init_time must be in (0, 1] (a fraction of the time axis), got {init_time}")
        if guidance_fake < 1.0:
            raise ValueError(f"method.guidance_fake (kappa_2) must be >= 1 (1: no guidance), got {guidance_fake}")
        if cond_dropout is None:
            cond_dropout = 0.1 if guidance_fake_train != 1.0 or guidance_fake != 1.0 else 0.0
        self.alpha, self.guidance_real, self.guidance_fake = alpha, guidance_real, guidance_fake
        self.backward = backward
        self.dmd = DMD(student_steps=student_steps, conditioning_time=init_time,
                       backward_simulation=backward_simulation, multistep_matching=multistep_matching,
                       guidance_scale=guidance_real, t_min=t_min,
                       t_max=t_max, time_density=time_density, gan_weight=gan_weight,
                       gan_critic_weight=gan_critic_weight, gan_t_max=gan_t_max, fake_score_target=fake_score_target,
                       student_prediction=student_prediction, fake_guidance=guidance_fake_train,
                       cond_dropout=cond_dropout, regression_warmup=regression_warmup, num_pairs=num_pairs,
                       pair_sampler=pair_sampler, pair_steps=pair_steps, pair_cache=pair_cache, gan_real=gan_real)

    # ------------------------------------------------------------------------------------------------ interface
    @property
    def needs_real_data(self) -> str | None:
        return self.dmd.needs_real_data

    @property
    def reads_data(self) -> bool:
        return self.dmd.reads_data

    def roles(self) -> dict[str, RoleSpec]:
        return self.dmd.roles()

    def owner(self, phase: str) -> str | tuple[str, ...]:
        return self.dmd.owner(phase)

    def active_phases(self, step: int, update_every) -> tuple[str, ...]:
        """The regression warm-up's phases (``DMD.active_phases``), then SiD's order: fake score, generator."""
        if step < self.dmd.regression_warmup:
            return self.dmd.active_phases(step, update_every)
        return tuple(p for p in super().active_phases(step, update_every) if p != "regression")

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        self._schedule = nets.student.schedule
        return self.dmd.update_schedule(step, nets)

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        return self.dmd.begin_step(step, nets)

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        self.dmd.prepare(nets, ctx)

    def student_grid(self) -> StudentGrid:
        return self.dmd.student_grid()

    def grid_for(self, k: int) -> StudentGrid:
        """The trained grid, or for a one-step generator SiD-LSG's untrained multi-step baseline: ``k`` steps that
        re-noise the clean estimate to ``t_init (1 - i / k)`` (on a discrete teacher's timesteps)."""
        grid = self.student_grid()
        if k == grid.steps:
            return grid
        if grid.steps != 1 or k < 1:
            raise ValueError(f"a {grid.steps}-step SiD student samples its trained grid only, not {k} steps")
        t0 = torch.tensor(grid.times[0], dtype=torch.float64)
        times = tuple(float(self._schedule.snap(t0 * (1 - i / k))) for i in range(k))
        return StudentGrid(times=times, transition="renoise")

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch):
        if phase == "fake_score":
            return self.dmd.fake_score_loss(nets, batch)
        if phase == "regression":
            return self.dmd.warmup_loss(nets, batch)
        return self.generator_loss(nets, batch)

    def _draw(self, nets: Nets, batch: Batch):
        """The generator sample (with its graph), its step ``k``, and the loss's time and noise."""
        gen, b = batch.generator, batch.size
        x, k = self.dmd.generate(nets.student, batch.noise(), batch.cond, gen, data=batch.x0, shared=batch.shared)
        device = x.device
        if x.requires_grad:
            x.register_hook(_finite_gradient)
        t = self.dmd.times.draw(nets.teacher.schedule, b, self.dmd.t_min, self.dmd.t_max, gen, k).to(device)
        return x, k, t, noise_like(x, gen)

    def _real(self, nets: Nets, x_t, t, cond) -> torch.Tensor:
        """``y_r``: the teacher's x0 with CFG kappa_4."""
        return guided(nets.teacher, x_t, t, cond, self.guidance_real).x0

    def _fake(self, nets: Nets, x_t, t, cond) -> torch.Tensor:
        """``y_f``: the fake score's x0 with CFG kappa_2."""
        return guided(nets["fake_score"], x_t, t, cond, self.guidance_fake).x0

    def generator_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """SiD's generator update (module docstring), plus SiDA's GAN term."""
        cond, sch = batch.cond, nets.teacher.schedule
        if self.backward == "sequential":
            x, k, loss, logs = self._sequential(nets, batch)
        else:
            x, k, t, n = self._draw(nets, batch)
            x_t = sch.add_noise(x, n, t)  # with x's graph: the loss reaches the generator through both scores' inputs
            loss, logs = sid_loss(x, self._real(nets, x_t, t, cond), self._fake(nets, x_t, t, cond), self.alpha)
        logs["loss_sid"] = logs.pop("loss_value", loss.detach()).mean()
        if self.dmd.gan.weight > 0:
            gan = self.dmd.gan.generator_loss(x, nets, cond, batch.generator, k)
            loss = loss.mean() + self.dmd.gan.weight * gan.mean()
            logs["loss_gan"] = gan.detach().mean()
        logs["loss"] = loss.detach().mean()
        return LossOutput(loss, logs)

    def _sequential(self, nets: Nets, batch: Batch):
        """``backward="sequential"``: one network's graph alive at a time. The generator sample is drawn without a
        graph; the loss's gradient with respect to it, ``G = J_r^T dL/dy_r + J_f^T dL/dy_f + dL/dx``, is taken one
        score network at a time (``torch.autograd.grad`` into a detached copy: input gradients only, their weights are
        frozen in this phase); then the sample is drawn again, with its graph, from the same random states (the same
        sample), and the surrogate ``G . x`` carries the joint gradient into the student. Costs a no-grad generator
        pass and a no-grad fake-score pass more; dropout draws the same masks in each pair (``fork_rng``)."""
        sch, cond = nets.teacher.schedule, batch.cond
        states = [g.get_state() for g in (batch.generator, batch.shared) if g is not None]
        devices = [batch.x0.device] if batch.x0.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            x_value, _, t, n = self._draw(nets, batch)
        leaf = x_value.requires_grad_(True)
        x_t = sch.add_noise(leaf, n, t)
        real = self._real(nets, x_t, t, cond)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            fake_value = self._fake(nets, x_t, t, cond)
        g_real, g_fake, g_x, keep = sid_partials(leaf.detach(), real.detach(), fake_value, self.alpha)
        value, logs = sid_loss(leaf.detach(), real.detach(), fake_value, self.alpha)
        (grad,) = torch.autograd.grad(real, leaf, grad_outputs=g_real.to(real.dtype))
        del real
        fake = self._fake(nets, sch.add_noise(leaf, n, t), t, cond)  # x_t's graph went with the teacher's gradient
        grad = grad + torch.autograd.grad(fake, leaf, grad_outputs=g_fake.to(fake.dtype))[0] + g_x.to(grad.dtype)
        del fake
        for g, state in zip((g for g in (batch.generator, batch.shared) if g is not None), states):
            g.set_state(state)
        x, k, _, _ = self._draw(nets, batch)
        logs["loss_value"] = value
        return x, k, (grad.detach()[keep] * x[keep]).flatten(1).sum(1), logs
