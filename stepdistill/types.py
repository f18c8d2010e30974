"""The data types every layer shares (DESIGN.md §3-4): role specifications, the networks of a run, a batch and a
loss. Dependency-free within the package, so roles, data, methods and the loop import them without importing each
other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn


if TYPE_CHECKING:  # annotations only: denoisers.py imports nothing from here
    from .denoisers import Denoiser

#: how a role is made (``RoleSpec.init``)
INITS = ("teacher", "student", "new", "ema", "build")


@dataclass(frozen=True)
class RoleSpec:
    """How the loop builds one role (DESIGN.md §4). Roles are built in declaration order, ``student`` first.

    Attributes:
        init: ``"teacher"`` (a copy of the teacher's backbone; with the exact GMM teacher, which has no weights, a
            fresh network of the student's architecture), ``"student"`` (a copy of the student), ``"new"`` (the
            student's architecture, freshly initialised); ``"ema"`` and ``"build"`` are set by ``ema_of`` and
            ``build``.
        trainable: gets an optimizer; its parameters only receive gradients in the phases it owns (the loop
            freezes every other role's parameters during a phase).
        checkpointed: saved and restored with checkpoints (trainable roles and EMAs always are).
        prediction: the role's output parameterisation (``x0 | eps | v | flow | flow_match``); ``None`` keeps the
            source's.
        guidance: the role takes a per-sample guidance scale ``cond["guidance"]`` and samples at this one when none
            is given (the w-conditioned student of guided distillation); ``None``: no guidance input.
        end_time: the role takes a second time, the end ``cond["r"]`` of a flow-map jump (MeanFlow's average
            velocity; ``Denoiser.with_end_time``).
        ema_of: an exponential moving average of that role's weights, updated by the loop after each update the
            source really made (never after a skipped one). Frozen; with ``roles.mode: lora`` a frozen adapter on the
            shared base; sharded like its source under FSDP. Give ``decay`` or ``halflife``.
        decay: EMA decay per source update, ``ema <- decay * ema + (1 - decay) * source``.
        halflife: EMA half-life in source updates (``decay = 0.5 ** (1 / halflife)``), optionally ramped up as EDM
            does (``rampup``: the half-life is at most ``rampup`` times the updates made so far).
        rampup: see ``halflife``.
        optim_of: the role whose ``optim.<role>`` recipe settings this one takes when the recipe names none for it
            (phased DMD's per-phase experts train like the student).
        build: ``build(nets) -> nn.Module``, for networks that are not backbone copies (a GAN head on another role's
            features, an MLP, a feature network); ``nets`` holds the roles built so far. Any ``nn.Module`` works;
            it is trained, checkpointed and sharded like the other roles.
    """

    init: str = "teacher"
    trainable: bool = True
    checkpointed: bool = True
    prediction: str | None = None
    guidance: float | None = None
    end_time: bool = False
    ema_of: str | None = None
    decay: float | None = None
    halflife: float | None = None
    rampup: float | None = None
    build: Callable[[Nets], nn.Module] | None = None
    optim_of: str | None = None

    def __post_init__(self):
        if self.ema_of is not None:
            object.__setattr__(self, "init", "ema")
            object.__setattr__(self, "trainable", False)
            if (self.decay is None) == (self.halflife is None):
                raise ValueError(f"an EMA of {self.ema_of!r} needs exactly one of decay or halflife")
            if self.decay is not None and not 0.0 <= self.decay < 1.0:  # NaN fails it too
                raise ValueError(f"an EMA decay must be in [0, 1), got {self.decay}")
            if self.halflife is not None and not self.halflife > 0:
                raise ValueError(f"an EMA half-life must be positive, got {self.halflife}")
            if self.rampup is not None and not self.rampup > 0:
                raise ValueError(f"an EMA ramp-up must be positive, got {self.rampup}")
        elif self.build is not None:
            object.__setattr__(self, "init", "build")
        elif self.init in ("ema", "build"):
            raise ValueError(f"RoleSpec(init={self.init!r}) is set by {'ema_of' if self.init == 'ema' else 'build'}")
        if self.init not in INITS:
            raise ValueError(f"RoleSpec.init must be one of {INITS}, got {self.init!r}")

    def ema_decay(self, updates: int) -> float:
        """The decay of the ``updates``-th update of the source (counted from 1)."""
        if self.decay is not None:
            return self.decay
        halflife = self.halflife if self.rampup is None else min(self.halflife, self.rampup * updates)
        return 0.5 ** (1.0 / max(halflife, 1e-8))


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

    def __contains__(self, role: str) -> bool:
        return role in ("student", "teacher") or role in self.extra

    def get(self, role: str, default=None):
        return self[role] if role in self else default

    def roles(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, **self.extra}


def noise_like(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` and of its dtype, drawn on the CPU from ``generator`` (the same
    numbers on any device) and moved to ``like``'s device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


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

    def noise(self) -> torch.Tensor:
        """Standard normal noise shaped like ``x0``, drawn from ``generator`` on the CPU (the same numbers on any
        device) and moved to ``x0``'s device: a generator's input. Data-free runs get the ``gaussian`` stand-in batch,
        whose ``x0`` only gives the shape."""
        if self.x0 is None:
            raise ValueError("this method needs batches with x0 for the sample shape")
        return torch.randn(self.x0.shape, generator=self.generator).to(self.x0.device)


class LossOutput(NamedTuple):
    """Per-sample loss ``[B]`` (the loop reduces it) and detached scalars for the log.

    Log values may stay 0-d tensors (and should, on a GPU): the loop turns them into floats only on logging steps,
    since each ``float()`` of a device tensor makes the host wait for the GPU."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor]


@dataclass
class PrepareContext:
    """What ``Method.prepare`` may use: where derived data is cached, and how to coordinate ranks."""

    cache_dir: Path
    sample_shape: tuple[int, ...]
    device: torch.device
    is_main_process: bool
    wait_for_everyone: Callable[[], None]
    #: how the student was initialised: ``teacher`` (its weights), ``new`` (the recipe's ``student.init``, or a
    #: teacher without weights) or ``checkpoint`` (``train.init_from``: a run of this method trained it)
    student_init: str = "teacher"
    #: each optimised role's learning-rate restart period (``optim.<role>.period``; ``None``: none)
    lr_periods: dict[str, int | None] = field(default_factory=dict)
    #: the student EMA's decay per student update (``train.ema_decay``; 0: no EMA)
    ema_decay: float = 0.0
    #: the prompt table of text-conditioned teachers (``{key: [N, ...]}``), for derived data that needs conditions
    #: (teacher ODE pairs of text teachers); ``None`` otherwise
    conditions: dict[str, torch.Tensor] | None = None
    #: the run's data source (``gmm``, ``digits``, ``image_folder``, or ``gaussian``: a stand-in that is not data)
    data_source: str | None = None
    #: latent teachers: ``decode(latents) -> images`` in [-1, 1] through the teacher's VAE, differentiable (a
    #: discriminator on pixels, ADD); ``None`` for teachers that work on pixels or vectors
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
