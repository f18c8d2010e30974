"""Peak memory of a DMD2 (or SiD) step with LoRA roles vs a plain LoRA fine-tune step vs full copies, in one run.

    python benchmarks/bench_memory.py [--width 128] [--batch 8] [--rank 16] [--gradient-checkpointing]
                                      [--family sd15 | sd15-full] [--modes lora_finetune dmd2_lora] [--iters 3]
                                      [--base-dtype bfloat16]

A mid-size UNet2DModel teacher (32x32x3, attention in the middle blocks) is saved as a DDPM pipeline; each mode runs in
its own fresh process, which reports the peak of its live tensors (weights, optimizer states, gradients and
activations) while its training steps run (``peak_of_steps``; loading the models is not a training step):
``torch.cuda.max_memory_allocated`` on CUDA, the same count from the profiler's memory events on CPU
(``--cpu-measure rss`` takes the peak resident set instead, which also counts cached pages). Modes:

* ``lora_finetune``: the base frozen plus one LoRA adapter, one denoising step (forward, backward, AdamW): the
  reference the DMD/DMD2 issue's bar compares against;
* ``dmd2_lora``: a DMD2 iteration (student phase and fake-score phase, GAN head on) with ``roles.mode: lora``;
* ``dmd2_full``: the same with ``roles.mode: full`` (a copy of the network per role);
* ``sid_lora`` / ``sid_full``: a SiD iteration (fake-score phase, then the generator's loss through the inputs of the
  teacher and the fake score, no GAN term) with LoRA roles / full copies; ``sidseq_*``: the same with
  ``method.backward: sequential`` (one score network's graph alive at a time);
* ``phased1_lora``: a phased DMD iteration of a 4-step student with one phase (one LoRA expert, one LoRA critic), the
  reference of the phased DMD issue's bar; ``phased4_lora`` / ``phased4_full``: four phases, an expert and a critic
  per phase, as LoRA adapters on the one base / as full copies (``schedule: all``: every phase's update each
  iteration, so every expert's and critic's optimizer state is resident).
* ``ladd_lora``: a LADD iteration (student phase through the frozen teacher's features, then the heads' phase) of a
  LoRA student with the discriminator on the teacher's own blocks (the adversarial issue's bar: at most 10% over
  ``lora_finetune``); ``laddenc_lora``: the same with SDXL-Lightning's trainable encoder copy, a LoRA adapter.

``--family sd15`` uses the mid-size random SD1.5-type pipeline of ``bench_family_speed.py`` instead (34M-parameter
UNet2DConditionModel, 32x32x4 latents, prompt-conditioned, the LoRA targets of ``families.py``); prompts and image
latents are encoded once by the parent process, so no child holds the text encoders. ``--family sd15-full`` is SD1.5's
own architecture with random weights (``bench_family_speed.full_pipeline``: 860M-parameter UNet, 512x512 pixels,
64x64 latents), for GPU figures that carry over to the real checkpoint.

``--base-dtype bfloat16`` stores the frozen base in bf16 in every mode (float32 adapters, bf16 autocast): what one runs
on a GPU (``roles.teacher_dtype: bfloat16``, ``train.mixed_precision: bf16``; full copies keep their trained roles in
float32).

Prints one JSON object with the figures in MiB and the ratios to ``lora_finetune``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_hwm_mib() -> float:
    """The process's peak resident set since the last reset (``/proc/self/clear_refs``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_events(prof) -> list:
    return sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                  key=lambda e: e.start_ns())


