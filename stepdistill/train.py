"""THE training loop (DESIGN.md §3, §7): one accelerate loop for every method.

The loop asks the method which phases run at a step and for their per-sample losses; it never learns the method's
name. It owns what every method shares: per-role optimizers and LR schedules, gradient accumulation, bf16 autocast,
clipping, gradient placement (a phase's non-owners are frozen, the owners' gradients averaged over the processes),
EMA roles, the NaN/inf policy, logs, sample grids, checkpoints and exact resume. Building the run (``run.py``),
storing checkpoints (``checkpoints.py``) and export (``export.py``) are separate pieces it calls.

Lifecycle (torchtune style): ``Trainer(recipe, output_dir, ...)`` -> ``setup()`` (everything that can fail on bad
input happens here, before the run directory is touched) -> ``train()`` -> ``export()``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm

from .atomic import atomic_file
from .checkpoints import CheckpointStore, RunError, config_fingerprint, first_line
from .config import ConfigError, OptimizerConfig, Recipe, dump_recipe
from .export import check_exportable, check_grid_exportable
from .families import latents_to_images
from .methods.base import loss_terms
from .optim import check_optimizer, lr_factor, make_lr_schedule, make_optimizer
from .roles import broadcast_parameters, enable_gradient_checkpointing, frozen, sync_gradients, update_ema
from .run import (
    Run,
    build_run,
    check_compatible,
    data_map_config,
    init_from,
    load_run,
    make_data,
    method_error,
    probe_grid,
)
from .sampling import sample_student
from .sharding import full, load_local, reshard_optimizer_state, shard_backbone
from .stop import StopRequest
from .teachers import cache_root
from .types import PrepareContext
from .visualize import save_sample_grid


__all__ = ["SHARED_OFFSET", "RunError", "Trainer", "lr_factor", "rank_seed"]

SHARED_OFFSET = 29  # the stream every rank draws alike (``Batch.shared``): seed * 1000 + 29


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s data/noise seed, ``seed * 1000 + 17 + rank``, skipping the shared stream's seed: rank 12 and
    later move up by one, so no rank draws the shared stream's numbers (ranks 0-11 keep their seeds)."""
    offset = 17 + rank
    return seed * 1000 + offset + (offset >= SHARED_OFFSET)


