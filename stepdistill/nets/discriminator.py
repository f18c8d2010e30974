"""The feature sources of an adversarial discriminator (METHODS.md §7), and the condition its heads are projected on.

A discriminator is a feature network and the trainable heads of ``nets/gan_head.py`` (one per feature map). Where the
features come from is the recipe's choice (``method.source``):

* ``teacher``: the frozen teacher's own blocks (LADD, Sauer et al. 2024 §3: "the discriminator's feature network is
  the teacher"; every DiT/MMDiT block's tokens laid back on the latent grid, a UNet's down and mid blocks), at the
  sample re-noised to a time of its own. Nothing new is resident: the teacher is already there, which is why LADD fits
  beside an 8B teacher. With the exact GMM teacher (no weights, no blocks), ``layers: output`` reads the teacher's
  output instead: its x0 at ``x_t`` beside ``x_t`` itself, a 1x1 map (also what ``layers: null``, every block, reads on
  a teacher that has none);
* ``encoder``: a trainable copy of the teacher's encoder half, initialised from the teacher (SDXL-Lightning's
  discriminator, Lin et al. 2024 §3.3): the role ``disc_encoder`` (with ``roles.mode: lora``, an adapter of the shared
  base), trained with the heads. Only a UNet has an encoder half;
* ``dino``: a frozen DINOv2 on decoded pixels (ADD, Sauer et al. 2023 §3.2), ``nets/dino.py``; the VAE decode runs
  inside the loss with the gradient to the latent.

The heads are conditioned (a projection discriminator): on the noise level of their input when the source sees
noisy samples, on the prompt's pooled embedding (SD3/FLUX ``pooled_projections``, SDXL ``text_embeds``, SD1.5 the
mean of its token embeddings) or a class label, and, for ``dino``, on ADD's image embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..types import RoleSpec


SOURCES = ("teacher", "encoder", "dino")
#: the size of the noise-level features (``time_features``)
TIME_DIM = 16


def time_features(schedule, t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Fourier features ``[B, dim]`` of the noise level, read as log-SNR (clamped to +-20, scaled to [-1, 1]) so
    that one head means the same on any schedule."""
    u = (schedule.logsnr(t.double()).clamp(-20, 20) / 20).float()
    freqs = math.pi * 2.0 ** torch.arange(dim // 2, dtype=torch.float32, device=u.device)
    angles = u[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)


def _pooled(cond: dict) -> torch.Tensor | None:
    """The prompt as one vector per sample: the pooled embedding where the family has one, else the token mean."""
    for key in ("pooled_projections", "text_embeds"):
        if key in cond:
            return cond[key].float()
    return cond["encoder_hidden_states"].float().mean(1) if "encoder_hidden_states" in cond else None


def text_dim(denoiser) -> int:
    """The size of ``text_vector``'s output for ``denoiser``'s conditions (0: unconditional), read off its null
    condition (set before any role is built) or its number of classes."""
    denoiser = getattr(denoiser, "inner", denoiser)  # a LoRA role's view of the shared base
    classes = getattr(denoiser, "num_classes", None)
    if classes is not None:
        return classes + 1  # the null class too
    keys = getattr(denoiser, "_null_keys", None)
    pooled = _pooled({k: getattr(denoiser, f"null_{k}") for k in keys}) if keys else None
    return 0 if pooled is None else pooled.shape[-1]


def text_vector(cond: dict | None, dim: int) -> torch.Tensor | None:
    """The prompt (or class) as one vector per sample, ``[B, dim]``; ``None`` when ``dim`` is 0."""
    if not dim:
        return None
    if "class_labels" in cond:
        return F.one_hot(cond["class_labels"].long(), dim).float()
    return _pooled(cond)


# ---------------------------------------------------------------------------------------------------------------
# Feature sources: ``roles()`` (what the run must build for it), ``channels(nets)`` and ``__call__(nets, x, t, cond)``
# -> the list of ``[B, C, h, w]`` maps its heads read.


@dataclass(frozen=True)
class TeacherSource:
    """The frozen teacher's blocks (``layers``: indices into ``feature_modules()``, ``None``: all of them, LADD's
    choice) or, with ``layers == "output"`` (and for ``None`` on a teacher without blocks, the exact GMM denoiser), its
    x0 prediction next to its input."""

    layers: tuple[int, ...] | str | None = None
    noised = True
    trained_roles = ()

    def roles(self) -> dict[str, RoleSpec]:
        return {}

    def network(self, nets):
        return nets.teacher

    def picked(self, nets) -> tuple[int, ...]:
        return tuple(range(len(self.network(nets).feature_modules()))) if self.layers is None else self.layers

    def reads_output(self, nets) -> bool:
        """``layers: output``, or every block of a network that has none (the exact GMM teacher): its output."""
        return self.layers == "output" or (self.layers is None and self.network(nets).backbone is None)

    def channels(self, nets) -> list[int]:
        net = self.network(nets)
        if self.reads_output(nets):
            return [2 * (net.backbone.config.in_channels if net.backbone is not None else _vector_dim(net))]
        try:
            channels = net.feature_channels()
            return [channels[i] for i in self.picked(nets)]
        except TypeError:
            raise ValueError(f"method.source: {type(net).__name__} has no feature blocks for a discriminator (the "
                             "exact GMM teacher has no weights); use method.layers: output (its prediction)") from None
        except IndexError:
            raise ValueError(f"method.layers: {list(self.layers)} out of range ({len(channels)} feature "
                             "blocks)") from None

    def __call__(self, nets, x_t: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
        net = self.network(nets)
        if self.reads_output(nets):
            x0 = net(x_t, t, cond).x0
            both = torch.cat([x_t, x0.to(x_t.dtype)], 1)
            return [both[:, :, None, None] if both.ndim == 2 else both]
        return net.features(x_t, t, cond, self.picked(nets))


def _vector_dim(denoiser) -> int:
    mixture = getattr(denoiser, "mixture", None)
    if mixture is None:
        raise ValueError(f"method.layers: output: cannot tell {type(denoiser).__name__}'s sample size")
    return int(mixture.means.shape[-1])


@dataclass(frozen=True)
class EncoderSource(TeacherSource):
    """A trainable copy of the teacher's encoder half (SDXL-Lightning): the role ``disc_encoder``, initialised from the
    teacher and trained with the heads; its forward stops at the deepest block read (``Denoiser.features``), so the
    decoder half is never run."""

    trained_roles = ("disc_encoder",)

    def roles(self) -> dict[str, RoleSpec]:
        return {"disc_encoder": RoleSpec(init="teacher", optim_of="discriminator")}

    def network(self, nets):
        return nets["disc_encoder"]

    def channels(self, nets) -> list[int]:
        self.check(nets.teacher)
        return super().channels(nets)

    @staticmethod
    def check(teacher) -> None:
        """Only a UNet has an encoder half (down blocks then a mid block)."""
        backbone = teacher.backbone
        if backbone is not None and not hasattr(backbone, "down_blocks"):
            family = getattr(teacher, "family", None)
            name = family.name if family is not None else type(backbone).__name__
            raise ValueError(f"method.source: encoder: a {name} teacher ({type(backbone).__name__}) has no encoder "
                             "half to copy (SDXL-Lightning's discriminator is a UNet's down and mid blocks); use "
                             "method.source: teacher")


@dataclass(frozen=True)
class DinoSource:
    """A frozen DINOv2 (``nets/dino.py``) on pixels: ``decode`` (the teacher's VAE, with the gradient to the latent)
    for latent teachers, the samples themselves for pixel teachers. Judges clean samples (ADD)."""

    dino: torch.nn.Module
    decode: object = None
    noised = False
    trained_roles = ()

    def roles(self) -> dict[str, RoleSpec]:
        return {}

    def channels(self, nets) -> list[int]:
        return list(self.dino.channels)

    def embed(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The feature maps and the CLS embedding of samples ``x``."""
        images = x if self.decode is None else self.decode(x)
        return self.dino(images)

    def __call__(self, nets, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
        return self.embed(x)[0]