def peak_of_steps(setup, iters: int, how: str) -> float:
    """Peak memory in MiB while ``iters`` training steps run: the tensors already resident (weights, caches) plus
    the most the steps add on top. ``setup()`` builds everything and returns the step function; its own transient
    peak (loading weights, casting them) is not the training step's and is left out.

    CUDA: the allocator's peak of live tensors (``max_memory_allocated``, reset after setup). CPU, ``tensors``: the
    same quantity from the CPU allocator's allocation and free events as ``torch.profiler`` records them
    (``profile_memory=True``): the net bytes the setup left allocated, plus the peak of the steps' running sum.
    CPU, ``rss``: the peak resident set during the steps minus the size before setup, which also counts the
    allocator's cached and fragmented pages.
    """
    import torch

    if torch.cuda.is_available():
        step = setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    if how == "rss":
        base = rss_mib()
        step = setup()
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
        for _ in range(iters):
            step()
        return vm_hwm_mib() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = setup()
    resident = sum(e.nbytes() for e in _memory_events(prof))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(iters):
            step()
    live = peak = 0
    for e in _memory_events(prof):
        live += e.nbytes()
        peak = max(peak, live)
    return (resident + peak) / 2**20


MODES = ("lora_finetune", "dmd2_lora", "dmd2_full", "sid_lora", "sid_full", "sidseq_lora", "sidseq_full",
         "phased1_lora", "phased4_lora", "phased4_full", "ladd_lora", "laddenc_lora")
PROMPTS = Path(__file__).resolve().parents[1] / "recipes" / "prompts" / "smoke.txt"
#: pixel resolution of each teacher (None: the UNet2DModel)
RESOLUTION = {None: 32, "sd15": 64, "sd15-full": 512}


def build_teacher(folder: Path, width: int, family: str | None) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from stepdistill.teachers import DEFAULT_SCHEDULER

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_family_speed import build, random_images

    torch.manual_seed(0)
    size = RESOLUTION[family]
    if family:
        build("sd15", "full" if family == "sd15-full" else "mid").save_pretrained(folder / "teacher")
    else:
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DEFAULT_SCHEDULER)).save_pretrained(
            folder / "teacher")
    random_images(folder / "images", size, 16)  # the GAN's "real data": any images of the right size
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
           family: str | None = None, base_dtype: str = "float32", method: str = "dmd2") -> dict:
    bf16 = base_dtype == "bfloat16"
    if method in ("ladd", "laddenc"):  # a few teacher samples as the reals; both phases each iteration
        method = {"name": "ladd", "student_steps": 4, "num_pairs": 16, "pair_steps": 4,
                  "source": "encoder" if method == "laddenc" else "teacher"}
    elif method.startswith("phased"):  # every phase every iteration: each expert's and critic's optimizer state lives
        method = {"name": "phased_dmd", "student_steps": 4, "num_phases": int(method[-1]), "schedule": "all"}
    else:
        method = ({"name": "dmd2", "student_steps": 1, "gan_weight": gan} if method == "dmd2" else
                  {"name": "sid", "alpha": 1.0, "backward": "sequential" if method == "sidseq" else "joint"})
    return {
        "teacher": {"pretrained": str(folder / "teacher"), **({"resolution": RESOLUTION[family]} if family else {})},
        "method": method,
        "roles": {"mode": mode, "rank": rank, "alpha": rank, "teacher_dtype": base_dtype},
        "data": {"source": "image_folder", "path": str(folder / "images"), "batch_size": batch,
                 **({"prompts": str(PROMPTS)} if family else {})},
        "train": {"max_steps": 10, "num_sample_images": 4, "gradient_checkpointing": ckpt,
                  "mixed_precision": "bf16" if bf16 else "no"},
        "export": {"pipeline": False},
    }


def run_mode(mode: str, folder: Path, batch: int, rank: int, ckpt: bool, gan: float = 3e-3,
             family: str | None = None, how: str = "tensors", iters: int = 3, base_dtype: str = "float32") -> dict:
    setup = _lora_finetune if mode == "lora_finetune" else _iteration
    peak = peak_of_steps(lambda: setup(mode, folder, batch, rank, ckpt, gan, family, base_dtype), iters, how)
    return {"mode": mode, "peak_mib": round(peak, 1)}


