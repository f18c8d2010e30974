"""THE training loop (DESIGN.md §3, §7): one accelerate loop for every method.

The loop asks the method for its roles, phases and per-sample losses; it never learns the method's name. It owns
what every method shares: per-role optimizers and LR schedules, ``update_every``, gradient accumulation, bf16
autocast, clipping, the student EMA, the NaN/inf policy, logs, sample grids, atomic checkpoints and exact resume
(the checkpoint methods live in ``checkpoints.py``).

Lifecycle (torchtune style): ``Trainer(recipe, output_dir, ...)`` -> ``setup()`` (everything that can fail on bad
input happens here, before the run directory is touched) -> ``train()`` -> ``export()``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm import tqdm

from .atomic import atomic_file
from .checkpoints import Checkpoints, RunError
from .conditioning import load_or_encode, read_prompts
from .config import ConfigError, OptimizerConfig, Recipe, dump_recipe
from .data import DataSource, image_captions, latent_table
from .export import check_exportable, grid_timesteps, student_scheduler
from .families import latents_to_images
from .lora import AdapterDenoiser
from .methods import METHODS
from .methods.base import PrepareContext, loss_terms
from .roles import build_nets, rebuilt_lora_student
from .sampling import sample_student
from .schedules import VPDiscrete
from .sharding import full, shard_backbone
from .stop import StopRequest
from .teachers import TeacherError, cache_root, load_teacher
from .visualize import save_sample_grid


def lr_factor(step: int, cfg: OptimizerConfig, total: int | None = None) -> float:
    """Multiplier of the base LR at optimizer step ``step``: warmup, then constant / linear-to-0 / cosine-to-0
    within a period: ``cfg.period`` (restarting), else the ``total`` optimizer steps the role gets in the run."""
    if cfg.period:
        step = step % cfg.period
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    period = cfg.period or total
    if cfg.schedule == "constant" or not period:
        return 1.0
    frac = min(1.0, (step - cfg.warmup) / max(1, period - cfg.warmup))
    return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def _method_error(err: Exception) -> ConfigError:
    """A method's refusal as one line: its message names the recipe key (``method.<key>: ...``, ``export: ...``),
    or is put under ``method:``."""
    message = str(err)
    return ConfigError(message if message.startswith(("method.", "method:", "export:")) else f"method: {message}")


SHARED_OFFSET = 29  # the stream every rank draws alike (``Batch.shared``): seed * 1000 + 29


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s data/noise seed, ``seed * 1000 + 17 + rank``, skipping the shared stream's seed: rank 12 and
    later move up by one, so no rank draws the shared stream's numbers (ranks 0-11 keep their seeds)."""
    offset = 17 + rank
    return seed * 1000 + offset + (offset >= SHARED_OFFSET)


