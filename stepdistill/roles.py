"""Build the roles a method asks for (DESIGN.md §4): student, teacher, fake_score, discriminator, student_ema, ...

``roles.mode: full`` (this module, today) makes an independent copy per role. The teacher is frozen: ``requires_grad``
off, eval mode, never given to an optimizer or wrapped by DDP. LoRA roles on one frozen base come with the
diffusers-families work.
"""

from __future__ import annotations

import copy

from torch import nn

from .denoisers import Denoiser, UNet2DDenoiser
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
    return UNet2DDenoiser(backbone, teacher.denoiser.schedule, prediction)


def build_nets(teacher: Teacher, specs: dict[str, RoleSpec], *, student_init: str = "teacher",
               ema: bool = False) -> Nets:
    """Instantiate every role in ``specs`` (``student`` first) plus ``student_ema`` when ``ema``."""
    if "student" not in specs:
        raise ValueError("a method must declare a 'student' role")
    made: dict[str, Denoiser] = {}
    order = ["student"] + [r for r in specs if r != "student"]
    for role in order:
        spec = specs[role]
        init = student_init if role == "student" else spec.init
        if init == "head":
            made[role] = GANHead.for_denoiser(made[spec.head_of]).requires_grad_(spec.trainable).train(spec.trainable)
            continue
        if init == "student":
            backbone = copy.deepcopy(made["student"].unet)
        else:
            backbone = _backbone_copy(teacher, init, role)
        prediction = spec.prediction or (made["student"].prediction if init == "student" else
                                         teacher.denoiser.prediction)
        den = make_denoiser(backbone, teacher, prediction)
        den.requires_grad_(spec.trainable)
        den.train(spec.trainable)
        made[role] = den
    if ema:
        made["student_ema"] = copy.deepcopy(made["student"]).requires_grad_(False).eval()
    student = made.pop("student")
    return Nets(student=student, teacher=teacher.denoiser, extra=made)
