"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), v0.1.

The perceptual distance DMD (v1) uses for its regression loss (Yin et al. 2024, §3.3). For each of five layers of an
ImageNet backbone: unit-normalise the features over channels, square the difference, weight the channels by a learned
1x1 convolution, average over space; the distance is the sum over layers (paper Eq. 1). Inputs are in [-1, 1] and are
first shifted and scaled per channel (the reference ``ScalingLayer``).

Nothing is downloaded or shipped. Two local files are needed, both in the layouts their owners publish:

* the backbone: torchvision's ImageNet checkpoint (``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth``, which
  torchvision keeps in ``torch.hub.get_dir()/checkpoints``); only its ``features.*`` tensors are read;
* the linear heads: ``<net>.pth`` of LPIPS v0.1, which ``pip install lpips`` places in ``lpips/weights/v0.1/``.

Both are read with ``torch.load(weights_only=True)``. A parity test runs the reference ``lpips`` package on the same
weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Net:
    layers: tuple  # torchvision's ``features`` layout: ("C", in, out, kernel, stride, padding) | ("R",) | ("M",)
    taps: tuple[int, ...]  # indices of the ReLUs whose outputs LPIPS compares
    backbone_file: str


def _vgg16_layers() -> tuple:
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(("M", 2, 2))
        else:
            layers += [("C", c_in, v, 3, 1, 1), ("R",)]
            c_in = v
    return tuple(layers)


NETS = {
    "vgg": _Net(_vgg16_layers(), taps=(3, 8, 15, 22, 29), backbone_file="vgg16-397923af.pth"),
    "alex": _Net((("C", 3, 64, 11, 4, 2), ("R",), ("M", 3, 2), ("C", 64, 192, 5, 1, 2), ("R",), ("M", 3, 2),
                  ("C", 192, 384, 3, 1, 1), ("R",), ("C", 384, 256, 3, 1, 1), ("R",), ("C", 256, 256, 3, 1, 1),
                  ("R",), ("M", 3, 2)), taps=(1, 4, 7, 9, 11), backbone_file="alexnet-owt-7be5be79.pth"),
}

#: the reference ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _layer(spec: tuple) -> nn.Module:
    if spec[0] == "C":
        _, c_in, c_out, k, s, p = spec
        return nn.Conv2d(c_in, c_out, k, stride=s, padding=p)
    if spec[0] == "M":
        return nn.MaxPool2d(spec[1], stride=spec[2])
    return nn.ReLU()


class LPIPS(nn.Module):
    """Frozen LPIPS distance ``d(x, y) -> [B]`` for images in [-1, 1] (1 or 3 channels).

    Args:
        net: ``vgg`` (the variant recommended for use as a training loss) or ``alex``.
        upsample_below: images with a side below this are resized bilinearly to 224 x 224 first, as the consistency
            models code does for its LPIPS loss (ImageNet backbones see nothing useful in 8 or 64 pixels).
    """

    def __init__(self, net: str = "vgg", *, upsample_below: int = 256):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net, self.upsample_below = net, upsample_below
        spec = NETS[net]
        self.features = nn.Sequential(*(_layer(s) for s in spec.layers[:spec.taps[-1] + 1]))
        widths = [[s for s in spec.layers[:i] if s[0] == "C"][-1][2] for i in spec.taps]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(_SCALE)[None, :, None, None])
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, net: str, backbone: str | Path, heads: str | Path, **kwargs) -> LPIPS:
        """Load torchvision's backbone checkpoint and the LPIPS v0.1 heads (both plain state dicts)."""
        model = cls(net, **kwargs)
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        wanted = model.features.state_dict().keys()
        model.features.load_state_dict({k: state[f"features.{k}"] for k in wanted})
        lin = torch.load(heads, map_location="cpu", weights_only=True)
        for k, head in enumerate(model.heads):
            head.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        return model

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, taps = [], set(NETS[self.net].taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # greyscale: the same image in every colour channel
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < self.upsample_below:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=(224, 224), mode="bilinear", align_corners=False)
        fx = self._taps((x - self.shift) / self.scale)
        fy = self._taps((y - self.shift) / self.scale)
        total = 0.0
        for a, b, head in zip(fx, fy, self.heads):
            # unit-normalise over channels (eps as in the reference), then the learned channel weights, spatial mean
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head((a - b).square()).mean((2, 3))
        return total.flatten()


def default_files(net: str, folder: str | Path | None = None) -> tuple[Path, Path]:
    """Where the two weight files are looked for: ``folder`` when given (both files in it), else torchvision's hub
    checkpoint folder for the backbone and the installed ``lpips`` package for the heads."""
    spec = NETS[net]
    if folder is not None:
        return Path(folder) / spec.backbone_file, Path(folder) / f"{net}.pth"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / spec.backbone_file
    found = importlib.util.find_spec("lpips")  # locates the package without importing it (it imports torchvision)
    root = Path(found.submodule_search_locations[0]) if found and found.submodule_search_locations else None
    heads = (root / "weights" / "v0.1" / f"{net}.pth") if root else Path(f"<lpips package>/weights/v0.1/{net}.pth")
    return backbone, heads


def load_lpips(net: str = "vgg", folder: str | Path | None = None) -> LPIPS:
    """LPIPS from local files, or a ``FileNotFoundError`` naming each missing file and where it comes from."""
    backbone, heads = default_files(net, folder)
    missing = []
    if not backbone.is_file():
        missing.append(f"{backbone} (torchvision's ImageNet {net} checkpoint)")
    if not heads.is_file():
        missing.append(f"{heads} (LPIPS v0.1 heads; `pip install lpips` ships them)")
    if missing:
        raise FileNotFoundError(f"LPIPS needs local weights, nothing is downloaded; missing: {'; '.join(missing)}")
    return LPIPS.from_files(net, backbone, heads)


def lpips_for_samples(sample_shape, net: str, folder: str | Path | None, device, *, key: str) -> LPIPS:
    """LPIPS for a distance between a teacher's samples (a recipe's ``key``), or ``ValueError`` with one line: the
    samples must be pixel images with 1 or 3 channels and the weights must be on disk."""
    shape = tuple(sample_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"{key}: lpips compares pixel images with 1 or 3 channels; this teacher's samples have shape "
                         f"{list(shape)} (use pseudo_huber)")
    try:
        return load_lpips(net, folder).to(device)
    except FileNotFoundError as err:
        raise ValueError(f"{key}: {err}") from None
