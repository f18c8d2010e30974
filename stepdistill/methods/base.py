"""The method contract (DESIGN.md §3): everything a method may say to the training loop, in one place.

A method is a small object with named phases. The loop asks it which roles it needs, which phases run at a step and
which roles' optimizers step in each, and for per-sample losses; it never learns the method's name. Every hook has a
no-op default here, so a method overrides only what it uses and a reader sees the whole contract in this file.

The loop, not the method, keeps gradients where they belong: during a phase every role that the phase does not own
is frozen (its parameters take no gradient, though gradients flow through it to its inputs), and the owners'
gradients are averaged across processes after the phase's last backward. A loss may therefore call any role, any
number of times, in any order, without DDP or FSDP rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ..sampling import StudentGrid
from ..types import Batch, LossOutput, Nets, PrepareContext, RoleSpec


__all__ = ["Batch", "HandOver", "LossOutput", "Method", "Nets", "PrepareContext", "RoleSpec", "loss_terms"]


def loss_terms(out: LossOutput | Iterator[LossOutput]) -> Iterator[LossOutput]:
    """A method's answer for one phase as an iterator of terms (``Method.__call__``)."""
    return iter([out]) if isinstance(out, LossOutput) else out


class HandOver:
    """The detached samples a generator phase leaves for the critic phase of the same step, so that one generator
    pass serves both (DMD2's ``train_one_step``). One entry per micro-batch, taken in order; ``clear`` at the start of
    every step (``Method.begin_step``), since an earlier step's samples are not the current generator's. ``take``
    gives ``None`` when the generator phase did not run this step: the critic then draws its own sample."""

    def __init__(self):
        self._items: list[tuple] = []

    def clear(self) -> None:
        self._items.clear()

    def put(self, *item) -> None:
        self._items.append(item)

    def take(self) -> tuple | None:
        return self._items.pop(0) if self._items else None

    def __iter__(self):  # what is waiting, in order (for inspection)
        return iter(list(self._items))


class Method:
    """Base class of every distillation method. Subclasses set ``phases`` and implement ``roles``, ``__call__`` and
    ``student_grid``; the rest are optional hooks."""

    #: update order inside one training step, e.g. ``("student", "fake_score")``
    phases: tuple[str, ...] = ("student",)
    #: why the loss needs samples of the data distribution (e.g. DMD2's GAN term), or ``None``; a run whose data
    #: source would be the synthetic ``gaussian`` stand-in then stops with that reason
    needs_real_data: str | None = None
    #: ``False`` for data-free losses, which use only the batch size and shape
    reads_data: bool = True
    #: the method stands its own teacher samples in for data when the run has none (consistency distillation): a run
    #: with no data source then gets the ``gaussian`` stand-in, and ``prepare`` sees it as ``ctx.data_source``
    makes_samples: bool = False
    #: the losses back-propagate through the frozen teacher to its input (SiD, ADD, LADD): the teacher then gets
    #: gradient checkpointing and FSDP sharding like a trained role; methods that must not (DMD) call it under
    #: ``torch.no_grad()``
    teacher_grad: bool = False

    def roles(self) -> dict[str, RoleSpec]:
        """Roles beyond the frozen teacher, with how each is built (always includes ``student``)."""
        raise NotImplementedError

    def owner(self, phase: str) -> str | tuple[str, ...]:
        """The role (or roles, stepped together, e.g. DMD2's fake score and its GAN head) whose optimizers step in
        ``phase``."""
        return "student"

    def active_phases(self, step: int, update_every: Mapping[str, int]) -> tuple[str, ...]:
        """The phases that run at ``step``, in order. Default: a phase runs on the steps that are multiples of its
        ratio in ``update_every`` (``train.update_every``; 1 when absent), DMD2's two-time-scale rule. Methods with
        other schedules (phased DMD's alternating phases, rCM's DMD phases after the tangent warm-up) override it; it
        must depend on ``step`` alone, so every rank and a resumed run make the same choice."""
        return tuple(p for p in self.phases if step % update_every.get(p, 1) == 0)

    def __call__(self, phase: str, nets: Nets, batch: Batch) -> LossOutput | Iterator[LossOutput]:
        """The per-sample loss of ``phase``; or its terms one at a time (a generator), when building them all before
        one backward would keep several graphs alive. The loop backpropagates each term before asking for the next,
        so only one term's graph lives at a time; gradients add up to those of the summed loss and the optimizers
        step once."""
        raise NotImplementedError

    def prepare(self, nets: Nets, ctx: PrepareContext) -> None:
        """Derived data needed before training (DMD's teacher ODE pairs). Called once per run on every rank after the
        roles are built and before the run directory is touched, so a bad cache fails like any other bad input; work
        that writes files happens on the main process only. ``ValueError`` -> one line."""

    def begin_step(self, step: int, nets: Nets) -> tuple[str, ...]:
        """Called once as ``step`` starts to run (after ``update_schedule``): moves weights between roles at a
        curriculum boundary (progressive distillation's stage hand-over) and returns the roles whose optimizer state
        (Adam's moments) starts afresh."""
        return ()

    def after_update(self, phase: str, stepped: tuple[str, ...]) -> None:
        """Called after the optimizers of ``stepped`` really stepped in ``phase`` (not after an update the NaN/inf
        policy skipped), once the EMAs of those roles have followed."""

    def update_schedule(self, step: int, nets: Nets) -> dict[str, float]:
        """Curricula (PD halving, ECT's Δt, phased-DMD stages): called at the start of every step, and for bookkeeping
        on resume and by probes, so it must not change weights (``begin_step`` does that); idempotent for a given
        ``step``. Returns scalars to log (may be empty)."""
        return {}

    def sampling_roles(self) -> tuple[str, ...]:
        """The roles ``student_grid`` may name as experts: what reading a run back builds (with their EMAs)."""
        return ("student",)

    def student_grid(self) -> StudentGrid:
        """The grid the student is sampled on now: what in-loop samples, ``sample``, ``eval`` and export use."""
        raise NotImplementedError
