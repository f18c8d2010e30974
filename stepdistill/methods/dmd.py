"""DMD (Yin et al., CVPR 2024) and DMD2 (Yin et al., NeurIPS 2024): distribution matching distillation.

Followed: METHODS.md §4 and the DMD2 official code (tianweiy/DMD2 ``main/sd_guidance.py``
``compute_distribution_matching_loss``, ``compute_loss_fake``, ``compute_cls_logits``; ``main/sd_unified_model.py``
backward simulation; ``main/train_sd.py`` update order). One loss object serves both papers; the recipe chooses:

* the distribution-matching (DM) gradient (DMD Eq. 7; DMD2 Eq. 2), for a generator sample ``x`` and
  ``t ~ U[t_min, t_max]`` (DMD2: indices ``[0.02 N, 0.98 N]``), ``x_t = a_t x + s_t eps``::

      grad = h(r) (x0_fake(x_t) - x0_real(x_t)) / mean_CHW |x - x0_real(x_t)|      (float64, no grad)
      L_DM = 0.5 |x - sg(x - grad)|^2      so that  dL_DM/dx = grad / numel

  The teacher (real score) runs with CFG ``w = guidance_scale``; the fake score always at ``w = 1``.
  ``h = 1`` is reverse KL (DMD). f-distill (Xu et al. 2025) replaces it by ``h(r) = f''(r) r^2`` of the density
  ratio ``r = p_real / p_fake = exp(D(x_t))`` read from the GAN head: forward KL ``h = r``, Jensen-Shannon
  ``h = r / (1 + r)``; ``r`` is clipped to [0.1, 20], normalised by its batch mean within 10 bins of ``t``, and ``h``
  by its batch mean (the two-stage normalisation as in NVIDIA FastGen's ``f_distill.py``; the paper body was not
  available to check).
* the fake score (critic), trained by denoising on detached generator samples, ``t`` uniform over the whole
  schedule (DMD2 ``compute_loss_fake``). The MSE is taken in ``fake_score_target``: by default the fake score's own
  output parameterisation, i.e. the teacher's training loss (v-MSE for the project's v-prediction teachers, which
  weights high-noise times by ``1/a_t^2`` relative to DMD2's eps-MSE on SD); ``eps`` reproduces DMD2 on any teacher;
* DMD (v1)'s regression loss ``regression_weight * d(G(z), y)`` on teacher ODE pairs ``(z, y)`` made once and
  cached (``pairs.py``); ``d`` is pseudo-Huber (``c = 0.00054 sqrt(dim)``, iCT) or MSE; one-step students only;
* DMD2's GAN term: a head on the fake score's bottleneck (``nets/gan_head.py``); inputs are diffusion-noised
  (``t_gan ~ U[0, gan_t_max)``); non-saturating losses ``softplus(-D(fake))`` for the generator,
  ``softplus(D(fake)) + softplus(-D(real))`` for the head (weight ``gan_critic_weight``), trained with the fake
  score in one phase;
* DMD2's multi-step student (``student_steps > 1``) on the grid ``schedule.grid(K)`` (DMD2's 999/749/499/249 on a
  1000-step schedule) with "denoise then re-noise" transitions and backward simulation: pick ``k ~ U{0..K-1}``,
  run the student without gradient from pure noise for ``k`` steps, take the gradient at step ``k`` only. The first
  step's input is always pure prior noise (DMD2's ``pure_noise_mask`` for schedules with non-zero terminal SNR).
  ``multistep_matching`` says at which noise levels step ``k``'s output ``x0_k`` is judged. ``mixture`` (DMD2): at
  all of them, by one fake score trained on the outputs of all steps, so the fake score models the *mixture*
  ``M = mean_k P_k`` and the DM loss minimises ``KL(M || p_real)``. Its minimum only asks the mixture to match:
  steps can err in opposite directions. On the digits teacher (README) the 4-step student's per-step mean pixel
  read -0.456 / -0.440 / -0.374 / -0.286 (teacher -0.390; their average -0.389) and the last step's FD was 5x the
  third's. ``phased`` (after Phased DMD, Fan et al. 2025, which trains a fake score per phase on its subinterval):
  ``x0_k`` is judged, by the DM loss, the fake score and the GAN, only at times in its band ``(t_{k+1}, t_k]``
  (the last step: ``[0, t_{K-1}]``). The bands are disjoint, so one time-conditioned fake score models each
  ``P_k`` on its own band with no mixture. Sufficient: step ``k+1`` sees ``x0_k`` re-noised to ``t_{k+1}``, so
  only the marginals of ``x0_k`` at ``t >= t_{k+1}`` reach the final sample, and matching at ``t_{k+1}`` gives
  the teacher's marginal there;
* DMD2's conditioning timestep for one-step students: ``conditioning_time`` (e.g. 0.4 for DMD2's t=399 SDXL
  student) feeds pure noise but tells the network that time.

Phases: ``("student", "fake_score")``, DMD2's order (generator then guidance in ``train_one_step``). The two-time-scale
rule is ``train.update_every: {student: 5}``. During the student phase the fake score and the head are frozen
(``requires_grad`` off, DMD2's fix; ECOSYSTEM.md §3.2 (b)), so the GAN generator loss reaches only the student.
The fake-score phase draws its own no-grad generator sample: one extra student forward on the steps where the
student also updates, instead of a cache shared between phases. Smaller departures from the DMD2 code: the fake
score and the head are clipped separately (DMD2 clips them jointly), LR warmup counts a role's own updates (DMD2
steps every scheduler every iteration), and the multi-step ``k`` is drawn per rank (DMD2 broadcasts one ``k``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..denoisers import TextConditioned, guided
from ..nets.lpips import LPIPS, load_lpips
from ..nets.lpips import NETS as LPIPS_NETS
from ..pairs import load_or_make_pairs, pair_spec
from ..parameterization import from_x0_eps
from ..sampling import TEACHER_SAMPLERS, StudentGrid, prior_noise
from ..schedules import KarrasGrid, UniformIndex, UniformTime, VPDiscrete
from .base import Batch, LossOutput, Nets, PrepareContext, RoleSpec


DIVERGENCES = ("reverse_kl", "forward_kl", "js")
REGRESSION_LOSSES = ("pseudo_huber", "mse", "lpips")
TIME_DENSITIES = ("uniform", "karras")
MULTISTEP_MATCHING = ("mixture", "phased")


def f_weight(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """``h(r) = f''(r) r^2`` of f-distill for the density ratio ``r = p_real / p_fake`` (reverse KL: 1)."""
    if divergence == "reverse_kl":
        return torch.ones_like(r)
    if divergence == "forward_kl":
        return r
    return r / (1.0 + r)  # Jensen-Shannon


@contextlib.contextmanager
def frozen(*modules):
    """Switch ``requires_grad`` off for ``modules`` and restore it after: gradients may flow *through* them to
    their inputs but never accumulate in their parameters. Their calls skip the DDP wrappers too: a grad-enabled
    forward through DDP expects gradients for the wrapped parameters, and when none come the reducer is left
    waiting, which a later accumulation micro-batch (``no_sync``) turns into "marked ready twice"."""
    params = [p for m in modules for p in m.trainable_parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(m.unwrapped())
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _time_density(schedule, lo: float, hi: float, kind: str = "uniform", *, closed: bool = True):
    """The part ``[lo, hi]`` of DMD2's time axis: its SD code draws integer timesteps in ``[int(lo N), int(hi N)]``
    (continuous schedules: ``t ~ U[lo, hi]``); its EDM code (``kind="karras"``) draws positions of a 1000-point
    Karras grid (sigma 0.002..80, or the teacher's narrower range; rho 7) the same way, mapped to this schedule's
    time by SNR (``KarrasGrid``). ``closed=False`` stops
    one index short of ``int(hi N)``, as both draw the GAN's noise level (``randint(0, diffusion_gan_max_timestep)``,
    ``sd_guidance.py`` / ``edm_guidance.py``)."""
    if kind == "karras":
        return KarrasGrid(num_points=1000, lo=lo, hi=hi, closed=closed)
    if isinstance(schedule, VPDiscrete):
        n = schedule.num_train_timesteps
        return UniformIndex(int(lo * n), min(int(hi * n) + closed, n))
    return UniformTime(lo, hi)


def _band_times(schedule, lo: float, hi: float, n: int, gen) -> torch.Tensor:
    """``n`` times uniform in ``(lo, hi]``; for ``VPDiscrete`` uniform over the teacher's timesteps in it (none if the
    band holds none), so adjacent bands of the ``phased`` multi-step matching share no timestep."""
    if isinstance(schedule, VPDiscrete):
        first = math.floor(float(schedule.model_time(lo)) + 1e-9) + 1  # the first index strictly above lo
        last = math.floor(float(schedule.model_time(hi)) + 1e-9)
        if last < max(first, 0):
            return torch.empty(0, dtype=torch.float64)
        return UniformIndex(max(first, 0), last + 1).sample(n, schedule, gen)
    return UniformTime(lo, hi).sample(n, schedule, gen)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.device).view(-1, *([1] * (like.ndim - 1)))


class DMD:
    """Distribution matching distillation loss object (DMD and DMD2).

    Args:
        student_steps: steps of the student (1 for one-step; DMD2 uses 4 with backward simulation).
        conditioning_time: one-step only: the time the student is told while it is fed pure noise (DMD2 SDXL
            1-step: t=399 of 1000, i.e. 0.4); ``None`` uses the start of the schedule.
        backward_simulation: multi-step inputs come from the student's own no-grad rollout (DMD2 default);
            ``False`` noises real data to the sampled step instead (needs a real-data source).
        guidance_scale: CFG scale of the real score (DESIGN.md §2 convention, 1 = none). The fake score never
            uses CFG.
        t_min, t_max: range of the DM loss's time (DMD2 ``min/max_step_percent`` 0.02 / 0.98). A fraction of the
            time axis, so its noise level depends on the schedule: 0.02 is sigma 0.003 on DMD2's ImageNet Karras grid
            but 0.079 on a 1024-step linear DDPM schedule, where the digits student needed ``t_min=0``.
        dm_weight: weight of the DM loss (DMD2 ``dm_loss_weight``).
        divergence: ``reverse_kl`` (DMD), ``forward_kl`` or ``js`` (f-distill; needs the GAN head).
        gan_weight: weight of the generator's GAN loss (DMD2 ``gen_cls_loss_weight``; 0 disables the GAN term).
        gan_critic_weight: weight of the head's classification loss in the fake-score phase
            (DMD2 ``guidance_cls_loss_weight``).
        gan_t_max: end of the diffusion-noised GAN inputs' times, itself left out (DMD2
            ``diffusion_gan_max_timestep``/N; 1 is the whole schedule).
        time_density: how the DM, fake-score and GAN times are drawn within their ranges: ``uniform`` over the
            teacher's timesteps (DMD2's SD code) or ``karras``, uniform over a 1000-point Karras grid (DMD2's
            ImageNet/EDM code; within the teacher's own sigma range and on its timesteps, ``KarrasGrid``), which
            puts far more draws at low noise (on the digits teacher's 1024-step linear schedule 26% of them below
            sigma 0.35, against 11% for uniform timesteps).
        regression_weight: weight of DMD (v1)'s regression loss on teacher ODE pairs (paper: 0.25; 0 disables).
        regression_loss: ``pseudo_huber`` (iCT's metric), ``mse`` or ``lpips`` (the paper's; pixel images only,
            from local weights: ``nets/lpips.py``).
        lpips_net: ``vgg`` or ``alex``, the LPIPS backbone.
        lpips_weights: a folder holding the backbone checkpoint and the LPIPS heads; ``None`` looks in torchvision's
            hub cache and the installed ``lpips`` package.
        num_pairs, pair_sampler, pair_steps: the pair set: how many, the teacher sampler and its steps.
        pair_cache: where the pairs are cached; ``None`` keys a file under ``$STEPDISTILL_CACHE/ode_pairs`` by the
            teacher's weights and these settings.
        student_prediction: the student's output parameterisation; ``None`` keeps the teacher's.
        multistep_matching: multi-step only: ``mixture`` (DMD2: every step's output judged at every noise level by
            a fake score of the mixture of steps) or ``phased`` (step ``k``'s output judged only in its band of
            times ``(t_{k+1}, t_k]``; see the module docstring). One-step students ignore it.
        fake_score_target: parameterisation of the fake score's denoising MSE (``x0 | eps | v``); ``None`` uses the
            fake score's own output (the teacher's training loss).
    """

    phases = ("student", "fake_score")

    def __init__(self, *, student_steps: int = 1, conditioning_time: float | None = None,
                 backward_simulation: bool = True, guidance_scale: float = 1.0, t_min: float = 0.02,
                 t_max: float = 0.98, dm_weight: float = 1.0, divergence: str = "reverse_kl",
                 gan_weight: float = 0.0, gan_critic_weight: float = 1e-2, gan_t_max: float = 1.0,
                 time_density: str = "uniform", regression_weight: float = 0.0,
                 regression_loss: str = "pseudo_huber", num_pairs: int = 2048,
                 pair_sampler: str = "ddim", pair_steps: int = 64, pair_cache: str | None = None,
                 lpips_net: str = "vgg", lpips_weights: str | None = None,
                 student_prediction: str | None = None, fake_score_target: str | None = None,
                 multistep_matching: str = "mixture"):
        if student_steps < 1:
            raise ValueError(f"method.student_steps must be >= 1, got {student_steps}")
        if conditioning_time is not None and (student_steps != 1 or not 0.0 < conditioning_time <= 1.0):
            raise ValueError("method.conditioning_time is for one-step students (student_steps: 1) and must be in "
                             f"(0, 1], got {conditioning_time} with student_steps {student_steps}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"method.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"method.divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"method.regression_loss must be one of {REGRESSION_LOSSES}, got {regression_loss!r}")
        if lpips_net not in LPIPS_NETS:
            raise ValueError(f"method.lpips_net must be one of {sorted(LPIPS_NETS)}, got {lpips_net!r}")
        if regression_weight > 0 and student_steps != 1:
            raise ValueError("method.regression_weight: the ODE-pair regression is defined for one-step students "
                             f"(DMD v1); got student_steps {student_steps}")
        if pair_sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"method.pair_sampler must be one of {sorted(TEACHER_SAMPLERS)}, got {pair_sampler!r}")
        if min(gan_weight, gan_critic_weight, regression_weight, dm_weight) < 0 or guidance_scale < 1.0:
            raise ValueError("method: loss weights must be >= 0 and guidance_scale >= 1")
        if fake_score_target not in (None, "x0", "eps", "v"):
            raise ValueError(f"method.fake_score_target must be x0, eps, v or null (the fake score's own output), "
                             f"got {fake_score_target!r}")
        if not 0.0 < gan_t_max <= 1.0:
            raise ValueError(f"method.gan_t_max must be in (0, 1], got {gan_t_max}")
        if time_density not in TIME_DENSITIES:
            raise ValueError(f"method.time_density must be one of {TIME_DENSITIES}, got {time_density!r}")
        if multistep_matching not in MULTISTEP_MATCHING:
            raise ValueError(f"method.multistep_matching must be one of {MULTISTEP_MATCHING}, "
                             f"got {multistep_matching!r}")
        if multistep_matching == "phased" and time_density != "uniform":
            raise ValueError("method.multistep_matching: phased draws times uniformly within each step's band; "
                             f"time_density {time_density!r} is not supported with it")
        self.student_steps, self.conditioning_time = student_steps, conditioning_time
        self.backward_simulation, self.guidance_scale = backward_simulation, guidance_scale
        self.t_min, self.t_max, self.dm_weight, self.divergence = t_min, t_max, dm_weight, divergence
        self.gan_weight, self.gan_critic_weight, self.gan_t_max = gan_weight, gan_critic_weight, gan_t_max
        self.regression_weight, self.regression_loss = regression_weight, regression_loss
        self.lpips_net, self.lpips_weights = lpips_net, lpips_weights
        self.lpips: LPIPS | None = None  # frozen, loaded in prepare(); not a role (never trained or checkpointed)
        self.num_pairs, self.pair_sampler, self.pair_steps = num_pairs, pair_sampler, pair_steps
        self.pair_cache, self.student_prediction = pair_cache, student_prediction
        self.fake_score_target, self.time_density = fake_score_target, time_density
        self.phased = multistep_matching == "phased" and student_steps > 1
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grid: StudentGrid | None = None

    # ------------------------------------------------------------------------------------------------ interface
    @property
    def uses_head(self) -> bool:
        """The GAN head exists for the GAN term and for the density ratio of the f-divergence weighting."""
        return self.gan_weight > 0 or self.divergence != "reverse_kl"

    @property
    def needs_real_data(self) -> str | None:
        if self.gan_weight > 0:
            return "the GAN term (method.gan_weight > 0)"
        if self.divergence != "reverse_kl":
            return f"the density ratio of method.divergence {self.divergence!r} (a GAN head)"
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
            specs["discriminator"] = RoleSpec(init="head", head_of="fake_score")
        return specs

    def owner(self, phase: str) -> str | tuple[str, ...]:
        if phase == "student":
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
            if self.phased:
                self._check_bands(sch)
            elif self.uses_head:
                self._check_gan_range(sch)
        return {}

    def _band(self, k: int, lo: float, hi: float) -> tuple[float, float]:
        """The part of ``[lo, hi]`` at which step ``k``'s output is judged: all of it (``mixture``), or its
        intersection with the step's band ``(t_{k+1}, t_k]`` (``phased``; the last step's band reaches 0)."""
        if not self.phased:
            return lo, hi
        times = self.student_grid().times
        return max(lo, times[k + 1] if k + 1 < len(times) else 0.0), min(hi, times[k])

    def _check_bands(self, schedule) -> None:
        ranges = {"DM loss (method.t_min/t_max)": (self.t_min, self.t_max)}
        if self.uses_head:
            ranges["GAN (method.gan_t_max)"] = (0.0, self.gan_t_max)
        for what, (lo, hi) in ranges.items():
            for k in range(self.student_steps):
                band = self._band(k, lo, hi)
                if band[0] >= band[1] or _band_times(schedule, *band, 1, None).numel() == 0:
                    raise ValueError(f"method.multistep_matching: phased: the {what} range [{lo}, {hi}] leaves no "
                                     f"time in step {k}'s band of the student grid {self.student_grid().times}")

    def student_grid(self) -> StudentGrid:
        if self._grid is None:
            raise RuntimeError("DMD.student_grid() before update_schedule(): the grid needs the schedule")
        return self._grid

    def _check_gan_range(self, schedule) -> None:
        """The GAN's half-open draw ``[0, int(gan_t_max N))`` must hold at least one timestep (grid position)."""
        n = 1000 if self.time_density == "karras" else getattr(schedule, "num_train_timesteps", None)
        if n is not None and int(self.gan_t_max * n) < 1:
            raise ValueError(f"method.gan_t_max: {self.gan_t_max} x {n} timesteps leaves no GAN noise level to draw "
                             f"(the draw stops short of int(gan_t_max N)); use at least {1 / n:g}")

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """Make or load the teacher ODE pairs of the regression loss (DMD v1)."""
        self.update_schedule(0, nets)
        if self.regression_weight == 0:
            return
        teacher = nets.teacher
        if getattr(teacher, "num_classes", None):
            raise ValueError("method.regression_weight: ODE pairs for class-conditional teachers are not supported "
                             "yet")
        if isinstance(getattr(teacher, "inner", teacher), TextConditioned):  # a LoRA base wraps the teacher's own
            raise ValueError("method.regression_weight: ODE pairs of text-conditioned teachers are not supported yet "
                             "(each pair would need its prompt); set method.regression_weight: 0, as DMD2 does")
        spec = pair_spec(teacher, sample_shape=ctx.sample_shape, num_pairs=self.num_pairs,
                         sampler=self.pair_sampler, steps=self.pair_steps, seed=0)
        path = Path(self.pair_cache) if self.pair_cache else ctx.cache_dir / "ode_pairs" / f"{spec['teacher']}-" \
            f"{self.pair_sampler}{self.pair_steps}-n{self.num_pairs}.safetensors"
        self.pairs = load_or_make_pairs(teacher, spec, path, device=ctx.device, is_main_process=ctx.is_main_process,
                                        wait_for_everyone=ctx.wait_for_everyone)
        if self.regression_loss == "lpips":
            shape = ctx.sample_shape
            if len(shape) != 3 or shape[0] not in (1, 3):
                raise ValueError(f"method.regression_loss: lpips compares pixel images with 1 or 3 channels; this "
                                 f"teacher's samples have shape {list(shape)} (use pseudo_huber)")
            try:
                self.lpips = load_lpips(self.lpips_net, self.lpips_weights).to(ctx.device)
            except FileNotFoundError as err:
                raise ValueError(f"method.regression_loss: {err}") from None

    # ------------------------------------------------------------------------------------------------ pieces
    def _times(self, schedule, n: int, lo: float, hi: float, gen, k: int = 0, *, closed: bool = True) -> torch.Tensor:
        """``n`` times in ``[lo, hi]`` (``closed=False``: ``hi`` left out, ``_time_density``) at which step ``k``'s
        output is judged (``_band``)."""
        if self.phased:
            return _band_times(schedule, *self._band(k, lo, hi), n, gen)
        return _time_density(schedule, lo, hi, self.time_density, closed=closed).sample(n, schedule, gen)

    def generate(self, student, noise: torch.Tensor, cond, gen, *, data: torch.Tensor | None = None,
                 shared: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """A generator sample ``x`` whose graph reaches the student through one step only (backward simulation),
        and that step ``k``.

        Step ``k ~ U{0..K-1}`` is drawn per batch, from ``shared`` (the same on every rank, so sharded ranks make the
        same number of student calls) when given. Steps before ``k`` run without gradient from pure noise (or, with
        ``backward_simulation=False``, ``data`` noised to step ``k``); the student's x0 at step ``k`` is returned.
        """
        sch, grid = student.schedule, self.student_grid()
        times = torch.tensor(grid.times, dtype=torch.float64, device=noise.device)
        b = noise.shape[0]
        x = prior_noise(sch, noise, grid.times[0])
        k = int(torch.randint(0, grid.steps, (1,), generator=shared or gen)) if grid.steps > 1 else 0

        def fresh_noise():
            return torch.randn(noise.shape, generator=gen, dtype=noise.dtype).to(noise.device)

        if k > 0 and self.backward_simulation:
            with torch.no_grad():
                for j in range(k):
                    x0 = student(x, times[j].expand(b), cond).x0
                    x = sch.add_noise(x0, fresh_noise(), times[j + 1].expand(b))
        elif k > 0:
            x = sch.add_noise(data, fresh_noise(), times[k].expand(b))
        return student(x, times[k].expand(b), cond).x0, k

    def _ratio_weight(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f-distill's weight ``h(r)`` with its two-stage normalisation (per-t-bin ratio, then batch-mean h)."""
        r = logits.double().clamp(-10, 10).exp().clamp(0.1, 20.0)
        bins = ((t - self.t_min) / max(self.t_max - self.t_min, 1e-12) * 10).long().clamp(0, 9).to(r.device)
        sums = torch.zeros(10, dtype=r.dtype, device=r.device).index_add_(0, bins, r)
        counts = torch.zeros(10, dtype=r.dtype, device=r.device).index_add_(0, bins, torch.ones_like(r))
        r = r / (sums / counts.clamp(min=1))[bins]
        h = f_weight(self.divergence, r)
        return h / (h.mean() + 1e-6)

    def dm_loss(self, x: torch.Tensor, nets: Nets, cond, gen, k: int = 0) -> tuple[torch.Tensor, dict]:
        """Per-sample DM loss and logs for step ``k``'s output ``x``; gradient only through ``x``
        (DMD2 ``compute_distribution_matching_loss``)."""
        sch, b = nets.teacher.schedule, x.shape[0]
        t = self._times(sch, b, self.t_min, self.t_max, gen, k)
        with torch.no_grad():
            eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            x_t = sch.add_noise(x.detach(), eps, t.to(x.device))
            real = guided(nets.teacher, x_t, t, cond, self.guidance_scale).x0_64
            fake_net = nets["fake_score"]
            if self.divergence == "reverse_kl":
                fake, h = fake_net(x_t, t, cond).x0_64, None
            else:
                pred, feats = fake_net.with_features(x_t, t, cond)
                fake, h = pred.x0_64, self._ratio_weight(nets["discriminator"](feats), t)
            dims = tuple(range(1, x.ndim))
            norm = (x.detach().double() - real).abs().mean(dims, keepdim=True)
            grad = (fake - real) / norm
            if h is not None:
                grad = grad * _expand(h, grad)
            grad = torch.nan_to_num(grad).to(x.dtype)
        loss = 0.5 * ((x - (x - grad).detach()) ** 2).mean(dims)
        logs = {"dm_grad_norm": grad.detach().flatten(1).norm(dim=1).mean()}
        return loss, logs

    def _gan_inputs(self, x: torch.Tensor, schedule, gen, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._times(schedule, x.shape[0], 0.0, self.gan_t_max, gen, k, closed=False)
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return schedule.add_noise(x, eps, t.to(x.device)), t

    def regression(self, nets: Nets, b: int, device, gen) -> torch.Tensor:
        """DMD (v1) regression on cached teacher ODE pairs: one student step from ``z`` against the teacher's ``y``."""
        noise, target = self.pairs
        idx = torch.randint(0, noise.shape[0], (b,), generator=gen)
        z, y = noise[idx].to(device), target[idx].to(device)
        sch, t0 = nets.student.schedule, self.student_grid().times[0]
        x = nets.student(prior_noise(sch, z, t0), torch.full((b,), t0, dtype=torch.float64), None).x0
        if self.regression_loss == "lpips":
            return self.lpips(x.float(), y.float())
        sq = ((x - y) ** 2).flatten(1).sum(1)
        if self.regression_loss == "mse":
            return sq / x[0].numel()
        c = 0.00054 * math.sqrt(x[0].numel())  # iCT's pseudo-Huber constant (Song & Dhariwal 2023, §3.3)
        return (sq + c * c).sqrt() - c

    # ------------------------------------------------------------------------------------------------ phases
    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput | Iterator[LossOutput]:
        return self.student_loss(nets, batch) if phase == "student" else self.fake_score_loss(nets, batch)

    def student_loss(self, nets: Nets, batch: Batch) -> LossOutput:
        """Generator update: DM loss (+ GAN generator loss, + regression). Fake score and head are frozen."""
        gen, cond, b = batch.generator, self._generation_cond(batch), batch.size
        shape, device = self._shape_device(nets, batch)
        noise = torch.randn((b, *shape), generator=gen).to(device)
        x, k = self.generate(nets.student, noise, cond, gen, data=batch.x0, shared=batch.shared)
        dm, logs = self.dm_loss(x, nets, cond, gen, k)
        loss = self.dm_weight * dm
        logs["loss_dm"] = dm.detach().mean()
        if self.gan_weight > 0:
            heads = [nets["fake_score"], nets["discriminator"]]
            with frozen(*heads):
                x_gan, t_gan = self._gan_inputs(x, nets.teacher.schedule, gen, k)
                feats = nets["fake_score"].features(x_gan, t_gan, cond)
                gan = F.softplus(-nets["discriminator"](feats))
            loss = loss + self.gan_weight * gan
            logs["loss_gan"] = gan.detach().mean()
        if self.regression_weight > 0:
            reg = self.regression(nets, b, device, gen)
            loss = loss + self.regression_weight * reg
            logs["loss_reg"] = reg.detach().mean()
        logs["loss"] = loss.detach().mean()
        return LossOutput(loss, logs)

    def fake_score_loss(self, nets: Nets, batch: Batch) -> Iterator[LossOutput]:
        """Critic update: denoising on detached generator samples (+ the GAN head's classification loss).

        With the head, the two terms go to backward one after the other (``Method.__call__``): first the GAN
        classification on bottleneck features of noised fakes and reals, then the denoising loss, whose whole
        forward through the fake score's (DDP) wrapper has to come last. Only one term's graph is alive at a time,
        which sets the critic step's peak memory (docs/experiments/gpu-h200.md); DMD2's own code sums them into one
        loss, and the gradients are the same. Every draw happens before either term, in the order of that sum."""
        gen, cond, b = batch.generator, self._generation_cond(batch), batch.size
        shape, device = self._shape_device(nets, batch)
        with torch.no_grad():
            noise = torch.randn((b, *shape), generator=gen).to(device)
            x, k = self.generate(nets.student, noise, cond, gen, data=batch.x0, shared=batch.shared)
        fake_net = nets["fake_score"]
        sch = fake_net.schedule
        t = self._times(sch, b, 0.0, 1.0, gen, k)
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(device)
        x_t = sch.add_noise(x, eps, t.to(device))
        if self.uses_head:
            # The GAN inputs [noised fakes, noised reals] only go as far as the bottleneck (``Denoiser.features``).
            x_fake, t_fake = self._gan_inputs(x, sch, gen, k)
            x_real, t_real = self._gan_inputs(batch.x0, sch, gen, k)  # reals noised in the same band
            # each real is classified with its own condition (DMD2: the image's caption), each fake with its prompt
            real_cond = batch.x0_cond
            cond2 = None if cond is None else {k: torch.cat([v, real_cond[k]]) for k, v in cond.items()}
            feats = fake_net.features(torch.cat([x_fake, x_real]), torch.cat([t_fake, t_real]), cond2)
            logits_fake, logits_real = nets["discriminator"](feats).chunk(2)
            cls = F.softplus(logits_fake) + F.softplus(-logits_real)
            gan = self.gan_critic_weight * cls
            yield LossOutput(gan, {"loss_cls": cls.detach().mean(), "d_real": logits_real.detach().mean(),
                                   "d_fake": logits_fake.detach().mean(), "loss": gan.detach().mean()})
        pred = fake_net(x_t, t, cond)
        kind = self.fake_score_target or fake_net.prediction
        target = from_x0_eps(kind, x.double(), eps.double(), pred.coeffs)
        dims = tuple(range(1, x.ndim))
        loss = ((pred.get(kind, exact=True) - target) ** 2).mean(dims).float()
        yield LossOutput(loss, {"loss_denoise": loss.detach().mean(), "loss": loss.detach().mean()})

    def _generation_cond(self, batch: Batch):
        """The condition the student generates with: the batch's prompts, or, when multi-step training starts from
        noised real images instead of backward simulation, those images' own conditions (their captions)."""
        if self.student_steps > 1 and not self.backward_simulation:
            return batch.x0_cond
        return batch.cond

    @staticmethod
    def _shape_device(nets: Nets, batch: Batch):
        """Sample shape and device from the batch (data-free runs get the ``gaussian`` stand-in batch)."""
        if batch.x0 is None:
            raise ValueError("DMD needs batches with x0 for the sample shape")
        return tuple(batch.x0.shape[1:]), batch.x0.device
