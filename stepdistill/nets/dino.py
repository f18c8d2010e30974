"""The frozen DINOv2 feature network of ADD's discriminator (Sauer et al. 2023, "Adversarial Diffusion Distillation").

ADD (§3.2) builds its discriminator like StyleGAN-T (Sauer et al. 2023) and Projected GANs (Sauer et al. 2021): a
frozen, pretrained ViT-S feature network, DINOv2 (Oquab et al. 2023), whose tokens are read at several layers, with
a small trainable head on each; the heads are conditioned on the CLS embedding of an image (ADD's ``c_img``). Only
the heads learn. The feature network stays frozen but differentiable with respect to its input: the generator's
adversarial gradient flows back through it to the images.

``DinoFeatures`` wraps a ``transformers.Dinov2Model``; ``load_dino`` finds one on disk or in the hub cache (nothing
is downloaded when ``HF_HUB_OFFLINE`` is set or the hub is unreachable), or builds a random tiny one for tests.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn


#: the ViT-S/14 of DINOv2, the feature network ADD uses
DEFAULT_WEIGHTS = "facebook/dinov2-small"

#: the seed of the random tiny network, so two runs (and two ranks) build the same one
TINY_SEED = 0

#: the blocks read by default (StyleGAN-T reads four of ViT-S's twelve: 2, 5, 8, 11)
DEFAULT_TAPS = 4

#: DINOv2's input normalisation (ImageNet statistics), for images in [0, 1]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

#: seconds to wait for the hub before giving up on a download (huggingface_hub retries unreachable hosts for ~50 s)
_PROBE_TIMEOUT = 3.0


def tiny_dinov2_config():
    """A ``Dinov2Config`` small enough for CPU tests: 4 blocks of width 32 on an 8 x 8 grid of 4-pixel patches."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        patch_size=4, image_size=32)


