"""Loss terms that several methods share, each once (in the manner of EDM's ``training/loss.py``): methods compose
them with their own roles, times and weights.

* ``dm_loss``: the distribution-matching gradient of DMD / DMD2 (and the per-phase DM loss of phased DMD, rCM's DMD
  part) as a loss whose gradient with respect to the sample is exactly that gradient;
* ``sid_loss``: SiD's generator loss, through the inputs of the teacher and the fake score;
* ``density_ratio_weight``: f-distill's per-sample weight of the DM gradient from a discriminator's logits;
* ``denoising_loss``: the score-matching loss that trains a fake score (critic) on generator samples;
* ``subinterval_target``: the denoising target of a critic whose "data" are noisy intermediate samples ``x_s``
  (phased DMD's subinterval score matching); at ``s = 0`` the ordinary one;
* ``gan_generator_loss`` / ``gan_critic_loss`` / ``r1_penalty``: the GAN terms, non-saturating (DMD2, SiDA) or hinge
  (ADD, LADD), on logits of one or several discriminator heads, and the R1 penalty;
* ``regression_loss``: a distance between a student output and a teacher target (DMD v1's ODE-pair regression;
  consistency targets), pseudo-Huber, MSE or LPIPS;
* ``time_range`` / ``band_times``: DMD2's time axis, a part of the schedule drawn uniformly over a discrete teacher's
  timesteps (or a Karras grid);
* ``drop_cond``: a share of a batch's conditions replaced by the null condition (classifier-free training);
* ``GuidanceRange``: CFG inside the teacher's target at a per-sample scale ``w ~ U[w_min, w_max]`` (guided PD, LCM,
  PCM, TCD), and the w input of a student that takes it.

Each term takes and returns tensors; the network calls belong to the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parameterization import Prediction, from_x0_eps
from ..schedules import KarrasGrid, UniformIndex, UniformTime, VPDiscrete, _bcast
from ..transitions import noise_travel


DIVERGENCES = ("reverse_kl", "forward_kl", "js")
DISTANCES = ("pseudo_huber", "huber", "mse", "l2", "lpips")
TIME_DENSITIES = ("uniform", "karras")


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


# ---------------------------------------------------------------------------------------------------------------
# Distribution matching.


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DMD's distribution-matching loss for generator samples ``x`` (DMD, Yin et al. 2024, Eq. 7; DMD2 Eq. 2; DMD2's
    ``compute_distribution_matching_loss``).

    ``real_x0`` / ``fake_x0`` are the teacher's (with CFG) and the fake score's x0 predictions at a noised copy of
    ``x``, in float64 and without gradient. The gradient with respect to ``x`` is ``h (fake - real) / mean|x - real|``
    per sample (``h``: ``weight``, f-distill's, or 1), divided by the number of elements, exactly: the loss is
    ``0.5 |x - sg(x - grad)|^2`` averaged over the sample's elements. Returns the per-sample loss ``[B]`` and logs.
    """
    with torch.no_grad():
        norm = (x.detach().double() - real_x0).abs().mean(_dims(x), keepdim=True)
        grad = (fake_x0 - real_x0) / norm
        if weight is not None:
            grad = grad * weight.to(grad.device).view(-1, *([1] * (x.ndim - 1)))
        grad = torch.nan_to_num(grad).to(x.dtype)
    loss = 0.5 * ((x - (x - grad).detach()) ** 2).mean(_dims(x))
    return loss, {"dm_grad_norm": grad.detach().flatten(1).norm(dim=1).mean()}