class Trainer(Checkpoints):
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

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, *, readonly: bool = False) -> Trainer:
        """Build everything; ``readonly`` loads the latest checkpoint for sampling/export without writing."""
        r = self.recipe
        self.trackers, missing = _available_trackers(r.train.trackers)
        _release_accelerator_state(r.train.mixed_precision)
        # LoRA roles share one DDP-wrapped base, and each phase uses one adapter of it: DDP must expect unused
        # parameters (ECOSYSTEM.md §3.2 (c)).
        ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if r.roles.mode == "lora" else []
        self.accelerator = Accelerator(mixed_precision=r.train.mixed_precision, cpu=not torch.cuda.is_available(),
                                       log_with=self.trackers or None, project_dir=str(self.dir),
                                       kwargs_handlers=ddp)
        if missing and self.accelerator.is_main_process:
            tqdm.write(f"note: trackers {missing} are not installed; logging to log.jsonl only")
        acc = self.accelerator
        set_seed(r.seed)  # identical initialisation on every rank
        self.readonly = readonly
        # FSDP2 sharding of the trainable roles (sharding.py): asked for by the recipe or by an accelerate FSDP config.
        # A read-only setup (export, sample) consolidates a sharded checkpoint instead, in any number of processes.
        self.sharded = (r.train.fsdp or acc.distributed_type == DistributedType.FSDP) and not readonly
        if self.sharded:
            if not torch.distributed.is_initialized():
                raise ConfigError("train.fsdp: sharding needs a multi-process launch (accelerate launch "
                                  "--num_processes N, or --config_file recipes/accelerate/fsdp.yaml)")

        # Teacher and method: all bad input surfaces here, before the run directory is touched.
        try:
            self.teacher = load_teacher(r.teacher, dtype=self._load_dtype)
        except TeacherError as err:
            raise RunError(str(err)) from None
        self.conditions = self._encode_prompts()  # before the roles are built: they copy the null condition
        try:
            self.method = METHODS[r.method.name](**r.method.params)
        except (TypeError, ValueError) as err:
            raise _method_error(err) from None
        specs = self.method.roles()
        try:
            self.nets = build_nets(self.teacher, specs, student_init=r.student.init, ema=r.train.ema_decay > 0,
                                   roles=r.roles)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if r.train.init_from is not None and not (self.resume or readonly):  # a resumed run has its own weights
            self._init_from(Path(r.train.init_from))
        self._set_attention_backend()
        self._check_grids()
        unknown = set(r.train.update_every) - set(self.method.phases)
        if unknown:
            raise ConfigError(f"train.update_every: unknown phase(s) {sorted(unknown)}; this method's phases: "
                              f"{list(self.method.phases)}")
        for role in r.optim:
            if role not in specs or not specs[role].trainable:
                trainable = [k for k, s in specs.items() if s.trainable]
                raise ConfigError(f"optim.{role}: not a trainable role of {r.method.name!r}; roles: {trainable}")
        self.data = self._make_data()
        if readonly:
            self.resume = True
        else:
            self._prepare_method()
            self._prepare_run_dir()

        # Place roles; wrap trainable backbones (DDP/FSDP) and build their optimizers.
        self.trainable = {k for k, s in specs.items() if s.trainable}
        self.optimizers, self.lr_schedulers = {}, {}
        wrapped = {}  # LoRA roles share one base: it is wrapped once and every role routes through that wrapper
        for role, net in self.nets.roles().items():
            net.to(acc.device)
            if role in self.trainable:
                if id(net.backbone) not in wrapped:
                    if r.train.gradient_checkpointing:
                        net.enable_gradient_checkpointing()
                    wrapped[id(net.backbone)] = (shard_backbone(net.backbone) if self.sharded
                                                 else acc.prepare_model(net.backbone))
                net.wrap_backbone(wrapped[id(net.backbone)])
                ocfg = r.optim.get(role, OptimizerConfig())
                params = list(net.trainable_parameters())
                opt = torch.optim.AdamW(params, lr=ocfg.lr, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay,
                                        eps=ocfg.eps, fused=_fusable(params) or None)
                self.optimizers[role] = opt
                self.lr_schedulers[role] = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda i, c=ocfg, n=self._optimizer_steps(role): lr_factor(i, c, n))
            elif role == "student_ema" and self.sharded:  # sharded like the student, so the EMA update is shard-local
                shard_backbone(net.backbone)

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
            self.load_checkpoint(self.latest_checkpoint())
            # Bring curricula to the checkpoint so student_grid() is right even if no step runs (bookkeeping only:
            # train() calls it again for the step it runs next, then the method's begin_step). The checkpoint holds
            # the student after step self.step - 1, so that step's grid (a stage boundary at self.step is not yet
            # crossed).
            self.method.update_schedule(max(min(self.step, r.train.max_steps) - 1, 0), self.nets)
            if not readonly and acc.is_main_process:
                (self.dir / "config.yaml").write_text(dump_recipe(self.recipe))
                self._trim_log()
        return self

    @property
    def _load_dtype(self) -> str:
        """What a pretrained backbone is loaded in: a LoRA base stays in ``roles.teacher_dtype`` throughout, while
        full copies start from the teacher's float32 weights."""
        r = self.recipe
        return r.roles.teacher_dtype if r.roles.mode == "lora" else "float32"

    def _optimizer_steps(self, role: str) -> int:
        """How many optimizer steps ``role`` takes in the whole run: one per run of each phase it owns, a phase
        running on the steps that are multiples of its ``train.update_every`` ratio."""
        r = self.recipe
        return sum(math.ceil(r.train.max_steps / r.train.update_every.get(phase, 1))
                   for phase in self.method.phases if role in self._owners(phase))

    def _owners(self, phase: str) -> tuple[str, ...]:
        """The roles a phase optimises (a method's ``owner`` may name one or several)."""
        owner = self.method.owner(phase)
        return (owner,) if isinstance(owner, str) else tuple(owner)

    def _set_attention_backend(self) -> None:
        """``train.attention_backend``: diffusers' default SDPA, or xformers when installed (CUDA only)."""
        if self.recipe.train.attention_backend != "xformers":
            return
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ConfigError("train.attention_backend: xformers is not installed (it needs CUDA: pip install "
                              "xformers); use sdpa, torch's fused attention, which is the default")
        backbones = {id(n.backbone): n.backbone for n in self.nets.roles().values() if n.backbone is not None}
        for backbone in backbones.values():
            if not hasattr(backbone, "enable_xformers_memory_efficient_attention"):
                raise ConfigError(f"train.attention_backend: {type(backbone).__name__} has no xformers switch")
            backbone.enable_xformers_memory_efficient_attention()

    def _check_grids(self) -> None:
        """The final student grid must be expressible by the teacher's schedule and the export format (DESIGN.md §6),
        and a kohya file asked for must be writable: refused before training, not after it."""
        probe = copy.deepcopy(self.method)
        schedule = self.teacher.denoiser.schedule
        try:
            probe.update_schedule(self.recipe.train.max_steps - 1, self.nets)
            grid = probe.student_grid()
            schedule.check_grid(grid.with_end())
            if isinstance(schedule, VPDiscrete) and self.recipe.export.pipeline:  # export must replay it too
                student_scheduler(self.teacher.scheduler_config, self.nets.student.prediction, grid,
                                  grid_timesteps(schedule, grid), call_timesteps=self.teacher.family is not None)
            if self.recipe.export.pipeline:
                check_exportable(self.nets.student, self.teacher)
        except ValueError as err:  # ExportError is a ValueError
            raise _method_error(err) from None
        family = self.teacher.family
        if self.recipe.export.kohya and not (self.writes_lora() and not family.flow):
            raise ConfigError("export.kohya: kohya/webui files are written for LoRA students (roles.mode: lora) of "
                              f"SD1.5 and SDXL teachers; this run has roles.mode {self.recipe.roles.mode} and a "
                              f"{family.name if family else 'non-diffusers-family'} teacher")

    def _encode_prompts(self) -> dict[str, torch.Tensor] | None:
        """Text-conditioned teachers: the prompt table (cached, ``conditioning.py``) and the teacher's null condition.

        The text encoders are loaded only on a cache miss, on the main process, and dropped right after encoding.
        """
        r, t = self.recipe, self.teacher
        if t.family is None:
            if r.data.prompts:
                raise ConfigError(f"data.prompts: the teacher ({t.source}) is not text-conditioned; remove the key")
            return None
        if not r.data.prompts:
            raise ConfigError(f"data.prompts: a text-conditioned teacher ({t.family.name}) needs a prompt file, one "
                              "prompt per line")
        try:
            table, null = self._encode_texts(read_prompts(r.data.prompts))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        t.denoiser.set_null_condition(null)
        return table

    def _make_data(self) -> DataSource:
        r, t, m = self.recipe, self.teacher, self.method
        needs_real = getattr(m, "needs_real_data", None)  # why the loss needs data samples, or None
        source = r.data.source
        if source is None:  # derive one from the teacher; "gaussian" is a stand-in, never real data
            derived = {"gmm": "gmm", "embedded": "digits", "tiny": "gaussian"}.get(r.teacher.source())
            if not getattr(m, "reads_data", True):
                derived = derived or "gaussian"  # data-free: only the batch size and shape are used
            if derived is None and needs_real is None:
                raise ConfigError("data.source: a pretrained teacher needs a data source (image_folder with "
                                  "data.path)")
            source = derived
        if needs_real is not None and source in (None, "gaussian"):
            raise ConfigError(f"data.source: {needs_real} needs a real-data source; set data.source to "
                              f"image_folder (with data.path), digits or gmm (got {source or 'none'})")
        try:
            latents = captions = None
            if source == "image_folder" and t.family is not None:
                if not r.data.path:
                    raise ValueError("data.source image_folder needs data.path")
                latents = latent_table(r.data.path, t, cache_root())
                captions = self._encode_captions(r.data.path, needs_real)
            return DataSource(source, batch_size=r.data.batch_size, sample_shape=t.sample_shape, mixture=t.mixture,
                              path=r.data.path, labels=r.data.labels, conditions=self.conditions, latents=latents,
                              captions=captions)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _encode_captions(self, path: str, needs_real: str | None) -> dict[str, torch.Tensor] | None:
        """A text teacher's image captions as a table aligned with the images (the prompt cache encodes them), or
        ``None`` for uncaptioned images, which a loss that pairs real images with their text cannot use."""
        captions = image_captions(path)
        if captions is None:
            if needs_real is not None:
                raise ValueError(f"data.path: {needs_real} pairs each real image with its caption, and the images "
                                 f"under {path!r} have none: put name.txt beside each name.png")
            return None
        table, _ = self._encode_texts(captions)
        return table

    def _encode_texts(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(table, null condition)`` of ``texts`` from the prompt cache (``conditioning.load_or_encode``)."""
        t, acc = self.teacher, self.accelerator
        return load_or_encode(
            lambda: t.load_pipeline(**{t.family.backbone: t.backbone, "vae": t.vae}), t.family.name, texts,
            teacher_id=t.cache_id, cache_dir=cache_root(), settings=t.encode_settings,
            is_main_process=acc.is_main_process, wait_for_everyone=acc.wait_for_everyone)

    def _prepare_method(self) -> None:
        """The optional ``prepare`` hook (methods/base.py ``Prepares``): derived data such as DMD's ODE pairs."""
        prepare = getattr(self.method, "prepare", None)
        if prepare is None:
            return
        acc = self.accelerator
        ctx = PrepareContext(cache_dir=cache_root(), sample_shape=tuple(self.teacher.sample_shape),
                             device=acc.device, is_main_process=acc.is_main_process,
                             wait_for_everyone=acc.wait_for_everyone,
                             student_init="checkpoint" if self.recipe.train.init_from else self.recipe.student.init,
                             lr_periods={role: cfg.period for role, cfg in self.recipe.optim.items()},
                             ema_decay=self.recipe.train.ema_decay)
        try:
            prepare(self.nets, ctx)
        except ValueError as err:
            raise _method_error(err) from None

    def _prepare_run_dir(self) -> None:
        d, acc = self.dir, self.accelerator
        earlier = d.exists() and any(d.iterdir())
        if self.resume:
            if not (d / "checkpoints").is_dir():
                raise RunError(f"--resume: {d} has no checkpoints/ to resume from")
            self.latest_checkpoint()  # fails early and clearly when none is complete
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
        self._init_trackers()
        bar = tqdm(range(self.step, r.train.max_steps), initial=self.step, total=r.train.max_steps,
                   disable=not (self.show_progress and acc.is_main_process), desc=f"distill {r.method.name}")
        last, logs, tick, tick_step = {}, self.logs, time.perf_counter(), self.step
        if self.step >= r.train.max_steps:
            return last  # a finished run resumed without a larger budget: nothing to do, nothing rewritten
        with StopRequest() as stop:
            for step in bar:
                self.step = step
                # ``logs`` keeps the latest value of every key: with update_every a phase may skip a logging step.
                logs.update({f"schedule/{k}": v for k, v in self.method.update_schedule(step, self.nets).items()})
                for role in getattr(self.method, "begin_step", lambda _step, _nets: ())(step, self.nets):
                    self.optimizers[role].state.clear()  # Adam re-creates zero moments at its next step
                stepped = set()
                for phase in self.method.phases:
                    if step % r.train.update_every.get(phase, 1):
                        continue
                    phase_logs, updated = self._run_phase(phase)
                    logs.update(phase_logs)
                    if updated:
                        stepped.update(self._owners(phase))
                if "student" in stepped:  # ema_decay is per student update (DMD2's student updates every 5th step)
                    self._update_ema()
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
        acc.end_training()
        return last

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

    def _init_trackers(self) -> None:
        if self.trackers:  # tensorboard / wandb, when installed; log.jsonl is always written by the loop itself
            self.accelerator.init_trackers("stepdistill", config=_flat(self.recipe.to_dict()))

    def _all_finite(self, bad_loss: torch.Tensor, norms) -> tuple[bool, bool]:
        """Whether the losses and the gradient norms were finite on every rank (so every rank skips or steps
        together). One reduce and one wait for the GPU per phase: the flags stay on the device until here."""
        bad_grad = sum((~torch.isfinite(n)).float().to(bad_loss.device) for n in norms)
        flags = torch.stack([bad_loss, torch.as_tensor(bad_grad, dtype=torch.float32, device=bad_loss.device)])
        loss_bad, grad_bad = self.accelerator.reduce(flags, reduction="sum").tolist()
        return loss_bad == 0, grad_bad == 0

    def _loss_terms(self, phase: str, batch):
        """The phase's loss as the method gives it, a ``LossOutput`` or a generator of them (``Method.__call__``),
        each computed under autocast; backward runs outside it, between terms."""
        terms = loss_terms(self.method(phase, self.nets, batch))
        while True:
            with self.accelerator.autocast():
                out = next(terms, None)
            if out is None:
                return
            yield out

    def _run_phase(self, phase: str) -> tuple[dict[str, float | torch.Tensor], bool]:
        """One phase: its loss terms over ``grad_accum`` micro-batches, clipping, and the owners' update; returns its
        logs and whether the update was made (not skipped by the NaN/inf policy)."""
        r, acc = self.recipe, self.accelerator
        roles = self._owners(phase)
        logs, k = {}, r.train.grad_accum
        bad_loss = torch.zeros((), device=acc.device)  # non-finite micro-batch losses, counted without a GPU wait
        for micro in range(k):
            batch = self.data.next(self.generator)
            batch.shared = self.shared_generator
            batch.x0 = None if batch.x0 is None else batch.x0.to(acc.device)
            if batch.cond is not None:
                batch.cond = {c: v.to(acc.device) for c, v in batch.cond.items()}
            if batch.x0_cond is not None:
                batch.x0_cond = {c: v.to(acc.device) for c, v in batch.x0_cond.items()}
            with contextlib.ExitStack() as stack:
                if micro < k - 1:  # accumulate locally; gradients are all-reduced on the last micro-batch only
                    for role in roles:
                        stack.enter_context(acc.no_sync(self.nets[role]._call_backbone()))
                for out in self._loss_terms(phase, batch):
                    loss = out.loss.float().mean() / k
                    bad_loss += (~torch.isfinite(loss)).float()
                    acc.backward(loss)  # even when not finite: every rank runs the same collectives; the update skips
                    for name, value in out.logs.items():
                        logs[f"{name}/{phase}"] = logs.get(f"{name}/{phase}", 0.0) + value / k
        max_norm = r.train.max_grad_norm if r.train.max_grad_norm is not None else float("inf")
        norms = {}
        for role in roles:
            params = [p for p in self.nets[role].trainable_parameters() if p.grad is not None]
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

    @torch.no_grad()
    def _update_ema(self) -> None:
        if "student_ema" not in self.nets.extra:
            return
        d = self.recipe.train.ema_decay
        if self.sharded:  # an FSDP2 root keeps its weights gathered after a forward without backward: shard them
            for net in (self.nets.student, self.nets["student_ema"]):
                net.backbone.reshard()
        ema = list(self.nets["student_ema"].trainable_parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.nets.student.trainable_parameters()], 1.0 - d)

    # ------------------------------------------------------------------------------------------------ outputs
    def sampling_student(self):
        """The student used for samples and export: the EMA when there is one and the recipe asks for it."""
        use_ema = self.recipe.export.use_ema and "student_ema" in self.nets.extra
        return self.nets["student_ema"] if use_ema else self.nets.student

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        # A sharded student's forward is collective: every rank samples, the main process writes.
        if not (self.accelerator.is_main_process or self.sharded):
            return None
        student = self.sampling_student()
        was_training = student.training
        student.eval()
        # Only the main process samples an unsharded student: past DDP's wrapper, whose forward would broadcast
        # buffers (SD3's positional embedding) in a collective no other rank joins.
        with contextlib.nullcontext() if self.sharded else student.unwrapped():
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
        save_sample_grid(x.cpu(), path, mixture=self.teacher.mixture)
        return path

    def export(self, output_dir: str | Path | None = None) -> Path | None:
        """Write ``pipeline/`` (DESIGN.md §6) from the trained student."""
        from .export import export_pipeline

        if not self.accelerator.is_main_process:
            return None
        return export_pipeline(self.exportable_student(), self.teacher, self.method.student_grid(), self.recipe,
                               Path(output_dir) if output_dir else self.dir / "pipeline")

    def exportable_student(self):
        """The sampling student with whole weights: under sharding, rebuilt from the latest (sharded) checkpoint,
        which ``train()`` always writes last, so export needs no collective and runs on the main process alone."""
        student = self.sampling_student()
        if not self.sharded:
            return student
        role = "student_ema" if student is not self.nets.student else "student"
        weights = self._read_role(self.latest_checkpoint(), role)
        if isinstance(student, AdapterDenoiser):  # the shared base was sharded in place: reload it, then the adapter
            r = self.recipe
            rebuilt = rebuilt_lora_student(load_teacher(r.teacher, dtype=self._load_dtype), student, weights,
                                           rank=r.roles.rank, alpha=r.roles.alpha, teacher_dtype=r.roles.teacher_dtype)
            return rebuilt.to(self.accelerator.device)
        backbone = type(student.backbone).from_config(student.backbone.config)
        backbone.load_state_dict(weights)
        return student.with_backbone(backbone.to(self.accelerator.device).eval(), student.prediction)

    def writes_lora(self) -> bool:
        """Whether the run's student is a LoRA that stock pipelines can load (``roles.mode: lora`` on a family)."""
        return self.recipe.roles.mode == "lora" and self.teacher.family is not None

    def export_lora(self, output_dir: str | Path | None = None, *, kohya: bool = False) -> Path | None:
        """Write ``lora/`` (DESIGN.md §6): the student adapter as a diffusers/PEFT LoRA file (+ kohya)."""
        from .export import export_lora

        if not self.accelerator.is_main_process:
            return None
        return export_lora(self.exportable_student(), self.teacher, self.method.student_grid(), self.recipe,
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


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether AdamW can take its fused kernel: one pass over weights, gradients and moments per step, where the
    default kernels make several (tens of milliseconds a step on an SD1.5-sized student on CUDA; on CPU, 28 ms
    against 97 ms for a 34M-parameter UNet). Plain tensors all on CUDA or all on CPU only: sharded (DTensor)
    parameters keep the default."""
    kinds = {p.device.type for p in params}
    if len(kinds) != 1 or kinds - {"cuda", "cpu"}:
        return False
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in params)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
