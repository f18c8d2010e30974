"""Build the roles a method declares (DESIGN.md §4), keep gradients where they belong, and follow EMAs.

``roles.mode: full`` makes an independent copy per role; ``roles.mode: lora`` makes every denoiser role (student, fake
score, EMAs of them) an adapter of the teacher's own backbone, which stays frozen (``lora.py``). The teacher is frozen:
``requires_grad`` off, eval mode, never given to an optimizer.

What the loop owns, so that methods need no distributed rules: ``frozen`` (a phase's non-owners take no gradient
while gradients still flow through them), ``sync_gradients`` (the owners' gradients averaged over the processes after
the phase) and ``update_ema`` (EMA roles follow their source after each real update).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .backbones import vector_unet
from .denoisers import Denoiser, RoleModule, UNet2DDenoiser
from .lora import UNET2D_TARGETS, AdapterDenoiser, add_adapters, consistent_checkpoint
from .teachers import Teacher
from .types import Nets, RoleSpec


class NetRole(RoleModule):
    """A built network (``RoleSpec.build``) that is no ``RoleModule`` itself, as a role: its whole module is what the
    optimizer owns and the checkpoint stores."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def backbone(self) -> nn.Module:
        return self.net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def check_specs(specs: dict[str, RoleSpec]) -> None:
    """Refuse role declarations that cannot be built (one line each)."""
    if "student" not in specs:
        raise ValueError("a method must declare a 'student' role")
    if "teacher" in specs:
        raise ValueError("roles: 'teacher' is the frozen teacher itself and cannot be declared as a role")
    for role, spec in specs.items():
        if spec.init == "ema":
            source = specs.get(spec.ema_of)
            if source is None:
                raise ValueError(f"roles: {role!r} is an EMA of {spec.ema_of!r}, which is not a role of this run "
                                 f"(roles: {sorted(specs)})")
            if source.init in ("ema", "build"):
                raise ValueError(f"roles: {role!r} is an EMA of {spec.ema_of!r}, which is itself an EMA or a built "
                                 "network; an EMA follows a denoiser role")


def with_recipe_roles(specs: dict[str, RoleSpec], ema_decay: float, emas: dict[str, dict] | None = None,
                      sampling: tuple[str, ...] = ("student",)) -> dict[str, RoleSpec]:
    """The method's roles plus the EMAs the recipe asks for: ``<role>_ema`` of every role that samples (``sampling``:
    the student, or each phase's expert) at ``train.ema_decay``, the EMAs that samples and exports use
    (``export.use_ema``), unless the method declares them itself; and ``roles.ema``."""
    specs = dict(specs)
    for role in sampling if ema_decay > 0 else ():
        specs.setdefault(f"{role}_ema", RoleSpec(ema_of=role, decay=ema_decay))
    for name, settings in (emas or {}).items():
        if name in specs:
            raise ValueError(f"roles.ema.{name}: the method already has a role of that name")
        unknown = set(settings) - {"of", "decay", "halflife", "rampup"}
        if unknown or "of" not in settings:
            raise ValueError(f"roles.ema.{name}: give 'of' (the role it follows) and 'decay' or 'halflife' "
                             f"(+ 'rampup'); got {sorted(settings)}")
        source = settings["of"]
        if source not in specs or specs[source].init in ("ema", "build"):
            denoisers = sorted(k for k, s in specs.items() if s.init not in ("ema", "build"))
            raise ValueError(f"roles.ema.{name}: follows {source!r}, which is not a denoiser role of this "
                             f"method; its roles: {denoisers}")
        if name.endswith("_ema") and name != f"{source}_ema":  # <role>_ema is what samples and exports as <role>
            raise ValueError(f"roles.ema.{name}: a role named {name!r} samples in place of "
                             f"{name.removesuffix('_ema')!r}, so it must follow it, not {source!r}; rename it")
        try:
            numbers = {k: None if settings.get(k) is None else float(settings[k])
                       for k in ("decay", "halflife", "rampup")}
            specs[name] = RoleSpec(ema_of=source, **numbers)
        except (TypeError, ValueError) as err:
            raise ValueError(f"roles.ema.{name}: {err}") from None
    return specs


