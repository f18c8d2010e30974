"""Sample grids people can look at: image tiles, or a scatter plot for vector data (first two coordinates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(x: torch.Tensor, *, scale: int = 4) -> Image.Image:
    """``[N, C, H, W]`` in [-1, 1] -> one PNG-ready tile image (near-square grid, nearest-neighbour upscaled)."""
    n, c, h, w = x.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img[i]
    mode = "L" if c == 1 else "RGB"
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas[..., :3], mode)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def scatter(x: torch.Tensor, *, reference: torch.Tensor | None = None, size: int = 400) -> Image.Image:
    """Scatter of the first two coordinates of ``x`` (red) over ``reference`` samples (grey)."""
    pts = [p for p in (reference, x) if p is not None]
    allp = torch.cat([p[:, :2].float() for p in pts])
    lo, hi = allp.min(0).values, allp.max(0).values
    span = (hi - lo).clamp(min=1e-6) * 1.1
    mid = (hi + lo) / 2
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def to_px(p):
        q = ((p[:, :2].float() - mid) / span + 0.5) * (size - 1)
        return q.numpy()

    for p, color in ((reference, (190, 190, 190)), (x, (200, 30, 30))):
        if p is None:
            continue
        for u, v in to_px(p):
            draw.ellipse((u - 1.5, size - 1 - v - 1.5, u + 1.5, size - 1 - v + 1.5), fill=color)
    return img


def save_sample_grid(x: torch.Tensor, path: str | Path, *, mixture=None) -> Path:
    """Write samples to ``path``: tiles for images, a scatter (over true mixture samples) for vectors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        image_grid(x).save(path)
    else:
        ref = mixture.sample(1000, torch.Generator().manual_seed(0))[0] if mixture is not None else None
        scatter(x, reference=ref).save(path)
    return path


def compare_grid(columns: list[torch.Tensor], labels: list[str], prompts: list[str], *,
                 cell: int = 192) -> Image.Image:
    """Side-by-side picture: one row per prompt (written at the left), one column per ``[N, 3, H, W]`` image set in
    [0, 1] (``labels`` on top), every image scaled to ``cell`` pixels high (nearest for small latents' images)."""
    rows, (h, w) = columns[0].shape[0], columns[0].shape[-2:]
    width = max(1, round(cell * w / h))
    text_w, head, pad = 220, 24, 4
    canvas = Image.new("RGB", (text_w + len(columns) * (width + pad) + pad, head + rows * (cell + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((text_w + pad + j * (width + pad), 6), label, fill="black")
    for i in range(rows):
        top = head + pad + i * (cell + pad)
        draw.multiline_text((pad, top + 4), _wrap(prompts[i], 34), fill="black")
        for j, images in enumerate(columns):
            px = (images[i].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(px, "RGB").resize((width, cell), Image.NEAREST if h < cell else Image.BICUBIC)
            canvas.paste(tile, (text_w + pad + j * (width + pad), top))
    return canvas


def _wrap(text: str, chars: int, lines: int = 8) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, chars)[:lines])
