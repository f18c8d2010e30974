"""Data sources: infinite iterators of ``Batch`` on CPU, reproducible from a ``torch.Generator``.

Sources (``data.source`` in a recipe):
    * ``gmm``: exact samples of the teacher's Gaussian mixture (labels = component).
    * ``digits``: scikit-learn's bundled 8x8 digits (offline), scaled to [-1, 1], labels = digit.
    * ``image_folder``: PNG/JPEG files under ``data.path``, resized to the teacher's sample size, in [-1, 1].
    * ``gaussian``: standard normal "images" of the teacher's sample shape (smoke runs of random tiny teachers).

Latent teachers (SD1.5, SDXL, SD3, FLUX) take ``image_folder`` data as VAE latents, encoded once and cached on disk
(``latent_table``), and their conditions come from a prompt table (``conditioning.py``): each batch draws rows of it.
An image's caption, when there is one, is a text file of the same name beside it (``cat.png`` + ``cat.txt``, the
kohya convention); it is the condition the image is seen with where a loss needs the pair (DMD2's GAN term).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file
from .mixture import GaussianMixture
from .types import Batch


@lru_cache(maxsize=1)
def digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as ``([N, 1, 8, 8] in [-1, 1], labels [N])``. Pixel values are 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, torch.from_numpy(d.target).long()


def image_files(path: str) -> list[Path]:
    """The images under ``path`` (png/jpg/webp, recursively), in a fixed order."""
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"data.path: no images (png/jpg/webp) under {path!r}")
    return files


def image_captions(path: str) -> list[str] | None:
    """Each image's caption (``name.txt`` beside ``name.png``), in ``image_files`` order; ``None`` when no image has
    one. Some captioned and some not is refused: the uncaptioned ones would be paired with nothing."""
    files = image_files(path)
    found = [f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()]
    if not found:
        return None
    if len(found) < len(files):
        missing = next(f for f in files if not f.with_suffix(".txt").is_file())
        raise ValueError(f"data.path: {len(files) - len(found)} of {len(files)} images have no caption file (e.g. "
                         f"{missing.with_suffix('.txt')}); caption every image or none")
    return [read_text(f, "data.path caption").strip() for f in found]


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark, as Windows editors write, is dropped); other encodings are one line."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _image_mode(shape: tuple[int, ...]) -> str:
    """The PIL mode of a teacher's samples (before any file is read: the teacher may take no images at all)."""
    if len(shape) != 3:
        raise ValueError(f"data.source image_folder needs an image teacher; this teacher's samples have shape "
                         f"{list(shape)}")
    mode = {1: "L", 3: "RGB"}.get(shape[0])
    if mode is None:
        raise ValueError(f"data.source image_folder needs a 1- or 3-channel teacher, got {shape[0]} channels")
    return mode


def _image_folder(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    _image_mode(shape)
    return _load_images(image_files(path), shape)


def _load_images(files: list[Path], shape: tuple[int, ...]) -> torch.Tensor:
    """``files`` resized to ``shape`` ``[C, H, W]``, in [-1, 1]."""
    from PIL import Image

    mode, (c, h, w) = _image_mode(shape), shape
    arrays = [np.asarray(Image.open(f).convert(mode).resize((w, h), Image.BICUBIC), dtype=np.float32) for f in files]
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    return x[:, None] if c == 1 else x.permute(0, 3, 1, 2)


def latent_table(path: str, teacher, cache_dir: Path) -> torch.Tensor:
    """The images under ``path`` as the latent teacher's VAE latents ``[N, C, h, w]``, cached as safetensors.

    The key covers the file list (names, sizes, mtimes), the teacher and its resolution; one deterministic posterior
    sample per image (seed 0), as the diffusers training scripts cache them.
    """
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from .families import images_to_latents

    res = teacher.meta["resolution"]
    files = image_files(path)
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([teacher.cache_id, res, stamp]).encode()).hexdigest()[:16]
    file = Path(cache_dir) / "latents" / f"{key}.safetensors"
    if file.exists():
        return load_file(str(file))["latents"]
    gen = torch.Generator().manual_seed(0)
    # 16 images at a time: only the latents of a large folder are held, not all of its pixels (24 MiB per 1024 px
    # image in float32)
    latents = torch.cat([images_to_latents(teacher.vae, _load_images(files[i:i + 16], (3, res, res)), gen)
                         for i in range(0, len(files), 16)])
    with atomic_file(file) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp))
    return latents


class DataSource:
    """An endless stream of training batches drawn with the caller's generator (so resume replays exactly).

    ``conditions``: a prompt table ``{key: [N, ...]}``; each batch draws its rows independently of the images.
    ``latents``: for latent teachers, the image folder already encoded (``latent_table``).
    ``captions``: the images' own captions encoded like the prompts, one row per image (``image_captions``).
    """

    def __init__(self, kind: str, *, batch_size: int, sample_shape: tuple[int, ...],
                 mixture: GaussianMixture | None = None, path: str | None = None, labels: bool = False,
                 conditions: dict[str, torch.Tensor] | None = None, latents: torch.Tensor | None = None,
                 captions: dict[str, torch.Tensor] | None = None):
        self.kind, self.batch_size, self.labels = kind, batch_size, labels
        self.mixture = mixture
        self.conditions, self.captions = conditions, captions
        self.tensor, self.targets = None, None
        if kind == "gmm":
            if mixture is None:
                raise ValueError("data.source gmm needs a teacher.gmm teacher")
        elif kind == "digits":
            self.tensor, self.targets = digits_tensor()
            if tuple(sample_shape) != (1, 8, 8):
                raise ValueError(f"data.source digits gives 1x8x8 samples; the teacher takes {sample_shape}")
        elif kind == "image_folder":
            if not path:
                raise ValueError("data.source image_folder needs data.path")
            self.tensor = latents if latents is not None else _image_folder(path, tuple(sample_shape))
        elif kind == "gaussian":
            self.shape = tuple(sample_shape)
        else:
            raise ValueError(f"data.source: unknown {kind!r}; allowed: gmm, digits, image_folder, gaussian")

    def next(self, generator: torch.Generator) -> Batch:
        n, idx = self.batch_size, None
        if self.kind == "gmm":
            x0, y = self.mixture.sample(n, generator)
        elif self.kind == "gaussian":
            x0, y = torch.randn(n, *self.shape, generator=generator), None
        else:
            idx = torch.randint(0, self.tensor.shape[0], (n,), generator=generator)
            x0 = self.tensor[idx]
            y = None if self.targets is None else self.targets[idx]
        cond = {"class_labels": y} if (self.labels and y is not None) else None
        x0_cond = cond  # labels belong to their samples
        if self.conditions is not None:
            rows = torch.randint(0, next(iter(self.conditions.values())).shape[0], (n,), generator=generator)
            cond = {k: v[rows] for k, v in self.conditions.items()}
            x0_cond = None if self.captions is None or idx is None else {k: v[idx] for k, v in self.captions.items()}
        return Batch(x0=x0, cond=cond, generator=generator, x0_cond=x0_cond)

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - convenience
        gen = torch.Generator().manual_seed(0)
        while True:
            yield self.next(gen)
