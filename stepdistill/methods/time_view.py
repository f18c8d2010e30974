"""A student trained in another schedule's time and differentiated along it: what sCM (TrigFlow time) and MeanFlow
(rectified-flow time) share, composed by both rather than copied.

The student is the teacher's backbone seen through ``denoisers.Reparameterized`` (the SNR-matched time change of
METHODS.md §1.3), so it keeps its native output and timesteps, samples on the teacher's own trailing grid and exports
as the model it is. Its time derivative goes through ``denoisers.jvp`` (forward-mode AD, or a central difference where
the backbone cannot), with the dropout RNG shared between the derivative and the online pass.
"""

from __future__ import annotations

import torch

from ..denoisers import JVPError, Reparameterized, jvp
from ..sampling import StudentGrid
from ..schedules import NoiseSchedule


#: recipe spelling of ``method.jvp`` -> ``denoisers.jvp``'s mode
JVP_MODES = {"auto": "auto", "exact": "exact", "finite_difference": "fd"}


class TimeView:
    """The student in ``schedule``'s time, sampled on the teacher's trailing grid with ``transition``.

    Args:
        schedule: the schedule the loss is written in (``TrigFlow``, ``RectifiedFlow``).
        prediction: the output kind the view reads (``trigflow`` for sCM's ``F``, ``flow`` for MeanFlow's ``u``).
        transition: how the student moves between grid times (``renoise``, ``flow_map``).
        jvp: ``auto | exact | finite_difference`` (``method.jvp``).
        jvp_step: the central difference's step.
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str, *, transition: str, jvp: str = "auto",
                 jvp_step: float = 1e-4):
        if jvp not in JVP_MODES:
            raise ValueError(f"method.jvp must be one of {tuple(JVP_MODES)}, got {jvp!r}")
        if not jvp_step > 0:
            raise ValueError(f"method.jvp_step must be positive, got {jvp_step}")
        self.schedule, self.prediction, self.transition = schedule, prediction, transition
        self.mode, self.step = JVP_MODES[jvp], jvp_step
        self.native: NoiseSchedule | None = None  # the student's own schedule (``use``)
        self.span: tuple[float, float] | None = None  # the view's times the backbone reaches
        self.grid: StudentGrid | None = None  # the grid the student trains for

    def __call__(self, net) -> Reparameterized:
        return Reparameterized(net, self.schedule, prediction=self.prediction)

    def use(self, native: NoiseSchedule, steps: int) -> None:
        """Take the student's own schedule: its ``steps``-step grid, and the span of view times its backbone was
        trained on (SD's betas end at TrigFlow angle 1.536; timestep 0 starts at 0.047)."""
        self.native = native
        ends = torch.tensor([native.t_min, 1.0], dtype=torch.float64)
        lo, hi = self.schedule.t_from_logsnr(native.logsnr(ends).clamp(max=40.0)).tolist()
        self.span = (lo, hi - 2 * self.step)  # room for the central difference's step along a unit time tangent
        self.grid = self.grid_for(steps)

    def student_grid(self) -> StudentGrid:
        if self.grid is None:
            raise RuntimeError("student_grid() before prepare() or update_schedule(): the grid needs the schedule")
        return self.grid

    def grid_for(self, k: int) -> StudentGrid:
        """The teacher's trailing ``k``-step grid: these students sample at any step count."""
        if self.native is None:
            raise RuntimeError("student_grid() before prepare() or update_schedule(): the grid needs the schedule")
        times = self.native.grid(k)
        self.native.check_grid(times)
        return StudentGrid(times=tuple(times[:-1].tolist()), transition=self.transition)

    @torch.no_grad()
    def derivative(self, view, x: torch.Tensor, t: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor, cond):
        """``(value, derivative)`` of ``view``'s output along ``(dx, dt)``, float64, without a graph. The evaluations
        draw the dropout masks the online pass then draws again (``fork_rng`` restores the state), so the derivative is
        that of the network the loss trains."""
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            return jvp(view, (x, t), (dx, dt), cond=cond, output=self.prediction, mode=self.mode, step=self.step)

    def check_exact(self, student, ctx, cond_extra: dict | None = None) -> None:
        """With ``method.jvp: exact``, try forward-mode AD once before training and refuse in one line where the
        backbone cannot (rather than at the first step)."""
        if self.mode != "exact":
            return
        x = torch.zeros(1, *ctx.sample_shape, device=ctx.device)
        t = torch.full((1,), 0.5 * sum(self.span), dtype=torch.float64)
        cond = None if ctx.conditions is None else {k: v[:1] for k, v in ctx.conditions.items()}
        if cond_extra:
            cond = {**(cond or {}), **cond_extra}
        try:
            jvp(self(student), (x, t), (x, torch.ones_like(t)), cond=cond, output=self.prediction, mode="exact")
        except JVPError as err:
            raise ValueError(f"method.jvp: exact: {err}; method.jvp: auto falls back to a central difference") \
                from None