def build_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str = "teacher", roles=None) -> Nets:
    """Instantiate every role in ``specs`` (``student`` first, EMAs last).

    ``roles`` is the recipe's ``RolesConfig`` (``None``: full copies).
    """
    check_specs(specs)
    if roles is not None and roles.mode == "lora":
        nets = _build_lora_nets(teacher, specs, student_init=student_init, rank=roles.rank, alpha=roles.alpha)
    else:
        nets = _build_full_nets(teacher, specs, student_init=student_init)
    if roles is not None and roles.teacher_dtype != "float32" and teacher.backbone is not None:
        cast_frozen(teacher.backbone, getattr(torch, roles.teacher_dtype))
    return nets


def effective_student_init(teacher: Teacher, student_init: str) -> str:
    """``student.init`` as built: a teacher without weights (the exact GMM denoiser) gives a fresh network."""
    return "new" if teacher.backbone is None else student_init


def cast_frozen(backbone: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen teacher's weights in ``dtype`` (bf16 halves its memory). LoRA adapters on it stay float32:
    peft casts their input, as the LCM-LoRA training scripts do with a half-precision base."""
    for name, p in backbone.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(dtype)


def make_denoiser(backbone: nn.Module, teacher: Teacher, prediction: str) -> Denoiser:
    """``backbone`` behind the teacher's kind of adapter (same schedule and conditioning) predicting ``prediction``."""
    if teacher.backbone is None:  # the exact GMM teacher: roles are vector UNets on its schedule
        return UNet2DDenoiser(backbone, teacher.denoiser.schedule, prediction)
    return teacher.denoiser.with_backbone(backbone, prediction)


def _backbone_copy(teacher: Teacher, init: str) -> nn.Module:
    """A copy of the teacher's backbone (``init="teacher"``) or a fresh one of its architecture (``"new"``). The exact
    GMM teacher has no weights to copy: every such role starts as a fresh vector network, the student's
    architecture, so distillation error is measured against the true mixture with no teacher-fitting error."""
    backbone = teacher.backbone
    if backbone is None:
        return vector_unet(teacher.sample_shape[0])
    if init == "new":
        return type(backbone).from_config(backbone.config)
    return copy.deepcopy(backbone)


def _built(spec: RoleSpec, made: dict[str, nn.Module], teacher: Teacher) -> RoleModule:
    """A ``build`` role, given the roles made so far."""
    view = Nets(student=made["student"], teacher=teacher.denoiser,
                extra={k: v for k, v in made.items() if k != "student"})
    net = spec.build(view)
    if not isinstance(net, nn.Module):
        raise ValueError(f"a role's build() must return an nn.Module, got {type(net).__name__}")
    return net if isinstance(net, RoleModule) else NetRole(net)


def _build_full_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str) -> Nets:
    made: dict[str, nn.Module] = {}
    order = ["student"] + [r for r in specs if r != "student" and specs[r].init != "ema"]
    for role in order:
        spec = specs[role]
        init = student_init if role == "student" else spec.init
        if init == "build":
            made[role] = _built(spec, made, teacher)
        elif init == "student":  # the student's adapter too (its guidance input and default scale)
            made[role] = made["student"].with_backbone(copy.deepcopy(made["student"].backbone),
                                                       spec.prediction or made["student"].prediction)
        else:
            den = make_denoiser(_backbone_copy(teacher, init), teacher, spec.prediction or teacher.denoiser.prediction)
            den = den.guidance_conditioned(spec.guidance) if spec.guidance is not None else den
            made[role] = den.with_end_time() if spec.end_time else den
        made[role].requires_grad_(spec.trainable).train(spec.trainable)
    for role, spec in specs.items():
        if spec.init == "ema":  # starts as its source; frozen, eval mode
            made[role] = copy.deepcopy(made[spec.ema_of]).requires_grad_(False).eval()
    student = made.pop("student")
    return Nets(student=student, teacher=teacher.denoiser, extra=made)


def lora_targets(teacher: Teacher) -> str:
    """The module-name regex LoRA adapters go on: the family's (families.py), else UNet2DModel's."""
    return teacher.family.lora_targets if teacher.family is not None else UNET2D_TARGETS


