"""Noise schedules on one time axis, and the time densities that sample it.

One convention holds across the library: ``t`` in ``[0, 1]``, ``t = 0`` is clean data and ``t = 1`` the noisiest
level, and ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``eps ~ N(0, I)`` (METHODS.md §1.1). What a backbone
takes as its "timestep" (an integer DDPM index, ``1000 * t`` for flow models, ``c_noise`` for EDM) is
``schedule.model_time(t)``, and only ``denoisers.py`` calls it.

Schedules:
    * ``VPDiscrete``: any diffusers DDPM-style beta schedule. Index ``n`` in ``{0..N-1}`` sits at ``t = (n+1)/N``,
      so ``t = 1`` is the last training index and ``t = 0`` is the clean end (``alpha = 1``), which is where
      DDIM's ``set_alpha_to_one`` lands. Between indices ``log(sigma/alpha)`` is interpolated linearly, as
      k-diffusion's ``DiscreteSchedule`` and diffusers' ``_sigma_to_t`` do.
    * ``VPCosine``: continuous VP with the cosine logSNR of Salimans & Ho (2022), clipped to [lam_min, lam_max].
    * ``EDM``: variance exploding, ``alpha = 1``, ``sigma = sigma_max * t**rho``, so uniform ``t`` between
      ``(sigma_min/sigma_max)**(1/rho)`` and 1 is exactly the Karras et al. (2022) grid (Eq. 5).
    * ``RectifiedFlow``: ``alpha = 1 - t'``, ``sigma = t'`` with the shift ``t' = k t / (1 + (k-1) t)`` (SD3).
    * ``TrigFlow``: ``alpha = cos(pi t / 2)``, ``sigma = sigma_data * sin(pi t / 2)`` (Lu & Song 2024).

Everything is computed in float64; callers cast back.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule(abc.ABC):
    """Base class: subclasses define ``alpha`` and ``sigma``; derivatives, logSNR and its inverse are generic."""

    #: the name a recipe uses for this schedule
    kind: str = ""
    #: smallest time at which the backbone may be evaluated (``1/N`` for discrete schedules)
    t_min: float = 0.0
    #: the data's standard deviation as the schedule assumes it (EDM's and TrigFlow's ``sigma_data``; 1 elsewhere):
    #: what the ``trigflow`` prediction kind and the consistency scalings scale by
    sigma_data: float = 1.0

    @abc.abstractmethod
    def alpha(self, t) -> torch.Tensor:
        """Signal scale at ``t`` (float64)."""

    @abc.abstractmethod
    def sigma(self, t) -> torch.Tensor:
        """Noise scale at ``t`` (float64)."""

    def model_time(self, t) -> torch.Tensor:
        """The timestep the backbone was trained with, as float64."""
        return _f64(t)

    def derivatives(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha'(t), sigma'(t))`` by autograd in float64, so every schedule gets them for free."""
        t = _f64(t).detach().clone().requires_grad_(True)

        def grad(y: torch.Tensor) -> torch.Tensor:
            # A constant (EDM's alpha = 1) has no graph at all: autograd.grad would raise, so its derivative is 0.
            g = torch.autograd.grad(y.sum(), t, retain_graph=True, allow_unused=True)[0] if y.requires_grad else None
            return torch.zeros_like(t).detach() if g is None else g.detach()

        with torch.enable_grad():
            a, s = self.alpha(t), self.sigma(t)
            return grad(a), grad(s)

    def logsnr(self, t) -> torch.Tensor:
        """``log(alpha^2 / sigma^2)``; +inf at ``t = 0``."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_logsnr(self, lam, *, iters: int = 80) -> torch.Tensor:
        """Inverse of ``logsnr`` by bisection (logSNR decreases in t for every schedule here)."""
        lam = _f64(lam)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.logsnr(mid) > lam  # still too clean: move right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` of shape ``[B]``."""
        a, s = (_bcast(v, x0) for v in (self.alpha(t), self.sigma(t)))
        return (a * x0.double() + s * eps.double()).to(x0.dtype)

    def grid(self, steps: int) -> torch.Tensor:
        """``steps + 1`` decreasing times from 1 to 0: the teacher's deterministic-sampler grid."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def snap(self, t) -> torch.Tensor:
        """The nearest time the backbone was trained at: ``t`` itself for continuous-time schedules."""
        return _f64(t)

    def check_grid(self, times: torch.Tensor) -> None:
        """Raise ``ValueError`` if the backbone cannot be evaluated at ``times`` (all but a final 0)."""
        inner = times[times > 0]
        if (inner < self.t_min - 1e-12).any() or (inner > 1 + 1e-12).any():
            raise ValueError(f"grid times must lie in [{self.t_min:g}, 1] (or be 0 at the end), got {times.tolist()}")

    def config(self) -> dict:
        """A JSON-able description (recorded in exports and checkpoints)."""
        return {"kind": self.kind}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` (or scalar) tensor to broadcast against ``like`` ``[B, ...]``."""
    v = _f64(v).to(like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------


class VPDiscrete(NoiseSchedule):
    """Variance preserving, discrete-time: the schedule of diffusers' DDPM/DDIM/SD schedulers.

    Args:
        alphas_cumprod: ``abar_n`` for ``n = 0..N-1`` (diffusers ``scheduler.alphas_cumprod``).
    """

    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = _f64(alphas_cumprod)
        self.num_train_timesteps = int(abar.numel())
        self.alphas_cumprod = abar
        # EDM sigma at each index, with the clean end (index -1, sigma 0) prepended.
        self._sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), ((1 - abar) / abar).sqrt()])
        self.t_min = 1.0 / self.num_train_timesteps

    @classmethod
    def from_scheduler_config(cls, config) -> VPDiscrete:
        """Build from any diffusers DDPM-family scheduler config (dict or FrozenDict)."""
        from diffusers import DDPMScheduler

        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr"}
        sched = DDPMScheduler(**{k: v for k, v in cfg.items() if k in keep})
        abar = sched.alphas_cumprod.double()
        if cfg.get("rescale_betas_zero_snr"):
            # Zero terminal SNR makes abar[-1] = 0 exactly; keep it finite so conversions stay defined
            # (diffusers does the same clamp in its schedulers).
            abar = abar.clamp(min=2**-24)
        return cls(abar)

    def _edm_sigma(self, t) -> torch.Tensor:
        # Position on the index axis with the clean end at 0: pos = t * N  (index n sits at pos n+1).
        pos = (_f64(t) * self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        sigmas = self._sigmas.to(pos.device)
        s_lo, s_hi = sigmas[lo], sigmas[lo + 1]
        # Interpolate log-sigma between indices; between the clean end and index 0 interpolate sigma itself.
        log_interp = torch.exp(torch.log(s_lo.clamp(min=1e-300)) * (1 - frac) + torch.log(s_hi) * frac)
        return torch.where(lo == 0, s_hi * frac, log_interp)

    def alpha(self, t) -> torch.Tensor:
        return 1.0 / (1.0 + self._edm_sigma(t) ** 2).sqrt()

    def sigma(self, t) -> torch.Tensor:
        s = self._edm_sigma(t)
        return s / (1.0 + s**2).sqrt()

    def model_time(self, t) -> torch.Tensor:
        return _f64(t) * self.num_train_timesteps - 1.0

    def index_to_t(self, n) -> torch.Tensor:
        return (_f64(n) + 1.0) / self.num_train_timesteps

    def snap(self, t) -> torch.Tensor:
        """The nearest of the ``N`` timesteps, ties to the even position ``t N = index + 1``: the rounding of
        diffusers' ``trailing`` grids (``np.round(np.arange(N, 0, -N / steps)) - 1``) wherever their float
        ``arange`` is exact. The clean end ``t = 0`` stays 0."""
        return (_f64(t) * self.num_train_timesteps).round() / self.num_train_timesteps

    def grid(self, steps: int) -> torch.Tensor:
        """diffusers' ``timestep_spacing="trailing"`` indices, then the clean end (``set_alpha_to_one``)."""
        n = self.num_train_timesteps
        idx = torch.round(torch.arange(n, 0, -n / steps, dtype=torch.float64)) - 1
        return torch.cat([self.index_to_t(idx), torch.zeros(1, dtype=torch.float64)])

    def check_grid(self, times: torch.Tensor) -> None:
        super().check_grid(times)
        idx = self.model_time(times[times > 0])
        off = (idx - idx.round()).abs() > 1e-6
        if off.any():
            shown = ", ".join(f"{v:g}" for v in idx[off][:4].tolist()) + (", ..." if int(off.sum()) > 4 else "")
            raise ValueError(
                f"a {len(idx)}-step student grid falls between the teacher's {self.num_train_timesteps} discrete "
                f"timesteps (indices {shown}); choose a step count that divides {self.num_train_timesteps}")

    def config(self) -> dict:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps}