def _sid_rows(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows SiD keeps (no NaN in ``x``, ``y_r`` or ``y_f``) and its detached weight's denominator
    ``mean|x - y_r|`` per row, in float32 and clipped at 1e-5 as the official code computes it."""
    keep = ~(torch.isnan(x).flatten(1).any(1) | torch.isnan(real_x0).flatten(1).any(1) |
             torch.isnan(fake_x0).flatten(1).any(1))
    with torch.no_grad():
        norm = (x.detach() - real_x0.detach()).abs().float().mean(_dims(x), keepdim=True).clip(min=1e-5)
    return keep, norm


def sid_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict]:
    """SiD's generator loss (Zhou et al. 2024, Eq. 9 / the official ``SID_EDMLoss.generator_loss``) per sample:

        L = (y_r - y_f) . ((y_r - x) - alpha (y_r - y_f)) / sg(mean|x - y_r|)
          = (1 - alpha) |y_r - y_f|^2 w + (y_r - y_f) . (y_f - x) w

    where ``y_r`` / ``y_f`` are the teacher's and the fake score's x0 at a noised copy of ``x``, *with their graphs*:
    unlike ``dm_loss``, the gradient flows through both networks' inputs (their parameters frozen in the phase), which
    is what separates SiD from DMD's stop-gradient surrogate (METHODS.md §9.6). Rows with a NaN in ``x``, ``y_r`` or
    ``y_f`` are dropped, as the official code does. The product is averaged over a sample's elements (the official
    code sums them; the mean puts it on ``dm_loss``'s scale, and Adam does not see the constant). Returns the loss of
    the kept rows and logs (``nan_rows``: how many were dropped)."""
    keep, norm = _sid_rows(x, real_x0, fake_x0)
    x, real_x0, fake_x0, norm = x[keep], real_x0[keep], fake_x0[keep], norm[keep]
    gap = real_x0 - fake_x0
    loss = (gap * ((real_x0 - x) - alpha * gap) / norm).mean(_dims(x))
    return loss, {"nan_rows": (~keep).sum().float(), "score_gap": gap.detach().square().mean()}


def sid_partials(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial derivatives of ``sid_loss``'s per-sample value with respect to ``y_r``, ``y_f`` and ``x`` (its
    direct appearance), with ``u = y_r - x``, ``d = y_r - y_f``, ``w = mean|x - y_r|`` held fixed, ``D`` elements:

        dL/dy_r = (u + (1 - 2 alpha) d) / (D w),   dL/dy_f = (2 alpha d - u) / (D w),   dL/dx = -d / (D w)

    and the mask of rows ``sid_loss`` keeps (the dropped rows' partials are 0). What lets SiD back-propagate its two
    score networks one after the other (``SiD(backward="sequential")``), all without a graph."""
    keep, norm = _sid_rows(x, real_x0, fake_x0)
    shape = (-1, *([1] * (x.ndim - 1)))
    scale = torch.where(keep.view(shape), 1.0 / (norm * x[0].numel()), torch.zeros_like(norm))
    u, d = torch.nan_to_num(real_x0 - x), torch.nan_to_num(real_x0 - fake_x0)
    return (u + (1 - 2 * alpha) * d) * scale, (2 * alpha * d - u) * scale, -d * scale, keep


def f_weight(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """``h(r) = f''(r) r^2`` of f-distill for the density ratio ``r = p_real / p_fake`` (reverse KL: 1)."""
    if divergence == "reverse_kl":
        return torch.ones_like(r)
    if divergence == "forward_kl":
        return r
    return r / (1.0 + r)  # Jensen-Shannon


def density_ratio_weight(logits: torch.Tensor, t: torch.Tensor, divergence: str, t_min: float,
                         t_max: float) -> torch.Tensor:
    """f-distill's weight ``h(r)`` (Xu et al. 2025) of each sample's DM gradient from the discriminator's logit
    ``D = log r``: ``r`` clipped to [0.1, 20] and normalised by its batch mean within 10 bins of ``t`` over
    ``[t_min, t_max]``, then ``h`` by its batch mean (the two-stage normalisation of NVIDIA FastGen's
    ``f_distill.py``; the paper body was not available to check)."""
    r = logits.double().clamp(-10, 10).exp().clamp(0.1, 20.0)
    bins = ((t - t_min) / max(t_max - t_min, 1e-12) * 10).long().clamp(0, 9).to(r.device)
    sums = torch.zeros(10, dtype=r.dtype, device=r.device).index_add_(0, bins, r)
    counts = torch.zeros(10, dtype=r.dtype, device=r.device).index_add_(0, bins, torch.ones_like(r))
    r = r / (sums / counts.clamp(min=1))[bins]
    h = f_weight(divergence, r)
    return h / (h.mean() + 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Score matching.


def denoising_loss(pred: Prediction, x0: torch.Tensor, eps: torch.Tensor, kind: str) -> torch.Tensor:
    """The denoising score-matching loss of a prediction made at ``x_t = a x0 + s eps``: the mean squared error of its
    ``kind`` parameterisation (``x0 | eps | v | flow_match``) against the one ``(x0, eps)`` give, per sample, in
    float64 (DMD2's ``compute_loss_fake``: eps on SD; the network's own output is the teacher's training loss)."""
    target = from_x0_eps(kind, x0.double(), eps.double(), pred.coeffs)
    return ((pred.get(kind, exact=True) - target) ** 2).mean(_dims(x0)).float()


def subinterval_target(x_s: torch.Tensor, schedule, s, t: torch.Tensor,
                       noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subinterval score matching (Phased DMD, Fan et al. 2025; METHODS.md §6): ``x_s`` are samples at time ``s``
    (a phase's end, not clean data), noised forward to ``t > s`` by the kernel ``q(x_t | x_s)`` (``noise_travel``):

        x_t = (a_t / a_s) x_s + beta n,   beta^2 = s_t^2 - (a_t / a_s)^2 s_s^2,   grad log q(x_t | x_s) = -n / beta

    By Vincent's identity the network whose score regresses onto ``-n / beta`` learns the score of the marginal of
    ``x_s``'s distribution at ``t``. Read in the network's (global) parameterisation, score = ``-eps / s_t``:

        eps* = s_t n / beta,   x0* = (x_t - s_t eps*) / a_t

    which is ``(x_s, n)`` at ``s = 0`` (ordinary denoising) and, for a rectified flow (a = 1 - sigma, s = sigma), gives
    the official code's ``phased_velocity_target`` as ``eps* - x0*``. Any schedule works: the pair is consistent
    (``x_t = a_t x0* + s_t eps*``), so ``denoising_loss(pred, x0*, eps*, kind)`` takes it in any parameterisation.
    ``s`` is a scalar or ``[B]``; returns ``(x_t, x0*, eps*)`` in float64."""
    x_s, noise = x_s.double(), noise.double()
    x_t = noise_travel(x_s, schedule, s, t, noise)
    a_t, s_t = _bcast(schedule.alpha(t), x_s), _bcast(schedule.sigma(t), x_s)
    a_s, s_s = _bcast(schedule.alpha(s), x_s), _bcast(schedule.sigma(s), x_s)
    beta = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).sqrt()
    eps = s_t * noise / beta
    return x_t, (x_t - s_t * eps) / a_t, eps


# ---------------------------------------------------------------------------------------------------------------
# GAN.


GAN_LOSSES = ("ns", "hinge")


def gan_generator_loss(logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """The generator's GAN loss on the logits of its samples, summed over heads: ``[B, L]`` -> ``[B]``.

    ``ns``: non-saturating ``softplus(-D(fake))`` (DMD2 ``gen_cls_loss``; FastGen's LADD). ``hinge``: ``-D(fake)``
    (ADD Eq. 3's ``L_adv^G``, LADD, StyleGAN-T)."""
    if kind == "hinge":
        return -logits.sum(1)
    return F.softplus(-logits).sum(1)


def gan_critic_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """The discriminator's loss, summed over heads: ``[B, L]`` logits each -> ``[B]``.

    ``ns``: ``softplus(D(fake)) + softplus(-D(real))`` (DMD2 ``guidance_cls_loss``). ``hinge``:
    ``max(0, 1 + D(fake)) + max(0, 1 - D(real))`` (ADD Eq. 4, LADD)."""
    if kind == "hinge":
        return (F.relu(1.0 + logits_fake) + F.relu(1.0 - logits_real)).sum(1)
    return (F.softplus(logits_fake) + F.softplus(-logits_real)).sum(1)


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, Eq. 9; ADD's ``gamma R1``): the squared norm of the discriminator's gradient with
    respect to its real input, ``|d sum_k D_k(x) / dx|^2`` per sample, with the graph kept so that the penalty
    trains the heads. ``x_real`` must require gradient and ``logits_real`` ``[B, L]`` must depend on it."""
    if not x_real.requires_grad:
        raise ValueError("r1_penalty: the real input takes no gradient, so R1 has nothing to penalise")
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return grad.flatten(1).square().sum(1)


# ---------------------------------------------------------------------------------------------------------------
# Regression.


def regression_loss(x: torch.Tensor, y: torch.Tensor, distance: str, lpips=None, *,
                    huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample distance of ``x`` to the target ``y``: ``pseudo_huber`` (``sqrt(|x - y|^2 + c^2) - c`` of the whole
    sample with iCT's ``c = 0.00054 sqrt(dim)``, Song & Dhariwal 2023 §3.3), ``huber`` (the same per element, averaged,
    with ``c = huber_c``: the LCM/PCM scripts' ``--loss_type huber``), ``mse`` (mean over elements), ``l2`` (the norm
    of the whole sample: ECT's pseudo-Huber with ``c = 0``, an adaptive weight of power 0.5 on the squared error) or
    ``lpips`` (the network ``lpips``, ``nets/lpips.py``)."""
    if distance == "lpips":
        return lpips(x.float(), y.float())
    if distance == "huber":
        return (((x - y) ** 2 + huber_c**2).sqrt() - huber_c).flatten(1).mean(1)
    sq = ((x - y) ** 2).flatten(1).sum(1)
    if distance == "mse":
        return sq / x[0].numel()
    # l2: a 1e-8 floor keeps the derivative finite where both sides agree exactly (sqrt's is infinite at 0)
    c = 1e-8 if distance == "l2" else 0.00054 * math.sqrt(x[0].numel())
    return (sq + c * c).sqrt() - c


# ---------------------------------------------------------------------------------------------------------------
# DMD2's time axis.


def time_range(schedule, lo: float, hi: float, kind: str = "uniform", *, closed: bool = True):
    """The part ``[lo, hi]`` of DMD2's time axis: its SD code draws integer timesteps in ``[int(lo N), int(hi N)]``
    (continuous schedules: ``t ~ U[lo, hi]``); its EDM code (``kind="karras"``) draws positions of a 1000-point
    Karras grid (sigma 0.002..80, or the teacher's narrower range; rho 7) the same way, mapped to this schedule's
    time by SNR (``KarrasGrid``). ``closed=False`` stops one index short of ``int(hi N)``, as both draw the GAN's
    noise level (``randint(0, diffusion_gan_max_timestep)``, ``sd_guidance.py`` / ``edm_guidance.py``)."""
    if kind == "karras":
        return KarrasGrid(num_points=1000, lo=lo, hi=hi, closed=closed)
    if isinstance(schedule, VPDiscrete):
        n = schedule.num_train_timesteps
        return UniformIndex(int(lo * n), min(int(hi * n) + closed, n))
    return UniformTime(lo, hi)


def band_times(schedule, lo: float, hi: float, n: int, gen) -> torch.Tensor:
    """``n`` times uniform in ``(lo, hi]``; for ``VPDiscrete`` uniform over the teacher's timesteps in it (none if the
    band holds none), so adjacent bands share no timestep."""
    if isinstance(schedule, VPDiscrete):
        first = math.floor(float(schedule.model_time(lo)) + 1e-9) + 1  # the first index strictly above lo
        last = math.floor(float(schedule.model_time(hi)) + 1e-9)
        if last < max(first, 0):
            return torch.empty(0, dtype=torch.float64)
        return UniformIndex(max(first, 0), last + 1).sample(n, schedule, gen)
    return UniformTime(lo, hi).sample(n, schedule, gen)


# ---------------------------------------------------------------------------------------------------------------
# Guidance inside the target.


@dataclass(frozen=True)
class GuidanceRange:
    """CFG scales ``w ~ U[lo, hi]`` for the teacher inside a distillation target (DESIGN.md §2 convention, 1 = none):
    guided PD (Meng et al. 2023) and LCM's CFG-augmented solver (Luo et al. 2023, whose ``(1 + omega)`` convention is
    ``w = 1 + omega``). With a range the student takes ``w`` as the input ``cond["guidance"]`` and samples at
    ``sample`` (default: the middle); with ``lo == hi`` the scale is baked in and the student takes no input."""

    lo: float
    hi: float
    sample: float | None = None

    @classmethod
    def parse(cls, guidance, sample_guidance: float | None) -> GuidanceRange | None:
        """From a recipe's ``method.guidance`` ``[w_min, w_max]`` (or ``None``) and ``method.sample_guidance``."""
        if guidance is None:
            if sample_guidance is not None:
                raise ValueError("method.sample_guidance needs method.guidance as a range [w_min, w_max]")
            return None
        lo, hi = (float(v) for v in guidance)
        if not 1.0 <= lo <= hi:
            raise ValueError(f"method.guidance must be [w_min, w_max] with 1 <= w_min <= w_max, got {list(guidance)}")
        if sample_guidance is not None and lo == hi:
            raise ValueError("method.sample_guidance needs method.guidance as a range [w_min, w_max] (a fixed "
                             "scale is baked into the student)")
        return cls(lo, hi, (lo + hi) / 2 if sample_guidance is None and hi > lo else sample_guidance)

    @property
    def takes_w(self) -> bool:
        """A range: the student takes ``w`` as an input."""
        return self.hi > self.lo

    def draw(self, b: int, gen) -> torch.Tensor:
        """Per-sample scales ``[B]`` (float64)."""
        return self.lo + (self.hi - self.lo) * torch.rand(b, generator=gen, dtype=torch.float64)

    def student_cond(self, cond: dict | None, w: torch.Tensor, device) -> dict | None:
        """The student's condition: ``cond`` plus ``w`` when it takes it."""
        return {**(cond or {}), "guidance": w.to(device, torch.float32)} if self.takes_w else cond


def drop_cond(net, cond: dict | None, p: float, gen) -> dict | None:
    """``cond`` with a share ``p`` of its rows replaced by ``net``'s null condition, so that the network's
    unconditional output means something (classifier-free guidance training; SiD-LSG's 10% for its fake score). Draws
    only when ``p > 0``."""
    if cond is None or p == 0:
        return cond
    null = net.null_cond(cond)
    drop = torch.rand(next(iter(cond.values())).shape[0], generator=gen) < p
    return {k: torch.where(drop.to(v.device).view(-1, *[1] * (v.ndim - 1)), null[k], v) for k, v in cond.items()}
