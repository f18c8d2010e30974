"""The method interface (DESIGN.md §3). Interface only: no logic lives here.

A method is a small object with named phases. The training loop asks it which roles it needs, which role's
optimizer steps in each phase, and for a per-sample loss; it never learns the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..denoisers import Denoiser
from ..sampling import StudentGrid


@dataclass(frozen=True)
class RoleSpec:
    """How the loop builds one role.

    Attributes:
        init: ``"teacher"`` (a copy of the teacher's backbone), ``"student"`` (a copy of the student) or ``"new"``
            (the student's architecture, freshly initialised).
        trainable: gets an optimizer and, under DDP, a wrapper.
        checkpointed: saved and restored with checkpoints (trainable roles always are).
        prediction: the role's output parameterisation (``x0 | eps | v | flow``); ``None`` keeps the source's.
    """

    init: str = "teacher"
    trainable: bool = True
    checkpointed: bool = True
    prediction: str | None = None


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

    @property
    def size(self) -> int:
        return self.x0.shape[0] if self.x0 is not None else next(iter(self.cond.values())).shape[0]


class LossOutput(NamedTuple):
    """Per-sample loss ``[B]`` (the loop reduces it) and detached scalars for the log."""

    loss: torch.Tensor
    logs: dict[str, float]


class Method(Protocol):
    """What the training loop needs of a method."""

    #: update order inside one training step, e.g. ``("fake_score", "student")``
    phases: tuple[str, ...]

    def roles(self) -> dict[str, RoleSpec]:
        """Roles beyond the frozen teacher, with how each is initialised (always includes ``student``)."""
        ...

    def owner(self, phase: str) -> str:
        """The role whose optimizer steps in ``phase``."""
        ...

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput:
        """The per-sample loss of ``phase``."""
        ...

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        """Curricula (PD halving, ECT's Δt, phased-DMD stages): called at the start of every step, idempotent
        for a given ``step``. Returns scalars to log (may be empty)."""
        ...

    def student_grid(self) -> StudentGrid:
        """The grid the student is sampled on now: used by in-loop samples, ``sample`` and export."""
        ...
