"""The method interface (DESIGN.md §3). Interface only: no logic lives here.

A method is a small object with named phases. The training loop asks it which roles it needs, which role's
optimizer steps in each phase, and for a per-sample loss; it never learns the method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..denoisers import Denoiser
from ..sampling import StudentGrid


@dataclass(frozen=True)
class RoleSpec:
    """How the loop builds one role.

    Attributes:
        init: ``"teacher"`` (a copy of the teacher's backbone), ``"student"`` (a copy of the student), ``"new"``
            (the student's architecture, freshly initialised) or ``"head"`` (a fresh GAN head on the bottleneck of
            the role named by ``head_of``).
        trainable: gets an optimizer and, under DDP, a wrapper.
        checkpointed: saved and restored with checkpoints (trainable roles always are).
        prediction: the role's output parameterisation (``x0 | eps | v | flow``); ``None`` keeps the source's.
        head_of: for ``init="head"``: the denoiser role whose features the head reads.
        guidance: the role takes a per-sample guidance scale ``cond["guidance"]`` and samples at this one when none
            is given (the w-conditioned student of guided distillation); a backbone without such an input gets one
            (``Denoiser.guidance_conditioned``). ``None``: no guidance input.
    """

    init: str = "teacher"
    trainable: bool = True
    checkpointed: bool = True
    prediction: str | None = None
    head_of: str | None = None
    guidance: float | None = None


@dataclass
class Nets:
    """The networks of one run, by role name (DESIGN.md §4). ``teacher`` is frozen and never optimised."""

    student: Denoiser
    teacher: Denoiser
    extra: dict[str, nn.Module] = field(default_factory=dict)

    def __getitem__(self, role: str) -> nn.Module:
        if role in ("student", "teacher"):
            return getattr(self, role)
        return self.extra[role]

    def roles(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, **self.extra}


@dataclass
class Batch:
    """One training batch. Data-free methods ignore ``x0``; unconditional sources give ``cond=None``."""

    x0: torch.Tensor | None
    cond: dict | None
    generator: torch.Generator | None = None
    #: seeded alike on every rank, for draws that decide which network calls run (e.g. DMD2's backward-simulation
    #: step): under FSDP every call is a collective, so all ranks must make the same ones
    shared: torch.Generator | None = None
    #: ``x0``'s own condition, for losses that need the pair (DMD2's GAN reals): class labels, or text teachers'
    #: encoded image captions; ``None`` for unconditional data and for uncaptioned images, whose ``cond`` rows are
    #: prompts drawn independently of them
    x0_cond: dict | None = None

    @property
    def size(self) -> int:
        return self.x0.shape[0] if self.x0 is not None else next(iter(self.cond.values())).shape[0]


class LossOutput(NamedTuple):
    """Per-sample loss ``[B]`` (the loop reduces it) and detached scalars for the log.

    Log values may stay 0-d tensors (and should, on a GPU): the loop turns them into floats only on logging steps,
    since each ``float()`` of a device tensor makes the host wait for the GPU."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor]


def loss_terms(out: LossOutput | Iterator[LossOutput]) -> Iterator[LossOutput]:
    """A method's answer for one phase as an iterator of terms (``Method.__call__``)."""
    return iter([out]) if isinstance(out, LossOutput) else out


class Method(Protocol):
    """What the training loop needs of a method."""

    #: update order inside one training step, e.g. ``("fake_score", "student")``
    phases: tuple[str, ...]

    def roles(self) -> dict[str, RoleSpec]:
        """Roles beyond the frozen teacher, with how each is initialised (always includes ``student``)."""
        ...

    def owner(self, phase: str) -> str | tuple[str, ...]:
        """The role (or roles, stepped together, e.g. DMD2's fake score and its GAN head) whose optimizers step in
        ``phase``."""
        ...

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput | Iterator[LossOutput]:
        """The per-sample loss of ``phase``; or its terms one at a time (a generator), when building them all
        before one backward would keep several graphs alive. The loop backpropagates each term before asking for
        the next, so only one term's graph lives at a time; gradients add up to those of the summed loss and the
        optimizers step once. Under DDP the last term must run the role's whole (DDP-wrapped) forward, because
        that backward is the one that all-reduces the gradients accumulated by the terms before it."""
        ...

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        """Curricula (PD halving, ECT's Δt, phased-DMD stages): called at the start of every step, and for
        bookkeeping on resume and by probes, so it must not change weights (``begin_step`` does that); idempotent
        for a given ``step``. Returns scalars to log (may be empty)."""
        ...

    def student_grid(self) -> StudentGrid:
        """The grid the student is sampled on now: used by in-loop samples, ``sample`` and export."""
        ...


class Prepares(Protocol):
    """Optional hooks and attributes a method may have (the loop reads them with ``getattr`` and a default).

    * ``needs_real_data``: why the loss needs samples of the data distribution (e.g. DMD2's GAN term), or ``None``.
      A run whose data source would be the synthetic ``gaussian`` stand-in then stops with that reason.
    * ``reads_data`` (default ``True``): ``False`` for data-free losses, which use only the batch size and shape.
    * ``prepare(nets, ctx)``: derived data needed before training (DMD's teacher ODE pairs). Called once per run
      on every rank after the roles are built and before the run directory is touched, so a bad cache fails like
      any other bad input; work that writes files happens on the main process only. ``ValueError`` -> one line.
    * ``begin_step(step, nets)``: called by the loop once as ``step`` starts to run (after ``update_schedule``,
      which is bookkeeping only and also runs on resume and for probes): moves weights between roles at a curriculum
      boundary (progressive distillation's stage hand-over) and returns the roles whose optimizer state (Adam's
      moments) starts afresh, as the student faces a new target. Default: nothing.
    """

    needs_real_data: str | None
    reads_data: bool

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None: ...

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]: ...


@dataclass
class PrepareContext:
    """What ``prepare`` may use: where derived data is cached, and how to coordinate ranks."""

    cache_dir: Path
    sample_shape: tuple[int, ...]
    device: torch.device
    is_main_process: bool
    wait_for_everyone: Callable[[], None]
    #: how the student was initialised: ``teacher`` (its weights), ``new`` (the recipe's ``student.init``) or
    #: ``checkpoint`` (``train.init_from``: a run of this method trained it)
    student_init: str = "teacher"
    #: each optimised role's learning-rate restart period (``optim.<role>.period``; ``None``: none)
    lr_periods: dict[str, int | None] = field(default_factory=dict)
    #: the student EMA's decay per student update (``train.ema_decay``; 0: no EMA)
    ema_decay: float = 0.0