def _build_lora_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str, rank: int,
                     alpha: float) -> Nets:
    """``roles.mode: lora``: denoiser roles (and EMAs of them) become adapters of the teacher's own backbone, which
    stays frozen.

    The teacher is replaced by a view of that base with adapters disabled (also in ``teacher.denoiser``, so every
    teacher call anywhere, e.g. in evaluation, bypasses the adapters).
    """
    base = teacher.backbone
    if base is None:
        raise ValueError("roles.mode: lora needs a teacher with weights (the exact GMM teacher has none)")
    pred = teacher.denoiser.prediction
    adapters = [r for r, s in specs.items() if s.init != "build"]
    for role in adapters:
        spec = specs[role]
        if spec.guidance is not None:  # its w-embedding would be a new, trained part of the shared base
            raise ValueError(f"roles.mode: lora: role {role!r} takes a guidance-scale input (method.guidance as a "
                             f"range); use roles.mode: full, which gives the student its own w-embedding, or a "
                             f"fixed scale (guidance: [w, w])")
        if spec.end_time:  # the same: a second time embedding is a new part of the base
            raise ValueError(f"roles.mode: lora: role {role!r} takes a second time input (a flow-map student), a new "
                             f"embedding the shared base does not have; use roles.mode: full")
        init = student_init if role == "student" else spec.init
        if init == "new":
            raise ValueError(f"roles.mode: lora: role {role!r} starts from scratch (init: new); use roles.mode: full")
        source = specs[spec.ema_of] if spec.init == "ema" else spec
        if (source.prediction or pred) != pred:
            raise ValueError(f"roles.mode: lora: role {role!r} predicts {source.prediction!r} but the shared "
                             f"base predicts {pred!r}; use roles.mode: full or the teacher's parameterisation")
    add_adapters(base, adapters, rank=rank, alpha=alpha, target_modules=lora_targets(teacher))
    inner = teacher.denoiser  # one adapter-free view of the base, shared by every role
    made: dict[str, nn.Module] = {}
    for role in adapters:
        made[role] = AdapterDenoiser(inner, role)
        if not specs[role].trainable:
            for p in made[role].trainable_parameters():
                p.requires_grad_(False)
    for role, spec in specs.items():
        if spec.init == "ema":  # every adapter starts at lora_B = 0; copied anyway, so a later change stays right
            made[role].load_role_state_dict(made[spec.ema_of].role_state_dict())
        elif spec.init == "build":
            made[role] = _built(spec, made, teacher).requires_grad_(spec.trainable).train(spec.trainable)
    teacher.denoiser = AdapterDenoiser(inner, None).eval()
    student = made.pop("student")
    return Nets(student=student, teacher=teacher.denoiser, extra=made)


# ----------------------------------------------------------------------------------------------------------------
# What the loop does around a phase.


def enable_gradient_checkpointing(role: RoleModule) -> None:
    """Activation checkpointing of a role's backbone (diffusers models; a no-op for backbones without it). The
    recompute sees the adapter and ``requires_grad`` state of the original forward (``lora.consistent_checkpoint``):
    by the time a role's backward runs, another role's adapter may be active on the shared base."""
    backbone = role.backbone
    if getattr(backbone, "_supports_gradient_checkpointing", False):
        backbone.enable_gradient_checkpointing(consistent_checkpoint(backbone))


@contextlib.contextmanager
def frozen(modules):
    """Switch ``requires_grad`` off for the trainable parameters of ``modules`` and restore it after: gradients may
    flow *through* them to their inputs (DMD2's GAN term through the fake score, SiD's generator loss through the fake
    score) but never accumulate in their parameters. The loop wraps each phase in it for the roles the phase does
    not own."""
    params = [p for m in modules for p in m.trainable_parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


#: elements per all-reduce bucket (DDP's default bucket is 25 MiB; a few of those bound the extra memory)
BUCKET = 1 << 23


def sync_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average ``params``' gradients over the ``world`` processes, as DDP's reducer does, after the phase's last
    backward instead of during it, so any number of forwards of any role, in any number of loss terms, needs no rule.

    A gradient missing on some ranks (a parameter the rank's loss did not reach) counts as zero there, and every rank
    then holds the average (``find_unused_parameters`` does the same), so all ranks take the same optimizer step.
    Gradients travel in buckets of ``BUCKET`` elements per dtype, so the extra memory is a few buckets, not a copy."""
    if world == 1 or not params:
        return
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    torch.distributed.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in used:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        for bucket in _buckets(grads, BUCKET):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(tensors: list[torch.Tensor], limit: int):
    """Consecutive groups of ``tensors`` of at most ``limit`` elements (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Rank 0's values into every process (what DDP does once at wrapping): trained roles start identical even where
    a backbone's initialisation drew from an unseeded generator."""
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


@torch.no_grad()
def update_ema(ema: RoleModule, source: RoleModule, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * source`` over the role's trainable parameters (shard for shard)."""
    torch._foreach_lerp_(list(ema.trainable_parameters()), [p.detach() for p in source.trainable_parameters()],
                         1.0 - decay)