def _lora_finetune(mode, folder, batch, rank, ckpt, gan, family, base_dtype):
    """The reference: the base frozen plus one LoRA adapter; a step is one denoising step (forward, backward, AdamW
    as the loop builds it)."""
    import torch

    from stepdistill.data import DataSource
    from stepdistill.lora import UNET2D_TARGETS, AdapterDenoiser, add_adapters
    from stepdistill.optim import _fusable
    from stepdistill.roles import cast_frozen, enable_gradient_checkpointing
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
    cast_frozen(teacher.backbone, getattr(torch, base_dtype))  # float32 adapters on the (bf16) base, as the loop does
    if ckpt:
        enable_gradient_checkpointing(teacher.denoiser)
    net = AdapterDenoiser(teacher.denoiser, "student")
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=_fusable(params) or None)
    g = torch.Generator().manual_seed(0)

    def step():
        batch_ = data.next(g)
        x0 = batch_.x0.to(device)
        t = torch.rand(batch, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g).to(device)
        cond = None if batch_.cond is None else {k: v.to(device) for k, v in batch_.cond.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=base_dtype == "bfloat16"):
            pred = net(net.schedule.add_noise(x0, eps, t.to(device)), t, cond)
        loss = ((pred.get("v", exact=True) - pred.coeffs.a * eps.double() + pred.coeffs.s * x0.double()) ** 2)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.keep = teacher  # the VAE stays resident, as in the DMD2 Trainer (sample grids) and diffusers' LoRA scripts
    return step


def _iteration(mode, folder, batch, rank, ckpt, gan, family, base_dtype):
    """A real Trainer with the method and roles of ``mode`` (``dmd2_lora``: DMD2, LoRA roles); a step is one iteration
    (DMD2: student phase, fake-score phase; SiD: fake-score phase, generator phase)."""
    import torch

    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    torch.manual_seed(0)
    method, roles = mode.split("_")
    cfg = build_recipe(recipe(folder, roles, batch, rank, ckpt, gan, family, base_dtype, method))
    trainer = Trainer(cfg, folder / f"run-{mode}", overwrite=True, show_progress=False).setup()
    phases = trainer.method.active_phases(1, trainer.recipe.train.update_every)

    def step():
        for phase in phases:
            trainer._run_phase(phase)

    return step


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
    p.add_argument("--modes", nargs="+", choices=MODES,
                   default=[m for m in MODES if not m.startswith(("phased", "ladd"))],
                   help="which to measure (lora_finetune, the reference, always runs; default: all but phased*, "
                        "ladd*)")
    p.add_argument("--iters", type=int, default=3,
                   help="steps per mode (AdamW's states exist from the first; 2 is enough for the peak)")
    p.add_argument("--base-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the frozen base's storage (bfloat16: with bf16 autocast, float32 adapters)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child[0], Path(args.child[1]), args.batch, args.rank,
                                  args.gradient_checkpointing, args.gan_weight, args.family, args.cpu_measure,
                                  args.iters, args.base_dtype)))
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
                    "--iters", str(args.iters), "--base-dtype", args.base_dtype,
                    *(["--family", args.family] if args.family else []),
                    "--child", mode, str(folder)]
            proc = subprocess.run(argv, capture_output=True, text=True, check=True)
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        from diffusers import UNet2DConditionModel, UNet2DModel

        cls = UNet2DConditionModel if args.family else UNet2DModel
        params = sum(p.numel() for p in cls.from_pretrained(folder / "teacher" / "unet").parameters())
    ref = out["lora_finetune"]
    print(json.dumps({"family": args.family or "unet2d", "teacher_params_M": round(params / 1e6, 1),
                      "batch": args.batch, "iters": args.iters, "base_dtype": args.base_dtype,
                      "rank": args.rank, "gan_weight": args.gan_weight,
                      "gradient_checkpointing": args.gradient_checkpointing,
                      "measure": "cuda max_memory_allocated" if _cuda() else f"cpu {args.cpu_measure}",
                      "peak_mib": out, "ratio_to_lora_finetune": {k: round(v / ref, 2) for k, v in out.items()},
                      **({"ratio_to_phased1_lora": {k: round(v / out["phased1_lora"], 2) for k, v in out.items()
                                                    if k.startswith("phased")}} if "phased1_lora" in out else {})},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