class Trainer:
    """Distil ``recipe`` into ``output_dir``.

    Args:
        recipe: the validated recipe.
        output_dir: the run directory (DESIGN.md §6).
        resume: continue from the latest checkpoint in ``output_dir``.
        overwrite: replace an earlier run in ``output_dir``.
        show_progress: tqdm bar (main process only).
    """

    def __init__(self, recipe: Recipe, output_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True):
        self.recipe, self.dir = recipe, Path(output_dir)
        self.resume, self.overwrite, self.show_progress = resume, overwrite, show_progress
        self.step = 0
        self.nonfinite_streak: dict[str, int] = {}  # skipped updates in a row, per phase
        self.nonfinite_total = 0
        self.logs: dict[str, float] = {}  # the latest value of every logged key (restored on resume)
        self.ema_updates: dict[str, int] = {}  # updates each EMA role has followed (half-life ramp-up)
        self.store = CheckpointStore(self.dir / "checkpoints", keep=recipe.train.keep_checkpoints)

    # The run's pieces, for callers and tests.
    nets = property(lambda self: self.run.nets)
    method = property(lambda self: self.run.method)
    teacher = property(lambda self: self.run.teacher)
    conditions = property(lambda self: self.run.conditions)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Build everything; nothing is written before every input has been checked."""
        r = self.recipe
        self.trackers, missing = _available_trackers(r.train.trackers)
        _release_accelerator_state(r.train.mixed_precision)
        self.accelerator = acc = Accelerator(mixed_precision=r.train.mixed_precision,
                                             cpu=not torch.cuda.is_available(), log_with=self.trackers or None,
                                             project_dir=str(self.dir))
        if missing and acc.is_main_process:
            tqdm.write(f"note: trackers {missing} are not installed; logging to log.jsonl only")
        set_seed(r.seed)  # identical initialisation on every rank
        # FSDP2 sharding of the trainable roles (sharding.py): asked for by the recipe or by an accelerate FSDP config
        self.sharded = r.train.fsdp or acc.distributed_type == DistributedType.FSDP
        if self.sharded and not torch.distributed.is_initialized():
            raise ConfigError("train.fsdp: sharding needs a multi-process launch (accelerate launch "
                              "--num_processes N, or --config_file recipes/accelerate/fsdp.yaml)")

        # Teacher, method, roles and data: all bad input surfaces here, before the run directory is touched.
        self.run = build_run(r, is_main_process=acc.is_main_process, wait_for_everyone=acc.wait_for_everyone)
        if r.train.init_from is not None:
            if self.resume:  # a resumed run has its own weights; its student still came from that run
                self.run.student_init = "checkpoint"
            else:
                init_from(self.run, Path(r.train.init_from), is_main_process=acc.is_main_process)
        self.trainable = [k for k, s in self.run.specs.items() if s.trainable]
        self._check()
        self.data = make_data(self.run, is_main_process=acc.is_main_process, wait_for_everyone=acc.wait_for_everyone)
        self._prepare_method()
        self._prepare_run_dir()
        self._place_roles()

        # Per-rank data/noise generator (ranks draw different batches), and fixed noise for sample grids.
        self.generator = torch.Generator().manual_seed(rank_seed(r.seed, acc.process_index))
        self.shared_generator = torch.Generator().manual_seed(r.seed * 1000 + SHARED_OFFSET)  # alike on every rank
        n_show = r.train.num_sample_images
        self.sample_noise = torch.randn(n_show, *self.teacher.sample_shape,
                                        generator=torch.Generator().manual_seed(r.eval.seed))
        self.sample_cond = None  # the first prompts of the prompt file, cycled, for text-conditioned teachers
        if self.conditions is not None:
            rows = torch.arange(n_show) % next(iter(self.conditions.values())).shape[0]
            self.sample_cond = {k: v[rows].to(acc.device) for k, v in self.conditions.items()}
        if self.resume:
            self._load_checkpoint(self.store.latest())
            # Bring curricula to the checkpoint so student_grid() is right even if no step runs (bookkeeping only:
            # train() calls it again for the step it runs next, then the method's begin_step). The checkpoint holds
            # the student after step self.step - 1, so that step's grid (a stage boundary at self.step is not yet
            # crossed).
            self.method.update_schedule(max(min(self.step, r.train.max_steps) - 1, 0), self.nets)
            if acc.is_main_process:
                (self.dir / "config.yaml").write_text(dump_recipe(self.recipe))
                self._trim_log()
        return self

    def _check(self) -> None:
        """Settings that only show once the method and its roles exist; refused before training, not after it."""
        r, run = self.recipe, self.run
        unknown = set(r.train.update_every) - set(self.method.phases)
        if unknown:
            raise ConfigError(f"train.update_every: unknown phase(s) {sorted(unknown)}; this method's phases: "
                              f"{list(self.method.phases)}")
        for role in r.optim:
            if role not in self.trainable:
                raise ConfigError(f"optim.{role}: not a trainable role of {r.method.name!r}; roles: {self.trainable}")
            try:
                check_optimizer(r.optim[role], role)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.method.teacher_grad and r.roles.teacher_dtype != "float32" and r.train.mixed_precision == "no":
            raise ConfigError(f"roles.teacher_dtype: {r.method.name} back-propagates through the teacher, whose "
                              f"{r.roles.teacher_dtype} weights would give {r.roles.teacher_dtype} gradients without "
                              "autocast; set train.mixed_precision: bf16 or roles.teacher_dtype: float32")
        # The final student grid must be expressible by the teacher's schedule and the export format (DESIGN.md §6).
        schedule = self.teacher.denoiser.schedule
        try:
            grid = probe_grid(run)
            schedule.check_grid(grid.with_end())
            if r.export.pipeline:  # export must replay it too
                check_grid_exportable(self.nets.student, self.teacher, grid)
                check_exportable(self.nets.student, self.teacher)
        except ValueError as err:  # ExportError is a ValueError
            raise method_error(err) from None
        family = self.teacher.family
        if r.export.kohya and not (run.writes_lora() and not family.flow):
            raise ConfigError("export.kohya: kohya/webui files are written for LoRA students (roles.mode: lora) of "
                              f"SD1.5 and SDXL teachers; this run has roles.mode {r.roles.mode} and a "
                              f"{family.name if family else 'non-diffusers-family'} teacher")

    def _prepare_method(self) -> None:
        """The method's ``prepare`` hook: derived data such as DMD's ODE pairs."""
        acc, r = self.accelerator, self.recipe
        ctx = PrepareContext(cache_dir=cache_root(), sample_shape=tuple(self.teacher.sample_shape),
                             device=acc.device, is_main_process=acc.is_main_process,
                             wait_for_everyone=acc.wait_for_everyone, student_init=self.run.student_init,
                             lr_periods={role: cfg.period for role, cfg in r.optim.items()},
                             ema_decay=r.train.ema_decay, conditions=self.conditions, data_source=self.data.kind,
                             decode=self._decode())
        try:
            self.method.prepare(self.nets, ctx)
        except ValueError as err:
            raise method_error(err) from None

    def _decode(self):
        """Latent teachers' differentiable VAE decode on the run's device (``PrepareContext.decode``)."""
        vae, device = self.teacher.vae, self.accelerator.device
        if vae is None:
            return None

        def decode(latents: torch.Tensor) -> torch.Tensor:  # the VAE moves to the device only when a method decodes
            return latents_to_images(vae.to(device), latents, grad=True)

        return decode

    def _prepare_run_dir(self) -> None:
        d, acc = self.dir, self.accelerator
        earlier = d.exists() and any(d.iterdir())
        if self.resume:
            if not (d / "checkpoints").is_dir():
                raise RunError(f"--resume: {d} has no checkpoints/ to resume from")
            self.store.latest()  # fails early and clearly when none is complete
        elif earlier and not self.overwrite:
            raise RunError(f"{d} already holds files (an earlier run?); pass --resume to continue it or "
                           "--overwrite to replace it")
        elif earlier and not (d / "config.yaml").is_file():
            raise RunError(f"--overwrite: {d} holds files but no config.yaml, so it is not a stepdistill run; "
                           "refusing to delete it")
        acc.wait_for_everyone()
        if acc.is_main_process and not self.resume:  # a resumed run rewrites config.yaml once its checkpoint loads
            if earlier and self.overwrite:
                shutil.rmtree(d)
            (d / "samples").mkdir(parents=True, exist_ok=True)
            (d / "checkpoints").mkdir(exist_ok=True)
            (d / "config.yaml").write_text(dump_recipe(self.recipe))
        acc.wait_for_everyone()

    def _place_roles(self) -> None:
        """Roles onto the device; activation checkpointing and FSDP2 sharding of the networks that back-propagate (the
        trained roles, EMAs sharded like their source, the teacher when the method needs its input gradient); one
        optimizer and LR schedule per trained role."""
        r, acc, specs = self.recipe, self.accelerator, self.run.specs
        for net in self.nets.roles().values():
            net.to(acc.device)
        deep = [self.nets[k] for k in self.trainable] + ([self.nets.teacher] if self.method.teacher_grad else [])
        done = set()  # LoRA roles share one base: it is set up once
        self.fsdp_roots = []
        for net in deep + [self.nets[k] for k, s in specs.items() if s.init == "ema"]:
            if net.backbone is None or id(net.backbone) in done:
                continue
            done.add(id(net.backbone))
            if r.train.gradient_checkpointing:
                enable_gradient_checkpointing(net)
            if self.sharded:
                self.fsdp_roots.append(shard_backbone(net.backbone))
        self.optimizers, self.lr_schedulers = {}, {}
        for role in self.trainable:
            params = list(self.nets[role].trainable_parameters())
            if acc.num_processes > 1 and not self.sharded:
                broadcast_parameters(params)
            cfg = r.optim.get(role) or r.optim.get(specs[role].optim_of) or OptimizerConfig()
            try:
                self.optimizers[role] = make_optimizer(params, cfg, role)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self.lr_schedulers[role] = make_lr_schedule(self.optimizers[role], cfg, self._optimizer_steps(role))

    def _optimizer_steps(self, role: str) -> int:
        """How many optimizer steps ``role`` takes in the whole run: one per step in which a phase it owns runs."""
        every = self.recipe.train.update_every
        return sum(role in self._owners(phase) for step in range(self.recipe.train.max_steps)
                   for phase in self.method.active_phases(step, every))

    def _owners(self, phase: str) -> tuple[str, ...]:
        """The roles a phase optimises (a method's ``owner`` may name one or several)."""
        owner = self.method.owner(phase)
        return (owner,) if isinstance(owner, str) else tuple(owner)

    def _trim_log(self) -> None:
        """A resumed run logs the steps after its checkpoint again: drop their earlier rows (and a line cut short by
        the interruption), so ``log.jsonl`` holds each step once."""
        path = self.dir / "log.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= self.step:
                kept.append(line)
        if len(kept) != len(lines):
            with atomic_file(path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept))

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> dict:
        """Run to ``train.max_steps``; returns the last logged scalars."""
        r, acc = self.recipe, self.accelerator
        log_path = self.dir / "log.jsonl"
        if self.trackers:  # tensorboard / wandb, when installed; log.jsonl is always written by the loop itself
            acc.init_trackers("stepdistill", config=_flat(self.recipe.to_dict()))
        bar = tqdm(range(self.step, r.train.max_steps), initial=self.step, total=r.train.max_steps,
                   disable=not (self.show_progress and acc.is_main_process), desc=f"distill {r.method.name}")
        last, logs, tick, tick_step = {}, self.logs, time.perf_counter(), self.step
        if self.step >= r.train.max_steps:
            return last  # a finished run resumed without a larger budget: nothing to do, nothing rewritten
        checkpointed = False
        with StopRequest() as stop:
            for step in bar:
                self.step = step
                # ``logs`` keeps the latest value of every key: a phase may skip a logging step.
                logs.update({f"schedule/{k}": v for k, v in self.method.update_schedule(step, self.nets).items()})
                for role in self.method.begin_step(step, self.nets):
                    self.optimizers[role].state.clear()  # Adam re-creates zero moments at its next step
                for phase in self.method.active_phases(step, r.train.update_every):
                    phase_logs, updated = self._run_phase(phase)
                    logs.update(phase_logs)
                    if updated:
                        owners = self._owners(phase)
                        self._follow_emas(owners)
                        self.method.after_update(phase, owners)
                self.step = step + 1
                logged = self.step % r.train.log_every == 0 or self.step == r.train.max_steps
                if logged:
                    logs = self.logs = self._reduced(logs)  # device scalars: the one wait of a logging step
                    now = time.perf_counter()
                    logs["it_per_s"] = (self.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, self.step
                    last = {"step": self.step, **logs}
                    if acc.is_main_process:
                        with log_path.open("a") as f:
                            f.write(json.dumps(last) + "\n")
                        acc.log(logs, step=self.step)
                    bar.set_postfix({k.split("/", 1)[-1]: f"{v:.4g}" for k, v in logs.items() if k[:5] == "loss/"})
                if r.train.sample_every and self.step % r.train.sample_every == 0:
                    self.save_samples()
                checkpointed = bool(r.train.checkpoint_every) and self.step % r.train.checkpoint_every == 0
                if checkpointed:
                    self.save_checkpoint()
                if self._stop_agreed(stop, logged):
                    if not checkpointed:
                        self.save_checkpoint()
                    raise RunError(f"stopped by {stop.name or 'a signal'} at step {self.step}; the checkpoint is "
                                   "saved: continue with --resume")
        if not checkpointed:  # the last step's checkpoint, unless checkpoint_every just wrote it
            self.save_checkpoint()
        self.save_samples()
        for tracker in acc.trackers:  # the process group stays up: exports and a next run may still need it
            tracker.finish()
        return last

    def close(self) -> None:
        """End the run: trackers and, in a multi-process launch, the process group (``Accelerator.end_training``)."""
        self.accelerator.end_training()

    def _run_phase(self, phase: str) -> tuple[dict[str, float | torch.Tensor], bool]:
        """One phase: its loss terms over ``grad_accum`` micro-batches with every other trained role frozen, the
        owners' gradients averaged over the processes, clipping, and the owners' update; returns its logs and
        whether the update was made (not skipped by the NaN/inf policy)."""
        r, acc = self.recipe, self.accelerator
        roles = self._owners(phase)
        logs, k = {}, r.train.grad_accum
        bad_loss = torch.zeros((), device=acc.device)  # non-finite micro-batch losses, counted without a GPU wait
        with frozen([self.nets[role] for role in self.trainable if role not in roles]):
            for root in self.fsdp_roots:
                # An FSDP2 root that ran a forward without backward (a sample drawn under no_grad, in an earlier
                # phase or between steps) stays gathered, and its gathered parameters keep the requires_grad they
                # had then: a role frozen then would train now with its root-level parameters (conv_in, the time
                # embedding, conv_out) getting no gradient, a role trained then would collect gradients now. Sharded
                # again, every root gathers its parameters with this phase's flags.
                root.reshard()
            for _ in range(k):
                batch = self.data.next(self.generator)
                batch.shared = self.shared_generator
                batch.x0 = None if batch.x0 is None else batch.x0.to(acc.device)
                if batch.cond is not None:
                    batch.cond = {c: v.to(acc.device) for c, v in batch.cond.items()}
                if batch.x0_cond is not None:
                    batch.x0_cond = {c: v.to(acc.device) for c, v in batch.x0_cond.items()}
                for out in self._loss_terms(phase, batch):
                    loss = out.loss.float().mean() / k
                    bad_loss += (~torch.isfinite(loss)).float()
                    acc.backward(loss)  # even when not finite: every rank runs the same collectives; the update skips
                    for name, value in out.logs.items():
                        logs[f"{name}/{phase}"] = logs.get(f"{name}/{phase}", 0.0) + value / k
        max_norm = r.train.max_grad_norm if r.train.max_grad_norm is not None else float("inf")
        norms = {}
        for role in roles:
            params = list(self.nets[role].trainable_parameters())
            if not self.sharded:  # FSDP2 reduce-scatters sharded gradients itself
                sync_gradients(params, acc.num_processes)
            params = [p for p in params if p.grad is not None]
            norms[role] = full(torch.nn.utils.clip_grad_norm_(params, max_norm))  # FSDP: the global norm
        loss_ok, grad_ok = self._all_finite(bad_loss, norms.values())
        if not (loss_ok and grad_ok):
            return self._skip(phase, roles, "gradient" if loss_ok else "loss"), False
        for role in roles:
            opt = self.optimizers[role]
            opt.step()
            self.lr_schedulers[role].step()
            opt.zero_grad(set_to_none=True)
            logs[f"grad_norm/{role}"] = norms[role].detach()
            logs[f"lr/{role}"] = self.lr_schedulers[role].get_last_lr()[0]
        self.nonfinite_streak[phase] = 0
        return logs, True

    def _loss_terms(self, phase: str, batch):
        """The phase's loss as the method gives it, a ``LossOutput`` or a generator of them (``Method.__call__``),
        each computed under autocast; backward runs outside it, between terms. The call itself is inside autocast
        too: a method that returns its ``LossOutput`` computes it there (a generator only starts at ``next``)."""
        with self.accelerator.autocast():
            terms = loss_terms(self.method(phase, self.nets, batch))
        while True:
            with self.accelerator.autocast():
                out = next(terms, None)
            if out is None:
                return
            yield out

    def _follow_emas(self, stepped: tuple[str, ...]) -> None:
        """Every EMA role whose source just stepped follows it (``RoleSpec.ema_of``)."""
        for role, spec in self.run.specs.items():
            if spec.init != "ema" or spec.ema_of not in stepped:
                continue
            n = self.ema_updates[role] = self.ema_updates.get(role, 0) + 1
            ema, source = self.nets[role], self.nets[spec.ema_of]
            if self.sharded:  # an FSDP2 root keeps its weights gathered after a forward without backward: shard them
                for net in (source, ema):
                    net.backbone.reshard()
            update_ema(ema, source, spec.ema_decay(n))

    def _reduced(self, logs: dict) -> dict[str, float]:
        """``logs`` as floats, averaged over the ranks (every rank logs the same keys: they take the same branches)."""
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float64).to(self.accelerator.device).reshape(())
                              for k in keys]) if keys else torch.zeros(0)
        if self.accelerator.num_processes > 1 and keys:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _stop_agreed(self, stop: StopRequest, logged: bool) -> bool:
        """Whether a stop signal arrived, agreed by every rank so they all checkpoint the same step. Several
        processes compare flags at logging steps only, which wait for the device anyway."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.name is not None
        if not logged:
            return False
        flag = torch.tensor([float(stop.name is not None)], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def _all_finite(self, bad_loss: torch.Tensor, norms) -> tuple[bool, bool]:
        """Whether the losses and the gradient norms were finite on every rank (so every rank skips or steps
        together). One reduce and one wait for the GPU per phase: the flags stay on the device until here."""
        bad_grad = sum((~torch.isfinite(n)).float().to(bad_loss.device) for n in norms)
        flags = torch.stack([bad_loss, torch.as_tensor(bad_grad, dtype=torch.float32, device=bad_loss.device)])
        loss_bad, grad_bad = self.accelerator.reduce(flags, reduction="sum").tolist()
        return loss_bad == 0, grad_bad == 0

    def _skip(self, phase: str, roles: tuple[str, ...], what: str) -> dict[str, float]:
        """The NaN/inf policy (DESIGN.md §7): count, log, skip the update; abort after too many in a row. Streaks are
        per phase: a critic that keeps updating must not hide a student whose every update is skipped."""
        for role in roles:
            self.optimizers[role].zero_grad(set_to_none=True)
        streak = self.nonfinite_streak[phase] = self.nonfinite_streak.get(phase, 0) + 1
        self.nonfinite_total += 1
        limit = self.recipe.train.max_nonfinite
        if self.accelerator.is_main_process:
            tqdm.write(f"step {self.step}: non-finite {what} in phase {phase!r}; update skipped "
                       f"({streak}/{limit} in a row)")
        if streak >= limit:
            raise RunError(f"non-finite {what} in {streak} consecutive updates of phase {phase!r} (step "
                           f"{self.step}); lower the learning rate or raise train.max_nonfinite")
        return {f"nonfinite/{phase}": float(self.nonfinite_total)}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpointed_roles(self) -> list[str]:
        specs = self.run.specs
        return [k for k, s in specs.items() if s.trainable or s.checkpointed or s.init == "ema"]

    def _sharded_roles(self) -> list[str]:
        specs = self.run.specs
        return sorted(k for k, s in specs.items() if s.trainable or s.init == "ema") if self.sharded else []

    def save_checkpoint(self) -> Path:
        """Every role, optimizer, LR schedule and RNG stream, and the loop's counters (``checkpoints.py``)."""
        acc = self.accelerator
        rng = {"data": self.generator.get_state(), "shared": self.shared_generator.get_state(),
               "torch": torch.get_rng_state()}
        state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak,
                 "nonfinite_total": self.nonfinite_total, "logs": {k: float(v) for k, v in self.logs.items()},
                 "ema_updates": self.ema_updates, "world_size": acc.num_processes,
                 "fingerprint": config_fingerprint(self.recipe), "method": self.recipe.to_dict()["method"],
                 "sharded_roles": self._sharded_roles(), "data_map": data_map_config(self.teacher)}
        return self.store.save(
            self.step, roles={role: self.nets[role].role_state_dict() for role in self._checkpointed_roles()},
            sharded=self._sharded_roles(),
            optimizers={role: {"optimizer": opt.state_dict(), "lr_scheduler": self.lr_schedulers[role].state_dict()}
                        for role, opt in self.optimizers.items()},
            rng=rng, state=state, rank=acc.process_index, is_main_process=acc.is_main_process,
            barrier=acc.wait_for_everyone, any_rank=self._any_rank)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank must call it)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    def latest_checkpoint(self) -> Path:
        return self.store.latest()

    def _load_checkpoint(self, path: Path) -> None:
        """Restore every role, optimizer, LR schedule, RNG stream and the step; refuse incompatible checkpoints."""
        acc, store = self.accelerator, self.store
        state = store.read_state(path)
        check_compatible(state, self.recipe, path, "--resume", self.teacher)
        if state.get("world_size") != acc.num_processes:
            raise RunError(f"--resume: checkpoint {path} was written by {state.get('world_size')} process(es); "
                           f"exact resume needs the same number, got {acc.num_processes}")
        if state.get("sharded_roles", []) != self._sharded_roles():
            raise RunError(f"--resume: checkpoint {path} has sharded roles {state.get('sharded_roles', [])}, "
                           f"this run shards {self._sharded_roles()}; resume with the same train.fsdp / launch config")
        rank, sharded = acc.process_index, self._sharded_roles()
        try:
            for role in self._checkpointed_roles():
                saved = store.read_local_role(path, role, rank, role in sharded)
                if role in sharded:
                    load_local(self.nets[role].role_state_dict(), saved)
                else:
                    self.nets[role].load_role_state_dict(saved)
            for role, opt in self.optimizers.items():
                blob = store.read_optimizer(path, role, rank, role in sharded)
                opt.load_state_dict(blob["optimizer"])
                reshard_optimizer_state(opt)
                self.lr_schedulers[role].load_state_dict(blob["lr_scheduler"])
            rng = store.read_rng(path, rank)
        except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same user-facing problem
            raise RunError(f"--resume: corrupt or incompatible checkpoint {path}: {first_line(err)}") from None
        self.generator.set_state(rng["data"])
        if "shared" in rng:  # checkpoints written before Batch.shared existed lack it
            self.shared_generator.set_state(rng["shared"])
        torch.set_rng_state(rng["torch"])
        self.step = int(state["step"])
        streak = state.get("nonfinite_streak", {})
        self.nonfinite_streak = dict(streak) if isinstance(streak, dict) else {}  # older checkpoints: one int
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.logs = dict(state.get("logs", {}))
        self.ema_updates = dict(state.get("ema_updates", {}))

    # ------------------------------------------------------------------------------------------------ outputs
    def sampling_student(self):
        """The student used for samples and export: the EMA when there is one and the recipe asks for it."""
        return self.run.sampling_student()

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        # A sharded student's forward is collective: every rank samples, the main process writes.
        if not (self.accelerator.is_main_process or self.sharded):
            return None
        student = self.sampling_student()
        was_training = student.training
        student.eval()
        x = sample_student(student, self.sample_noise.to(self.accelerator.device), self.method.student_grid(),
                           cond=self.sample_cond,
                           generator=torch.Generator().manual_seed(self.recipe.eval.seed + 1))  # re-noising grids
        student.train(was_training)
        if not self.accelerator.is_main_process:
            return None
        if self.teacher.vae is not None:  # latent teachers: show decoded images
            # The VAE visits the device only to decode: left there it would hold its weights (SD1.5's: 320 MiB in
            # float32) on the GPU for the rest of training, beside the networks being trained.
            vae = self.teacher.vae
            home = next(vae.parameters()).device
            try:
                x = latents_to_images(vae.to(x.device), x)
            finally:
                vae.to(home)
        path = self.dir / "samples" / f"step-{self.step}.png"
        teacher = self.teacher  # vector teachers: shown in the data's own coordinates (teacher.gmm.normalize)
        save_sample_grid(teacher.to_data(x.cpu()), path, mixture=teacher.data_mixture or teacher.mixture)
        return path

    def readable_run(self) -> Run:
        """The trained run with whole weights: under sharding read back from the latest (sharded) checkpoint, which
        ``train()`` always writes last, so export needs no collective and runs on the main process alone."""
        return load_run(self.dir) if self.sharded else self.run

    def export(self, output_dir: str | Path | None = None) -> Path | None:
        """Write ``pipeline/`` (DESIGN.md §6) from the trained student."""
        from .export import export_pipeline

        if not self.accelerator.is_main_process:
            return None
        run = self.readable_run()
        return export_pipeline(run.sampling_student(), run.teacher, run.grid, self.recipe,
                               Path(output_dir) if output_dir else self.dir / "pipeline")

    def writes_lora(self) -> bool:
        return self.run.writes_lora()

    def export_lora(self, output_dir: str | Path | None = None, *, kohya: bool = False) -> Path | None:
        """Write ``lora/`` (DESIGN.md §6): the student adapter as a diffusers/PEFT LoRA file (+ kohya)."""
        from .export import export_lora

        if not self.accelerator.is_main_process:
            return None
        run = self.readable_run()
        return export_lora(run.sampling_student(), run.teacher, run.grid, self.recipe,
                           Path(output_dir) if output_dir else self.dir / "lora", kohya=kohya)


def _release_accelerator_state(mixed_precision: str) -> None:
    """Let a second Trainer in one process use another precision.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a new ``Accelerator`` with a different
    ``mixed_precision``. The per-process distributed state (``PartialState``: the process group) is kept.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _available_trackers(names: list[str]) -> tuple[list[str], list[str]]:
    """Split requested trackers into (installed, missing); ``jsonl`` is built in and never listed."""
    import importlib.util

    wanted = [t for t in names if t != "jsonl"]
    usable = [t for t in wanted if importlib.util.find_spec(t) is not None]
    return usable, sorted(set(wanted) - set(usable))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

