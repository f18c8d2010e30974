"""Conversions between x0, eps, v, flow velocity and score (METHODS.md §1.2).

Every conversion goes through the pair ``(x0, eps)`` in float64, because several of them divide by numbers that
vanish at one end of the schedule (``alpha`` near pure noise, ``sigma`` near data). Definitions, for
``x_t = a x0 + s eps`` at one time t:

    v     = a eps - s x0                      (Salimans & Ho 2022, §4)
    flow  = dx_t/dt = a' x0 + s' eps          (the PF-ODE velocity; for rectified flow, eps - x0)
    flow_match = eps - x0                     (what flow-matching backbones output, SD3 and FLUX: the velocity
                                               along the straight path, whatever time shift the schedule applies)
    trigflow = (a eps - (s / sd^2) x0) / r,   r = sqrt(a^2 + s^2 / sd^2)
                                              (sCM's network output F, Lu & Song 2024, Eq. 9: on TrigFlow's own
                                               schedule a = cos, s = sd sin, r = 1, so x0 = cos x - sd sin F; on any
                                               other schedule through the SNR-matched TrigFlow time, METHODS.md §1.3)
    score = grad log p_t(x_t) = -eps / s

The consistency models' boundary scalings (``cm_scalings``, ``lcm_scalings``, METHODS.md §1.7) are here too: every
consistency parameterisation is ``f(x, t) = c_skip x + c_out y`` with ``f(x, t_min) = x``.
"""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule, _bcast


#: the prediction kinds a backbone may output
KINDS = ("x0", "eps", "v", "flow", "flow_match", "trigflow")
#: diffusers' ``prediction_type`` names -> ours
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow_match"}
OURS_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_PREDICTION.items()}


