"""The GAN classifier head of DMD2 (Yin et al., NeurIPS 2024, §4.3): a small network on the fake score's bottleneck.

DMD2 (``main/sd_guidance.py`` ``cls_pred_branch``) puts a few strided convolutions on the deepest UNet feature map
and reads one logit per sample; the fake-score network *is* the GAN's feature extractor. The official stacks are
sized for 64x64 / 128x128 latents; this head is resolution-agnostic instead (conv, GroupNorm, SiLU, then a mean over
space and a linear layer), so it also fits the 1x1 "maps" of vector backbones and the 4x4 ones of the digits UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import RoleModule


#: the fewest values one normalisation group may hold
MIN_GROUP_VALUES = 16


class _GroupNorm(nn.GroupNorm):
    """GroupNorm with up to 32 groups (DMD2's head uses 32), fewer where a group would hold under ``MIN_GROUP_VALUES``
    values: on a 1x1 map, 32 groups of one channel each normalise every value to 0, and the head would output its
    bias whatever the input. The groups are chosen per call from the map's size, so one head fits every resolution
    (the weights are per channel and do not depend on the grouping)."""

    def __init__(self, channels: int):
        super().__init__(1, channels)  # the grouping is chosen per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, pixels = self.num_channels, x.shape[2] * x.shape[3]
        fits = [g for g in (32, 16, 8, 4, 2) if c % g == 0 and c // g * pixels >= MIN_GROUP_VALUES]
        groups = fits[0] if fits else 1
        return F.group_norm(x, groups, self.weight, self.bias, self.eps)


class BottleneckHead(nn.Module):
    """``[B, C, h, w]`` features (and an optional condition ``[B, cond_dim]``) -> ``[B]`` logits.

    With a condition the logit is a projection discriminator's (Miyato & Koyama 2018, Eq. 3; the conditioning of
    StyleGAN-T's and ADD's heads): ``out(h) + <embed(c), h> / sqrt(hidden)``, ``h`` the pooled features, so the head
    judges whether a sample fits *its* noise level, prompt or source image, not only whether it looks real."""

    def __init__(self, channels: int, *, hidden: int | None = None, cond_dim: int = 0):
        super().__init__()
        hidden = hidden or channels
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), _GroupNorm(hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), _GroupNorm(hidden), nn.SiLU(),
        )
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Linear(cond_dim, hidden) if cond_dim else None

    def forward(self, feats: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(feats).mean((2, 3))
        logit = self.out(h).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(c.to(h.dtype)) * h).sum(1) / h.shape[1] ** 0.5
        return logit


class Heads(nn.Module):
    """One ``BottleneckHead`` per feature map: ``list of [B, C_l, h_l, w_l] -> [B, L]`` logits."""

    def __init__(self, channels: list[int], *, hidden: int | None = None, cond_dim: int = 0):
        super().__init__()
        self.cond_dim = cond_dim
        self.heads = nn.ModuleList(BottleneckHead(c, hidden=hidden, cond_dim=cond_dim)
                                   for c in channels)

    def forward(self, feats: list[torch.Tensor], c: torch.Tensor | None = None) -> torch.Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(f"GANHead: {len(self.heads)} heads, {len(feats)} feature maps")
        if (c is None) != (self.cond_dim == 0) or (c is not None and c.shape[-1] != self.cond_dim):
            got = None if c is None else tuple(c.shape)
            raise ValueError(f"GANHead: built for a condition of {self.cond_dim} features, given {got}")
        param = next(self.heads.parameters())
        c = None if c is None else c.to(param.device, param.dtype)
        return torch.stack([head(f.to(param.dtype), c) for head, f in zip(self.heads, feats)], 1).float()


class GANHead(RoleModule):
    """The ``discriminator`` role: one ``BottleneckHead`` per feature map it reads (DMD2: one, on the fake score's
    bottleneck; LADD-style: one per layer), trained, checkpointed and sharded like any role.

    ``forward(feats, c=None)`` takes the maps of a feature source (``nets/discriminator.py``; ``Denoiser.features``, a
    list in the order of ``layers``) and the condition vector ``c`` it was built for, and returns one logit per sample
    and map, ``[B, L]``.

    Args:
        channels: the channels of each map.
        layers: the feature layers it reads (indices into ``Denoiser.feature_modules()``; ``None``: the bottleneck).
        hidden: the heads' width (``None``: each map's channels, DMD2's head). Heads on every block of a large
            backbone (LADD) need it: 24 full-width heads on SD3's 1536 channels would be a billion parameters; and a
            vector backbone's few channels are too narrow a head.
        cond_dim: the size of the condition vector each logit is projected on (``BottleneckHead``; 0: none).
    """

    def __init__(self, channels: list[int], layers: tuple[int, ...] | None = None, *, hidden: int | None = None,
                 cond_dim: int = 0):
        super().__init__()
        self.layers = layers
        self.heads = Heads(channels, hidden=hidden, cond_dim=cond_dim)  # what FSDP2 shards (a forward of its own)

    @property
    def backbone(self) -> nn.Module:
        return self.heads

    @classmethod
    def for_denoiser(cls, denoiser, layers: tuple[int, ...] | None = None) -> GANHead:
        """Heads sized for ``denoiser``'s feature maps at ``layers`` (default: its bottleneck)."""
        try:
            channels = denoiser.feature_channels()
            picked = [denoiser.bottleneck] if layers is None else list(layers)
            return cls([channels[i] for i in picked], layers)
        except (TypeError, IndexError) as err:
            raise ValueError(f"method: a GAN head needs feature maps of the fake score ({err}); set "
                             "method.gan_weight: 0 (and keep divergence: reverse_kl)") from None

    def forward(self, feats: list[torch.Tensor], c: torch.Tensor | None = None) -> torch.Tensor:
        return self.heads(feats, c)

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # checkpoints written before heads on several layers hold the one head's keys unprefixed (body.*, out.*)
        if state and all(k.startswith(("body.", "out.")) for k in state):
            state = {f"heads.0.{k}": v for k, v in state.items()}
        super().load_role_state_dict(state)
