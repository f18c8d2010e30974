"""Conversions between x0, eps, v, flow velocity and score (METHODS.md §1.2).

Every conversion goes through the pair ``(x0, eps)`` in float64, because several of them divide by numbers that
vanish at one end of the schedule (``alpha`` near pure noise, ``sigma`` near data). Definitions, for
``x_t = a x0 + s eps`` at one time t:

    v     = a eps - s x0                      (Salimans & Ho 2022, §4)
    flow  = dx_t/dt = a' x0 + s' eps          (the PF-ODE velocity; for rectified flow, eps - x0)
    flow_match = eps - x0                     (what flow-matching backbones output, SD3 and FLUX: the velocity
                                               along the straight path, whatever time shift the schedule applies)
    score = grad log p_t(x_t) = -eps / s
"""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule, _bcast


#: the prediction kinds a backbone may output
KINDS = ("x0", "eps", "v", "flow", "flow_match")
#: diffusers' ``prediction_type`` names -> ours
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow_match"}
OURS_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_PREDICTION.items()}


class Coefficients:
    """Schedule values at one time, broadcast against a sample ``[B, ...]``, in float64.

    ``a, s`` are computed at once; the derivatives ``da, ds`` (needed only by flow conversions) on first use, since
    every denoiser call builds one of these and autograd through the schedule would otherwise sit on the hot path.
    """

    def __init__(self, a: torch.Tensor, s: torch.Tensor, da: torch.Tensor | None = None,
                 ds: torch.Tensor | None = None, *, derive=None):
        self.a, self.s = a, s
        self._da, self._ds, self._derive = da, ds, derive

    @classmethod
    def at(cls, schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> Coefficients:
        def derive():
            return tuple(_bcast(v, like) for v in schedule.derivatives(t))

        return cls(_bcast(schedule.alpha(t), like), _bcast(schedule.sigma(t), like), derive=derive)

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
            parts.append(Coefficients(a, s, derive=lambda i=i: (split(self.da)[i], split(self.ds)[i])))
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
