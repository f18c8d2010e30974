"""Build the roles a method asks for (DESIGN.md §4): student, teacher, fake_score, discriminator, student_ema, ...

``roles.mode: full`` makes an independent copy per role; ``roles.mode: lora`` makes the student and the fake score
adapters of the teacher's own backbone (``lora.py``). The teacher is frozen: ``requires_grad`` off, eval mode, never
given to an optimizer or wrapped by DDP.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .denoisers import Denoiser, RoleModule, UNet2DDenoiser
from .lora import UNET2D_TARGETS, AdapterDenoiser, add_adapters
from .methods.base import Nets, RoleSpec
from .nets.gan_head import GANHead
from .teachers import Teacher, vector_unet


def _backbone_copy(teacher: Teacher, init: str, role: str) -> nn.Module:
    backbone = teacher.backbone
    if backbone is None:
        if init == "teacher":
            raise ValueError(f"{role}: the exact GMM teacher has no weights to copy; use teacher.gmm.denoiser: mlp"
                             + (" or set student.init: new" if role == "student" else ""))
        return vector_unet(teacher.sample_shape[0])
    if init == "new":
        return type(backbone).from_config(backbone.config)
    return copy.deepcopy(backbone)


def make_denoiser(backbone: nn.Module, teacher: Teacher, prediction: str) -> Denoiser:
    """``backbone`` behind the teacher's kind of adapter (same schedule and conditioning) predicting ``prediction``."""
    if teacher.backbone is None:  # the exact GMM teacher: roles are vector UNets on its schedule
        return UNet2DDenoiser(backbone, teacher.denoiser.schedule, prediction)
    return teacher.denoiser.with_backbone(backbone, prediction)


def build_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str = "teacher",
               ema: bool = False, roles=None) -> Nets:
    """Instantiate every role in ``specs`` (``student`` first) plus ``student_ema`` when ``ema``.

    ``roles`` is the recipe's ``RolesConfig`` (``None``: full copies).
    """
    if "student" not in specs:
        raise ValueError("a method must declare a 'student' role")
    if roles is not None and roles.mode == "lora":
        nets = _build_lora_nets(teacher, specs, student_init=student_init, ema=ema, rank=roles.rank,
                                alpha=roles.alpha)
    else:
        nets = _build_full_nets(teacher, specs, student_init=student_init, ema=ema)
    if roles is not None and roles.teacher_dtype != "float32" and teacher.backbone is not None:
        cast_frozen(teacher.backbone, getattr(torch, roles.teacher_dtype))
    return nets


def cast_frozen(backbone: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen teacher's weights in ``dtype`` (bf16 halves its memory). LoRA adapters on it stay float32:
    peft casts their input, as the LCM-LoRA training scripts do with a half-precision base."""
    for name, p in backbone.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(dtype)


def _build_full_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str, ema: bool) -> Nets:
    made: dict[str, RoleModule] = {}
    order = ["student"] + [r for r in specs if r != "student"]
    for role in order:
        spec = specs[role]
        init = student_init if role == "student" else spec.init
        if init == "head":
            made[role] = GANHead.for_denoiser(made[spec.head_of]).requires_grad_(spec.trainable).train(spec.trainable)
            continue
        if init == "student":  # the student's adapter too (its guidance input and default scale)
            den = made["student"].with_backbone(copy.deepcopy(made["student"].backbone),
                                                spec.prediction or made["student"].prediction)
        else:
            den = make_denoiser(_backbone_copy(teacher, init, role), teacher,
                                spec.prediction or teacher.denoiser.prediction)
        if spec.guidance is not None:
            den = den.guidance_conditioned(spec.guidance)
        den.requires_grad_(spec.trainable)
        den.train(spec.trainable)
        made[role] = den
    if ema:
        made["student_ema"] = copy.deepcopy(made["student"]).requires_grad_(False).eval()
    student = made.pop("student")
    return Nets(student=student, teacher=teacher.denoiser, extra=made)


def lora_targets(teacher: Teacher) -> str:
    """The module-name regex LoRA adapters go on: the family's (families.py), else UNet2DModel's."""
    return teacher.family.lora_targets if teacher.family is not None else UNET2D_TARGETS


def rebuilt_lora_student(teacher: Teacher, like: AdapterDenoiser, weights: dict[str, torch.Tensor], *, rank: int,
                         alpha: float, teacher_dtype: str = "float32") -> AdapterDenoiser:
    """The student adapter ``weights`` on a freshly loaded ``teacher``'s base, wrapped like ``like``.

    Used where the training base cannot be read whole: under FSDP it was sharded in place, and the process group
    that could gather it is gone by export time. The base is stored in ``teacher_dtype`` as in training, so the merged
    export is the student that was trained (the unsharded export merges into that same bf16-rounded base).
    """
    base = teacher.backbone
    add_adapters(base, [like.adapter], rank=rank, alpha=alpha, target_modules=lora_targets(teacher))
    if teacher_dtype != "float32":
        cast_frozen(base, getattr(torch, teacher_dtype))
    student = AdapterDenoiser(like.inner.with_backbone(base, like.prediction), like.adapter)
    student.load_role_state_dict(weights)
    return student.eval()


def _build_lora_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str, ema: bool, rank: int,
                     alpha: float) -> Nets:
    """``roles.mode: lora``: denoiser roles become adapters of the teacher's own backbone, which stays frozen.

    The teacher is replaced by a view of that base with adapters disabled (also in ``teacher.denoiser``, so every
    teacher call anywhere, e.g. in evaluation, bypasses the adapters).
    """
    base = teacher.backbone
    if base is None:
        raise ValueError("roles.mode: lora needs a teacher with weights (the exact GMM teacher has none)")
    if ema:
        raise ValueError("train.ema_decay: a student EMA is not supported with roles.mode: lora yet")
    pred = teacher.denoiser.prediction
    adapters = [r for r, s in specs.items() if s.init != "head"]
    for role in adapters:
        if specs[role].guidance is not None:  # its w-embedding would be a new, trained part of the shared base
            raise ValueError(f"roles.mode: lora: role {role!r} takes a guidance-scale input (method.guidance as a "
                             f"range); use roles.mode: full, which gives the student its own w-embedding, or a "
                             f"fixed scale (guidance: [w, w])")
        init = student_init if role == "student" else specs[role].init
        if init == "new":
            raise ValueError(f"roles.mode: lora: role {role!r} starts from scratch (init: new); use roles.mode: full")
        if (specs[role].prediction or pred) != pred:
            raise ValueError(f"roles.mode: lora: role {role!r} predicts {specs[role].prediction!r} but the shared "
                             f"base predicts {pred!r}; use roles.mode: full or the teacher's parameterisation")
    add_adapters(base, adapters, rank=rank, alpha=alpha, target_modules=lora_targets(teacher))
    inner = teacher.denoiser  # one adapter-free view of the base, shared by every role
    made: dict[str, RoleModule] = {}
    for role in adapters:
        made[role] = AdapterDenoiser(inner, role)
        if not specs[role].trainable:
            for p in made[role].trainable_parameters():
                p.requires_grad_(False)
    for role in specs:
        if specs[role].init == "head":
            made[role] = GANHead.for_denoiser(made[specs[role].head_of]).train(specs[role].trainable)
    teacher.denoiser = AdapterDenoiser(inner, None).eval()
    student = made.pop("student")
    return Nets(student=student, teacher=teacher.denoiser, extra=made)