class Coefficients:
    """Schedule values at one time, broadcast against a sample ``[B, ...]``, in float64.

    ``a, s`` are computed at once; the derivatives ``da, ds`` (needed only by flow conversions) on first use, since
    every denoiser call builds one of these and autograd through the schedule would otherwise sit on the hot path.
    """

    def __init__(self, a: torch.Tensor, s: torch.Tensor, da: torch.Tensor | None = None,
                 ds: torch.Tensor | None = None, *, derive=None, sigma_data: float = 1.0):
        self.a, self.s, self.sigma_data = a, s, sigma_data
        self._da, self._ds, self._derive = da, ds, derive

    @classmethod
    def at(cls, schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> Coefficients:
        def derive():
            return tuple(_bcast(v, like) for v in schedule.derivatives(t))

        return cls(_bcast(schedule.alpha(t), like), _bcast(schedule.sigma(t), like), derive=derive,
                   sigma_data=schedule.sigma_data)

    @property
    def r(self) -> torch.Tensor:
        """``sqrt(a^2 + s^2 / sd^2)``: how far the sample's scale is from TrigFlow's (1 on TrigFlow itself)."""
        return (self.a**2 + self.s**2 / self.sigma_data**2).sqrt()

    def _derivatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._da is None:
            self._da, self._ds = self._derive()
        return self._da, self._ds

    @property
    def da(self) -> torch.Tensor:
        return self._derivatives()[0]

    @property
    def ds(self) -> torch.Tensor:
        return self._derivatives()[1]

    def chunk(self, n: int) -> list[Coefficients]:
        """Split per-sample values along the batch; derivatives stay lazy."""
        def split(v):
            return v.chunk(n) if v.ndim else [v] * n

        parts = []
        for i, (a, s) in enumerate(zip(split(self.a), split(self.s))):
            parts.append(Coefficients(a, s, derive=lambda i=i: (split(self.da)[i], split(self.ds)[i]),
                                      sigma_data=self.sigma_data))
        return parts


def to_x0_eps(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a backbone output of ``kind`` into ``(x0, eps)`` in float64."""
    out, x = out.double(), x_t.double()
    if kind == "x0":
        x0 = out
        eps = (x - c.a * x0) / c.s
    elif kind == "eps":
        eps = out
        x0 = (x - c.s * eps) / c.a
    elif kind == "v":
        norm = c.a**2 + c.s**2
        x0 = (c.a * x - c.s * out) / norm
        eps = (c.s * x + c.a * out) / norm
    elif kind == "flow":
        det = c.a * c.ds - c.s * c.da
        x0 = (c.ds * x - c.s * out) / det
        eps = (c.a * out - c.da * x) / det
    elif kind == "flow_match":
        # x_t = a x0 + s (u + x0)  =>  x0 = (x_t - s u) / (a + s); a + s = 1 on rectified flow
        x0 = (x - c.s * out) / (c.a + c.s)
        eps = out + x0
    elif kind == "trigflow":
        r = c.r
        x0 = c.a * x / r**2 - (c.s / r) * out
        eps = (x - c.a * x0) / c.s
    else:
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {KINDS}")
    return x0, eps


def from_x0_eps(kind: str, x0: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
    """The ``kind`` prediction that corresponds to ``(x0, eps)``, in float64."""
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return c.a * eps - c.s * x0
    if kind == "flow":
        return c.da * x0 + c.ds * eps
    if kind == "flow_match":
        return eps - x0
    if kind == "trigflow":
        return (c.a * eps - (c.s / c.sigma_data**2) * x0) / c.r
    if kind == "score":
        return -eps / c.s
    raise ValueError(f"unknown prediction kind {kind!r}; allowed: {KINDS + ('score',)}")


class Prediction:
    """What every denoiser returns: one prediction at ``(x_t, t)`` readable as any parameterisation.

    Holds ``x0`` and ``eps`` in float64 and derives the rest on demand. ``dtype`` is the sample dtype the
    readers cast back to; use ``.x0_64`` etc. (``get(kind, exact=True)``) when float64 is wanted.
    """

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, coeffs: Coefficients, dtype: torch.dtype):
        self.x0_64, self.eps_64, self.coeffs, self.dtype = x0, eps, coeffs, dtype

    @classmethod
    def from_output(cls, kind: str, out: torch.Tensor, x_t: torch.Tensor, coeffs: Coefficients) -> Prediction:
        x0, eps = to_x0_eps(kind, out, x_t, coeffs)
        return cls(x0, eps, coeffs, x_t.dtype)

    def get(self, kind: str, *, exact: bool = False) -> torch.Tensor:
        value = from_x0_eps(kind, self.x0_64, self.eps_64, self.coeffs)
        return value if exact else value.to(self.dtype)

    @property
    def x0(self) -> torch.Tensor:
        return self.x0_64.to(self.dtype)

    @property
    def eps(self) -> torch.Tensor:
        return self.eps_64.to(self.dtype)

    @property
    def v(self) -> torch.Tensor:
        return self.get("v")

    @property
    def flow(self) -> torch.Tensor:
        return self.get("flow")

    @property
    def score(self) -> torch.Tensor:
        return self.get("score")

    def chunk(self, n: int) -> list[Prediction]:
        """Split along the batch into ``n`` predictions (the two halves of a batched CFG pass)."""
        return [Prediction(x0, eps, c, self.dtype)
                for x0, eps, c in zip(self.x0_64.chunk(n), self.eps_64.chunk(n), self.coeffs.chunk(n))]

    @staticmethod
    def combine(uncond: Prediction, cond: Prediction, w) -> Prediction:
        """Classifier-free guidance ``p = p_u + w (p_c - p_u)`` (DESIGN.md §2; ``w = 1`` is no guidance).

        CFG is affine in the prediction at fixed ``(x_t, t)`` (METHODS.md §1.5), so mixing x0 and eps is the same
        as mixing any other parameterisation. ``w`` is a scalar or a per-sample ``[B]`` tensor.
        """
        w = _bcast(torch.as_tensor(w, dtype=torch.float64), cond.x0_64)
        x0 = uncond.x0_64 + w * (cond.x0_64 - uncond.x0_64)
        eps = uncond.eps_64 + w * (cond.eps_64 - uncond.eps_64)
        return Prediction(x0, eps, cond.coeffs, cond.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Transition kernels (METHODS.md §1.4).


def ddim_step(pred: Prediction, schedule: NoiseSchedule, t_next: torch.Tensor) -> torch.Tensor:
    """Deterministic jump to ``t_next``: ``x_s = a_s x0 + s_s eps`` (DDIM, Song et al. 2021, Eq. 12 with eta=0)."""
    like = pred.x0_64
    a, s = _bcast(schedule.alpha(t_next), like), _bcast(schedule.sigma(t_next), like)
    return (a * pred.x0_64 + s * pred.eps_64).to(pred.dtype)


def ddim_x0_target(x_t: torch.Tensor, x_s: torch.Tensor, schedule: NoiseSchedule, t, s) -> torch.Tensor:
    """The x0 for which one DDIM step from ``(x_t, t)`` lands exactly on ``x_s`` at time ``s``.

    Salimans & Ho (2022), Algorithm 2: ``x~ = (x_s - (s_s/s_t) x_t) / (a_s - (s_s/s_t) a_t)``. Float64.
    """
    like = x_t
    a_t, s_t = _bcast(schedule.alpha(t), like), _bcast(schedule.sigma(t), like)
    a_s, s_s = _bcast(schedule.alpha(s), like), _bcast(schedule.sigma(s), like)
    ratio = s_s / s_t
    return (x_s.double() - ratio * x_t.double()) / (a_s - ratio * a_t)


# ---------------------------------------------------------------------------------------------------------------
# Consistency-function boundary scalings (METHODS.md §1.7): f(x, t) = c_skip(t) x + c_out(t) y, with f(x, t_min) = x.


def cm_scalings(sigma, *, sigma_min: float = 0.002, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of consistency models at EDM noise level ``sigma`` (Song et al. 2023, App. C):
    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2)``; at
    ``sigma = sigma_min`` they are exactly 1 and 0, so ``f(x, sigma_min) = x``. Float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_scalings(timestep, *, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of latent consistency models at a discrete ``timestep`` (Luo et al. 2023; diffusers
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``, which the exported pipelines apply):
    ``c_skip = sd^2 / ((10 n)^2 + sd^2)``, ``c_out = 10 n / sqrt((10 n)^2 + sd^2)``; 1 and 0 at timestep 0, and
    ``c_skip < 7e-6`` from timestep 19 on. They multiply the sample and the x0 estimate. Float64."""
    scaled = torch.as_tensor(timestep, dtype=torch.float64) * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2).sqrt()


BOUNDARIES = ("cm", "lcm")


def consistency_output(kind: str, schedule: NoiseSchedule, x_t: torch.Tensor, x0: torch.Tensor, t, *,
                       sigma_min: float = 0.002, sigma_data: float = 0.5,
                       timestep_scaling: float = 10.0) -> torch.Tensor:
    """The consistency function ``f(x_t, t)`` built from a network's clean estimate ``x0`` at library time ``t``
    (per-sample ``[B]``), in float64, with ``f = x`` at the boundary:

    * ``lcm``: ``c_skip(n) x_t + c_out(n) x0`` at the backbone's timestep ``n = schedule.model_time(t)``, what LCM
      trains and diffusers' ``LCMScheduler`` applies (``f = x_t`` at timestep 0);
    * ``cm``: Song et al. (2023) on EDM's variables ``x = x_t / a``, ``sigma = s / a``: the network output ``F`` that
      EDM's preconditioning would have turned into ``x0`` (``x0 = c_skip_edm x + c_out_edm F``, Karras et al. 2022,
      Table 1) enters ``f = c_skip_cm x + c_out_cm F`` (``f = x`` at ``sigma = sigma_min``).
    """
    t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
    x, x0 = x_t.double(), x0.double()
    if kind == "lcm":
        c_skip, c_out = lcm_scalings(schedule.model_time(t), timestep_scaling=timestep_scaling, sigma_data=sigma_data)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * x0
    if kind != "cm":
        raise ValueError(f"consistency boundary must be one of {BOUNDARIES}, got {kind!r}")
    a = _bcast(schedule.alpha(t), x)
    sigma = _bcast(schedule.sigma(t), x) / a
    x = x / a
    edm_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    edm_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_skip, c_out = cm_scalings(sigma, sigma_min=sigma_min, sigma_data=sigma_data)
    return c_skip * x + c_out * (x0 - edm_skip * x) / edm_out
