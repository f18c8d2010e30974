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
    """``[B, C, h, w]`` features -> ``[B]`` logits."""

    def __init__(self, channels: int, *, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), _GroupNorm(hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), _GroupNorm(hidden), nn.SiLU(),
        )
        self.out = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(feats).mean((2, 3))).squeeze(1)


class Heads(nn.Module):
    """One ``BottleneckHead`` per feature map: ``list of [B, C_l, h_l, w_l] -> [B, L]`` logits."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(BottleneckHead(c) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(f"GANHead: {len(self.heads)} heads, {len(feats)} feature maps")
        param = next(self.heads.parameters())
        return torch.stack([head(f.to(param.dtype)) for head, f in zip(self.heads, feats)], 1).float()


class GANHead(RoleModule):
    """The ``discriminator`` role: one ``BottleneckHead`` per feature map it reads (DMD2: one, on the fake score's
    bottleneck; LADD-style: one per layer), trained, checkpointed and sharded like any role.

    ``forward(feats)`` takes the maps of ``Denoiser.features`` (a list, in the order of ``layers``) and returns one
    logit per sample and map, ``[B, L]``.

    Args:
        channels: the channels of each map.
        layers: the feature layers it reads (indices into ``Denoiser.feature_modules()``; ``None``: the bottleneck).
    """

    def __init__(self, channels: list[int], layers: tuple[int, ...] | None = None):
        super().__init__()
        self.layers = layers
        self.heads = Heads(channels)  # a module with a forward of its own: what FSDP2 shards

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

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.heads(feats)

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # checkpoints written before heads on several layers hold the one head's keys unprefixed (body.*, out.*)
        if state and all(k.startswith(("body.", "out.")) for k in state):
            state = {f"heads.0.{k}": v for k, v in state.items()}
        super().load_role_state_dict(state)