class VPCosine(NoiseSchedule):
    """Continuous VP with the cosine logSNR ``lam(t) = -2 log tan(a t + b)`` (Salimans & Ho 2022, App. D)."""

    kind = "vp_cosine"

    def __init__(self, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self._b = math.atan(math.exp(-0.5 * logsnr_max))
        self._a = math.atan(math.exp(-0.5 * logsnr_min)) - self._b

    def logsnr(self, t) -> torch.Tensor:
        return -2.0 * torch.log(torch.tan(self._a * _f64(t) + self._b))

    def alpha(self, t) -> torch.Tensor:
        return torch.sigmoid(self.logsnr(t)).sqrt()

    def sigma(self, t) -> torch.Tensor:
        return torch.sigmoid(-self.logsnr(t)).sqrt()

    def t_from_logsnr(self, lam, **_) -> torch.Tensor:
        return (torch.atan(torch.exp(-0.5 * _f64(lam))) - self._b) / self._a

    def config(self) -> dict:
        return {"kind": self.kind, "logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}


class EDM(NoiseSchedule):
    """Variance exploding (Karras et al. 2022): ``alpha = 1``, ``sigma = sigma_max t^rho``.

    ``model_time`` is EDM's ``c_noise = ln(sigma) / 4`` (Table 1).
    """

    kind = "edm"

    def __init__(self, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5):
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data
        self.t_min = (sigma_min / sigma_max) ** (1.0 / rho)

    def alpha(self, t) -> torch.Tensor:
        return torch.ones_like(_f64(t))

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_max * _f64(t) ** self.rho

    def model_time(self, t) -> torch.Tensor:
        return 0.25 * torch.log(self.sigma(t))

    def grid(self, steps: int) -> torch.Tensor:
        """The Karras rho-grid from sigma_max to sigma_min, then 0."""
        inner = torch.linspace(1.0, self.t_min, steps, dtype=torch.float64)
        return torch.cat([inner, torch.zeros(1, dtype=torch.float64)])

    def config(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "sigma_data": self.sigma_data}


class RectifiedFlow(NoiseSchedule):
    """Rectified flow (SD3, FLUX): ``x_t = (1 - t') x0 + t' eps`` with ``t' = k t / (1 + (k - 1) t)``.

    ``model_time`` is ``1000 t'``, what diffusers' flow transformers take.
    """

    kind = "rectified_flow"

    def __init__(self, *, shift: float = 1.0):
        self.shift = shift

    def shifted(self, t) -> torch.Tensor:
        t = _f64(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - self.shifted(t)

    def sigma(self, t) -> torch.Tensor:
        return self.shifted(t)

    def model_time(self, t) -> torch.Tensor:
        return 1000.0 * self.shifted(t)

    def config(self) -> dict:
        return {"kind": self.kind, "shift": self.shift}


class TrigFlow(NoiseSchedule):
    """TrigFlow (Lu & Song 2024, sCM): ``x = cos(s) x0 + sin(s) z``, ``z ~ N(0, sigma_data^2)``, ``s = pi t / 2``.

    ``model_time`` is the angle ``s`` itself.
    """

    kind = "trigflow"

    def __init__(self, *, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def alpha(self, t) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * _f64(t))

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_data * torch.sin(0.5 * math.pi * _f64(t))

    def model_time(self, t) -> torch.Tensor:
        return 0.5 * math.pi * _f64(t)

    def config(self) -> dict:
        return {"kind": self.kind, "sigma_data": self.sigma_data}


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.kind: cls for cls in (VPDiscrete, VPCosine, EDM, RectifiedFlow, TrigFlow)
}


def map_time(t, src: NoiseSchedule, dst: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """SNR-matched time on ``dst`` for time ``t`` on ``src`` (METHODS.md §1.3).

    Returns:
        ``(t_dst, scale)`` with ``x_dst = scale * x_src`` where ``scale = alpha_dst / alpha_src``.
    """
    t_dst = dst.t_from_logsnr(src.logsnr(t))
    return t_dst, dst.alpha(t_dst) / src.alpha(t)


# ---------------------------------------------------------------------------------------------------------------
# Time densities: each samples ``t`` in the library convention for a given schedule.


@dataclass(frozen=True)
class UniformTime:
    """Uniform ``t`` in ``[t_lo, t_hi]``."""

    t_lo: float = 0.0
    t_hi: float = 1.0

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        lo = max(self.t_lo, schedule.t_min)
        return lo + (self.t_hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class UniformIndex:
    """Uniform over a discrete index range of a ``VPDiscrete`` schedule, e.g. DMD2's ``[0.02 N, 0.98 N)``."""

    lo: int = 0
    hi: int | None = None

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(f"UniformIndex needs a vp_discrete schedule, got {schedule.kind}")
        hi = schedule.num_train_timesteps if self.hi is None else self.hi
        idx = torch.randint(self.lo, hi, (n,), generator=generator)
        return schedule.index_to_t(idx)


@dataclass(frozen=True)
class LogNormalSigma:
    """``ln(sigma/alpha) ~ N(p_mean, p_std^2)`` (EDM training density, Karras et al. 2022 §5), mapped to ``t``."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        t = schedule.t_from_logsnr(-2.0 * log_sigma)
        return t.clamp(min=schedule.t_min, max=1.0)


@dataclass(frozen=True)
class LogitNormal:
    """``t = sigmoid(m + s * n)``, ``n ~ N(0, 1)`` (SD3, Esser et al. 2024 §3.1)."""

    mean: float = 0.0
    std: float = 1.0

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        return t.clamp(min=schedule.t_min, max=1.0)


@dataclass(frozen=True)
class KarrasGrid:
    """A uniform draw from the N-point Karras rho-grid between ``sigma_min`` and ``sigma_max`` (CM, Song 2023).

    ``lo``/``hi`` restrict the draw to a part of the grid, as fractions of it counted from the clean end: positions
    ``[int(lo N), int(hi N)]`` in increasing noise, as DMD2's EDM code reads ``min/max_step_percent`` on its
    1000-point grid (``main/edm/edm_guidance.py``, DM loss: ``randint(min, max + 1)``); ``closed=False`` leaves out
    position ``int(hi N)``, as the same code draws its GAN noise (``randint(0, diffusion_gan_max_timestep)``).

    The grid spans the schedule's own noise range where that is narrower (``span``): DMD2 draws it on an EDM teacher
    trained over exactly 0.002..80, while SD's schedule spans 0.029..14.6, where the fixed grid would put 28% of the
    draws on its noisiest timestep and 13% on its cleanest. On a discrete VP schedule the draws are
    rounded to its timesteps, the only ones its network was trained on.
    """

    num_points: int = 40
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    lo: float = 0.0
    hi: float = 1.0
    closed: bool = True

    def span(self, schedule: NoiseSchedule) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` narrowed to the schedule's ends ``t_min`` and 1 (EDM sigma, ``sigma/alpha``)."""
        t = torch.tensor([schedule.t_min, 1.0], dtype=torch.float64)
        ends = (schedule.sigma(t) / schedule.alpha(t)).tolist()  # inf at t = 1 for flows
        return max(self.sigma_min, ends[0]), min(self.sigma_max, ends[1])

    def sigmas(self, span: tuple[float, float] | None = None) -> torch.Tensor:
        """The grid from its largest sigma down, between ``span`` (default: ``sigma_min``, ``sigma_max``)."""
        lo, hi = span or (self.sigma_min, self.sigma_max)
        r = 1.0 / self.rho
        i = torch.arange(self.num_points, dtype=torch.float64) / (self.num_points - 1)
        return (hi**r + i * (lo**r - hi**r)) ** self.rho

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        # sigmas() runs from sigma_max down, so positions [first, last) from the clean end are these indices
        points = self.num_points
        first, last = int(self.lo * points), min(int(self.hi * points) + self.closed, points)
        idx = torch.randint(points - last, points - first, (n,), generator=generator)
        t = schedule.t_from_logsnr(-2.0 * torch.log(self.sigmas(self.span(schedule))[idx]))
        return schedule.snap(t).clamp(min=schedule.t_min, max=1.0)  # discrete VP: onto its timesteps