def default_layers(blocks: int) -> tuple[int, ...]:
    """``DEFAULT_TAPS`` evenly spaced blocks ending at the last (12 blocks: 2, 5, 8, 11, StyleGAN-T's hooks)."""
    return tuple(sorted({max(0, (k + 1) * blocks // DEFAULT_TAPS - 1) for k in range(DEFAULT_TAPS)}))


def _pick_layers(layers: tuple[int, ...] | None, blocks: int) -> tuple[int, ...]:
    if layers is None:
        return default_layers(blocks)
    # negative indices count from the end, as in Python; past either end the nearest block is read
    picked = {min(max(i + blocks if i < 0 else i, 0), blocks - 1) for i in layers}
    if not picked:
        raise ValueError("DinoFeatures: layers is empty; give block indices or None (the default four)")
    return tuple(sorted(picked))


class DinoFeatures(nn.Module):
    """A frozen DINOv2: ``images [B, C, H, W]`` in [-1, 1] -> ``(feats, cls)``.

    ``feats`` holds one ``[B, hidden, h, w]`` map per chosen block: its patch tokens laid back on the patch grid, row
    by row (the CLS token and any register tokens dropped). ``cls`` is ``[B, hidden]``, the final layer-normed CLS
    token, ADD's image embedding for conditioning its heads.

    The parameters never train (``requires_grad`` is off and the network stays in eval mode whatever ``train()`` is
    called with), but the graph from the input is kept, so a loss on the features has a gradient for the images.

    Args:
        model: a ``transformers.Dinov2Model`` (or any model with its config and ``output_hidden_states``).
        layers: the transformer blocks read, 0-based (block ``i`` is ``hidden_states[i + 1]``; ``hidden_states[0]``
            is the patch embedding). Clamped to the blocks the model has, deduplicated and sorted. ``None``: four
            evenly spaced blocks ending at the last (``default_layers``).
        resolution: the square size images are resized to, a multiple of the patch size. ``None``: the config's
            ``image_size`` rounded to a multiple of the patch size (518 for the released DINOv2).
    """

    def __init__(self, model: nn.Module, *, layers: tuple[int, ...] | None = None, resolution: int | None = None):
        super().__init__()
        config = model.config
        self.patch_size = int(config.patch_size)
        if resolution is None:
            resolution = max(1, round(config.image_size / self.patch_size)) * self.patch_size
        elif resolution < self.patch_size or resolution % self.patch_size:
            raise ValueError(f"DinoFeatures: resolution {resolution} is not a positive multiple of the patch size "
                             f"{self.patch_size}")
        self.resolution = int(resolution)
        self.layers = _pick_layers(layers, int(config.num_hidden_layers))
        self.model = model.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(_STD)[None, :, None, None], persistent=False)
        nn.Module.train(self, False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def channels(self) -> list[int]:
        """The channels of each map of ``feats``, one entry per layer read."""
        return [self.hidden_size] * len(self.layers)

    def train(self, mode: bool = True) -> DinoFeatures:
        # frozen: dropout and drop-path stay off while the discriminator heads around it train
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"DinoFeatures: images must be [B, 1 or 3, H, W], got {list(images.shape)}")
        if images.shape[1] == 1:  # greyscale: the same image in every colour channel
            images = images.expand(-1, 3, -1, -1)
        x = (images.to(self.mean.dtype) + 1) / 2
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            # no antialias: plain bilinear keeps a cheap, well-defined gradient for the generator
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=False)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(dtype), output_hidden_states=True)
        side = self.resolution // self.patch_size
        feats = []
        for i in self.layers:
            tokens = out.hidden_states[i + 1]
            # the patch tokens are the last side^2 (before them: CLS, then any register tokens)
            grid = tokens[:, -side * side:].transpose(1, 2)
            feats.append(grid.reshape(tokens.shape[0], tokens.shape[2], side, side))
        return feats, out.last_hidden_state[:, 0]


def _looks_like_path(weights: str) -> bool:
    """A string no hub id can be: an absolute or explicitly relative path, or an existing file or folder."""
    return (weights.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(weights)
            or os.path.exists(os.path.expanduser(weights)))


def _hub_reachable() -> bool:
    """Whether the hub endpoint accepts a connection within ``_PROBE_TIMEOUT``: offline, huggingface_hub retries
    a download for about a minute before failing, so unreachable hosts are ruled out first."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection proves nothing; leave it to the hub client
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _tiny_model() -> nn.Module:
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):  # a fixed network without touching the caller's random stream
        torch.manual_seed(TINY_SEED)
        return Dinov2Model(tiny_dinov2_config())


def _pretrained_model(weights: str, what: str) -> nn.Module:
    from transformers import Dinov2Model

    # the tiny network is a recipe switch (ADD's discriminator); elsewhere (eval's features) only a folder helps
    tiny = ", or method.dino_tiny: true (a random tiny network, for tests)" if what.startswith("method.") else ""
    try:
        return Dinov2Model.from_pretrained(weights, local_files_only=True)  # a folder, or the hub cache
    except (OSError, ValueError) as err:
        local_err = err
    if os.path.isdir(os.path.expanduser(weights)):
        first = str(local_err).strip().splitlines()[0] if str(local_err).strip() else type(local_err).__name__
        raise ValueError(f"{what}: {weights!r} is a folder but holds no Dinov2Model ({first}); give a "
                         f"folder holding a Dinov2Model{tiny}")
    hub = "" if _looks_like_path(weights) else "hub unreachable"
    if hub and _hub_reachable():
        try:
            return Dinov2Model.from_pretrained(weights)
        except (OSError, ValueError):
            hub = "not on the hub"
    where = ", ".join(["not a local folder", "not in the hub cache"] + ([hub] if hub else []))
    raise ValueError(f"{what}: no DINOv2 weights at {weights!r} ({where}); give a folder holding a "
                     f"Dinov2Model{tiny}")


def load_dino(weights: str | Path | None = None, *, tiny: bool = False, layers: tuple[int, ...] | None = None,
              resolution: int | None = None, what: str = "method.dino_weights") -> DinoFeatures:
    """The frozen feature network: ``tiny`` a random ``tiny_dinov2_config()`` network (seeded, the same every call),
    else the ``Dinov2Model`` at ``weights`` (a local folder or a hub id; default ``DEFAULT_WEIGHTS``), looked for on
    disk and in the hub cache first and downloaded only when the hub is reachable and ``HF_HUB_OFFLINE`` is unset.
    Missing weights raise ``ValueError`` with one line naming the setting ``what``."""
    model = _tiny_model() if tiny else _pretrained_model(str(weights or DEFAULT_WEIGHTS), what)
    return DinoFeatures(model, layers=layers, resolution=resolution)
