"""Peak memory of a DMD2 step with LoRA roles vs a plain LoRA fine-tune step vs full copies, measured in one run.

    python benchmarks/bench_memory.py [--width 128] [--batch 8] [--rank 16] [--gradient-checkpointing]
                                      [--family sd15 | sd15-full] [--modes lora_finetune dmd2_lora] [--iters 3]

A mid-size UNet2DModel teacher (32x32x3, attention in the middle blocks) is saved as a DDPM pipeline; each mode runs in
its own fresh process, which reports the peak of its live tensors (weights, optimizer states, gradients and
activations): ``torch.cuda.max_memory_allocated`` on CUDA, the same count from the profiler's memory events on CPU
(``--cpu-measure rss`` takes ``peak RSS - RSS after imports`` instead, which also counts cached pages). Modes:

* ``lora_finetune``: the base frozen plus one LoRA adapter, one denoising step (forward, backward, AdamW): the
  reference the DMD/DMD2 issue's bar compares against;
* ``dmd2_lora``: a DMD2 iteration (student phase and fake-score phase, GAN head on) with ``roles.mode: lora``;
* ``dmd2_full``: the same with ``roles.mode: full`` (a copy of the network per role).

``--family sd15`` uses the mid-size random SD1.5-type pipeline of ``bench_family_speed.py`` instead (34M-parameter
UNet2DConditionModel, 32x32x4 latents, prompt-conditioned, the LoRA targets of ``families.py``); prompts and image
latents are encoded once by the parent process, so no child holds the text encoders. ``--family sd15-full`` is SD1.5's
own architecture with random weights (``bench_family_speed.full_pipeline``: 860M-parameter UNet, 512x512 pixels,
64x64 latents), for GPU figures that carry over to the real checkpoint.

Prints one JSON object with the figures in MiB and the ratios to ``lora_finetune``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def measured(how: str):
    """Yields a dict that holds the block's peak memory in MiB (``peak_mib``) once the block is done.

    CUDA: the allocator's peak of live tensors (``max_memory_allocated``; nothing is on the device before the block).
    CPU, ``tensors``: the same quantity, from the CPU allocator's allocation and free events as ``torch.profiler``
    records them (``profile_memory=True``), summed in time order. CPU, ``rss``: the process's peak resident set
    minus its size before the block, which also counts the allocator's cached and fragmented pages.
    """
    import torch

    out = {}
    if torch.cuda.is_available():
        yield out
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    elif how == "rss":
        base = rss_mib()
        yield out
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # Linux reports KiB
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield out
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        out["peak_mib"] = peak / 2**20


MODES = ("lora_finetune", "dmd2_lora", "dmd2_full")
PROMPTS = Path(__file__).resolve().parents[1] / "recipes" / "prompts" / "smoke.txt"
#: pixel resolution of each teacher (None: the UNet2DModel)
RESOLUTION = {None: 32, "sd15": 64, "sd15-full": 512}


def build_teacher(folder: Path, width: int, family: str | None) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    from stepdistill.teachers import DEFAULT_SCHEDULER

    torch.manual_seed(0)
    size = RESOLUTION[family]
    if family:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_family_speed import build

        build("sd15", "full" if family == "sd15-full" else "mid").save_pretrained(folder / "teacher")
    else:
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DEFAULT_SCHEDULER)).save_pretrained(
            folder / "teacher")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):  # the GAN's "real data": any images of the right size
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    if family:  # fill the prompt and latent caches here, so that no measured child loads text encoders
        _family_data(folder, batch=1, resolution=size)


def _family_data(folder: Path, batch: int, resolution: int):
    """The SD-family teacher with its null condition set, and a data source of cached latents and prompts."""
    from stepdistill.conditioning import load_or_encode, read_prompts
    from stepdistill.data import DataSource, latent_table
    from stepdistill.teachers import cache_root, load_pretrained

    teacher = load_pretrained(str(folder / "teacher"), resolution=resolution)
    table, null = load_or_encode(lambda: teacher.load_pipeline(unet=teacher.backbone, vae=teacher.vae),
                                 teacher.family.name, read_prompts(str(PROMPTS)), teacher_id=teacher.source,
                                 cache_dir=cache_root(), settings=teacher.encode_settings)
    teacher.denoiser.set_null_condition(null)
    latents = latent_table(str(folder / "images"), teacher, cache_root())
    data = DataSource("image_folder", batch_size=batch, sample_shape=teacher.sample_shape, path=str(folder / "images"),
                      conditions=table, latents=latents)
    return teacher, data


def recipe(folder: Path, mode: str, batch: int, rank: int, ckpt: bool, gan: float = 3e-3,
           family: str | None = None) -> dict:
    return {
        "teacher": {"pretrained": str(folder / "teacher"), **({"resolution": RESOLUTION[family]} if family else {})},
        "method": {"name": "dmd2", "student_steps": 1, "gan_weight": gan},
        "roles": {"mode": mode, "rank": rank, "alpha": rank},
        "data": {"source": "image_folder", "path": str(folder / "images"), "batch_size": batch,
                 **({"prompts": str(PROMPTS)} if family else {})},
        "train": {"max_steps": 10, "num_sample_images": 4, "gradient_checkpointing": ckpt},
        "export": {"pipeline": False},
    }


def run_mode(mode: str, folder: Path, batch: int, rank: int, ckpt: bool, gan: float = 3e-3,
             family: str | None = None, how: str = "tensors", iters: int = 3) -> dict:
    with measured(how) as out:
        (_lora_finetune if mode == "lora_finetune" else _dmd2)(mode, folder, batch, rank, ckpt, gan, family, iters)
    return {"mode": mode, "peak_mib": round(out["peak_mib"], 1)}


def _lora_finetune(mode, folder, batch, rank, ckpt, gan, family, iters) -> None:
    """The reference: the base frozen plus one LoRA adapter, ``iters`` denoising steps (forward, backward, AdamW)."""
    import torch

    from stepdistill.data import DataSource
    from stepdistill.lora import UNET2D_TARGETS, AdapterDenoiser, add_adapters
    from stepdistill.teachers import load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if family:
        teacher, data = _family_data(folder, batch, RESOLUTION[family])
        targets = teacher.family.lora_targets
    else:
        teacher = load_pretrained(str(folder / "teacher"))
        data = DataSource("image_folder", batch_size=batch, sample_shape=teacher.sample_shape,
                          path=str(folder / "images"))
        targets = UNET2D_TARGETS
    teacher.backbone.to(device)
    add_adapters(teacher.backbone, ["student"], rank=rank, alpha=rank, target_modules=targets)
    if ckpt:
        teacher.denoiser.enable_gradient_checkpointing()
    net = AdapterDenoiser(teacher.denoiser, "student")
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        batch_ = data.next(g)
        x0 = batch_.x0.to(device)
        t = torch.rand(batch, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g).to(device)
        cond = None if batch_.cond is None else {k: v.to(device) for k, v in batch_.cond.items()}
        pred = net(net.schedule.add_noise(x0, eps, t.to(device)), t, cond)
        loss = ((pred.get("v", exact=True) - pred.coeffs.a * eps.double() + pred.coeffs.s * x0.double()) ** 2)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _dmd2(mode, folder, batch, rank, ckpt, gan, family, iters) -> None:
    """``iters`` DMD2 iterations (student phase, fake-score phase) of a real Trainer, roles as in ``mode``."""
    import torch

    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    torch.manual_seed(0)
    cfg = build_recipe(recipe(folder, mode.split("_")[1], batch, rank, ckpt, gan, family))
    trainer = Trainer(cfg, folder / f"run-{mode}", overwrite=True, show_progress=False).setup()
    for _ in range(iters):
        trainer._run_phase("student")
        trainer._run_phase("fake_score")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=128, help="first block's channels (37M parameters at 128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true", help="in every mode")
    p.add_argument("--gan-weight", type=float, default=3e-3, help="DMD2's GAN term (0: distribution matching only)")
    p.add_argument("--family", choices=["sd15", "sd15-full"],
                   help="a mid-size (sd15) or SD1.5-sized (sd15-full) SD1.5-type teacher instead of the UNet2DModel")
    p.add_argument("--cpu-measure", choices=["tensors", "rss"], default="tensors",
                   help="on CPU: peak of live tensors (profiler memory events, as CUDA's allocator counts) or RSS")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="which to measure (lora_finetune, the reference, always runs)")
    p.add_argument("--iters", type=int, default=3,
                   help="steps per mode (AdamW's states exist from the first; 2 is enough for the peak)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child[0], Path(args.child[1]), args.batch, args.rank,
                                  args.gradient_checkpointing, args.gan_weight, args.family, args.cpu_measure,
                                  args.iters)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["STEPDISTILL_CACHE"] = str(folder / "cache")  # the children inherit it
        build_teacher(folder, args.width, args.family)
        out = {}
        for mode in ("lora_finetune", *(m for m in args.modes if m != "lora_finetune")):
            flags = ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            argv = [sys.executable, __file__, "--batch", str(args.batch), "--rank", str(args.rank),
                    "--gan-weight", str(args.gan_weight), "--cpu-measure", args.cpu_measure, *flags,
                    "--iters", str(args.iters),
                    *(["--family", args.family] if args.family else []),
                    "--child", mode, str(folder)]
            proc = subprocess.run(argv, capture_output=True, text=True, check=True)
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        from diffusers import UNet2DConditionModel, UNet2DModel

        cls = UNet2DConditionModel if args.family else UNet2DModel
        params = sum(p.numel() for p in cls.from_pretrained(folder / "teacher" / "unet").parameters())
    ref = out["lora_finetune"]
    print(json.dumps({"family": args.family or "unet2d", "teacher_params_M": round(params / 1e6, 1),
                      "batch": args.batch, "iters": args.iters, "rank": args.rank, "gan_weight": args.gan_weight,
                      "gradient_checkpointing": args.gradient_checkpointing,
                      "measure": "cuda max_memory_allocated" if _cuda() else f"cpu {args.cpu_measure}",
                      "peak_mib": out, "ratio_to_lora_finetune": {k: round(v / ref, 2) for k, v in out.items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
