"""Speed of exported SD-family students against their teacher's default call, side by side in one run.

    python benchmarks/bench_family_speed.py [--families sd15 sdxl sd3 flux] [--sizes tiny mid full] [--repeats 3]
                                            [--device cuda] [--dtype float16] [--outputs np latent] [--images 8]

For each family and size: the teacher is saved as its stock pipeline; stepdistill distils a 1-step and a 4-step
student from it (progressive distillation, a few training steps: the weights do not matter for speed) and exports
them; then the teacher's *default* call (SD1.5/SDXL 50 steps with CFG, SD3 28 with CFG, FLUX 28 with its embedded
guidance) and each student's exported call (``stepdistill.json`` ``call``) are timed end to end (prompt encoding,
denoising, VAE decoding), interleaved, on ``--device`` (CUDA when there is one) in ``--dtype``. Reports the measured
speedup, the ideal speedup (ratio of network evaluations, a CFG step counting 2, counted by a hook on the backbone
as each call runs) and their ratio; the bar is >= 0.8.

``tiny`` are the test models of ``stepdistill/tiny.py``; ``mid`` are wider random models of the same families (about
10-20M backbone parameters at 32x32 latents) where the backbone, not the text encoders or the VAE, dominates;
``full`` (SD1.5 only) has SD1.5's own shapes with random weights: the 860M-parameter UNet, the 123M-parameter CLIP
ViT-L text encoder and the 84M-parameter VAE, at 512x512 pixels (64x64 latents), for GPU figures that carry over to
the real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "recipes" / "prompts" / "smoke.txt"

#: the teacher's default call: steps and whether each step is a CFG pair (ECOSYSTEM.md §1.3)
DEFAULTS = {"sd15": (50, True), "sdxl": (50, True), "sd3": (28, True), "flux": (28, False)}


def mid_pipeline(family: str):
    """A wider random model of ``family`` (same components as the tiny one, bigger backbone)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    from stepdistill.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES[family]()
    torch.manual_seed(0)
    if family == "sd15":
        backbone = UNet2DConditionModel(
            block_out_channels=(128, 256, 256), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            norm_num_groups=32, attention_head_dim=8)
    elif family == "sdxl":
        backbone = UNet2DConditionModel(
            block_out_channels=(128, 256, 256), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 8),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=32)
    elif family == "sd3":
        backbone = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=64, num_attention_heads=6,
            caption_projection_dim=384, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    else:
        backbone = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=4, num_single_layers=8, attention_head_dim=64,
            num_attention_heads=6, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 24, 24],
            guidance_embeds=False)
    pipe.register_modules(**{"unet" if family in ("sd15", "sdxl") else "transformer": backbone.eval()})
    return pipe


def full_pipeline(family: str):
    """SD1.5's architecture (runwayml/stable-diffusion-v1-5 configs) with random weights: the real costs per call."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from stepdistill.tiny import _clip_config, _sd_scheduler, clip_tokenizer

    if family != "sd15":
        raise SystemExit(f"size 'full' is built for sd15 only, not {family}")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of ~1B parameters
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text = CLIPTextModel(_clip_config(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, vocab_size=49408, projection_dim=768,
                                          hidden_act="quick_gelu"))
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to("cpu")


def distil_and_export(teacher_dir: Path, family: str, steps: int, run_dir: Path, px: int) -> Path:
    """A real stepdistill run (PD, 2 training steps) on the saved teacher, exported as the stock pipeline."""
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    flow = family in ("sd3", "flux")
    recipe = {
        "teacher": {"pretrained": str(teacher_dir), "family": family, "resolution": px,
                    **({"max_sequence_length": 16} if flow else {})},
        # SD's eps teachers: a v-student needs the regression stage first (PD refuses it otherwise); one step of it
        "method": {"name": "progressive", "teacher_steps": 2 * steps, "final_steps": steps, "steps_per_stage": 2,
                   "student_prediction": "flow_match" if flow else "v", **({} if flow else {"regression_steps": 1})},
        "data": {"source": "gaussian", "prompts": str(PROMPTS), "batch_size": 1},
        "train": {"max_steps": 2, "num_sample_images": 1, "log_every": 1},
    }
    trainer = Trainer(build_recipe(recipe), run_dir, show_progress=False).setup()
    trainer.train()
    return trainer.export()


def evaluations(pipe, kwargs: dict, output: str, images: int = 1) -> float:
    """Network evaluations of one call, counted: rows of the backbone's input batch per image, so a CFG step (the
    conditional and unconditional halves as one batch of 2) is 2, and a scheduler that calls twice per step (or
    once more than its step count, as PNDM does) is counted as it runs."""
    backbone = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    rows = []

    def count(_module, args, kw):
        x = args[0] if args else kw.get("sample", kw.get("hidden_states"))
        rows.append(x.shape[0])

    handle = backbone.register_forward_pre_hook(count, with_kwargs=True)
    try:
        timed(pipe, kwargs, output, images)
    finally:
        handle.remove()
    return sum(rows) / images


def timed(pipe, kwargs: dict, output: str, images: int = 1) -> float:
    start = time.perf_counter()
    pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type=output,
         num_images_per_prompt=images, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # "latent" output does not wait for the GPU by itself
    return time.perf_counter() - start


def resolution(family: str, size: str) -> int:
    """Pixel height and width of the timed calls (and of the distillation runs) for each model size."""
    return {"full": 512, "mid": 64}.get(size, 16 if family == "flux" else 32)


def build(family: str, size: str):
    from stepdistill.tiny import TINY_PIPELINES

    return {"tiny": TINY_PIPELINES[family], "mid": mid_pipeline, "full": full_pipeline}[size](
        *([] if size == "tiny" else [family]))


def random_images(folder: Path, px: int, n: int) -> Path:
    """``n`` random RGB images of ``px`` x ``px`` pixels, each with a caption file: "real data" for DMD2's GAN term
    (which shows each real image with its caption) in the memory and overhead benches, where only their cost
    matters."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"random picture number {i}")
    return folder


def bench(family: str, size: str, repeats: int, work: Path, device: str, dtype: torch.dtype,
          outputs: list[str], images: int = 1) -> list[dict]:
    from diffusers import DiffusionPipeline

    teacher_dir = work / f"{family}-{size}-teacher"
    build(family, size).save_pretrained(teacher_dir)
    px = resolution(family, size)
    teacher = DiffusionPipeline.from_pretrained(teacher_dir, torch_dtype=dtype).to(device)
    teacher.set_progress_bar_config(disable=True)
    steps, cfg = DEFAULTS[family]
    teacher_call = {"height": px, "width": px, "num_inference_steps": steps}  # the pipelines' defaults, spelt out
    if family in ("sd3", "flux"):
        teacher_call["max_sequence_length"] = 16
    teacher_nfe = evaluations(teacher, teacher_call, outputs[0], images)  # also the teacher's warm-up
    if teacher_nfe != steps * (2 if cfg else 1):  # the default call is what ECOSYSTEM.md §1.3 says it is
        raise SystemExit(f"{family}: the teacher's default call ran {teacher_nfe:g} evaluations, not {steps}"
                         + (" x 2 (CFG)" if cfg else ""))
    rows = []
    for student_steps in (1, 4):
        folder = distil_and_export(teacher_dir, family, student_steps, work / f"{family}-{size}-{student_steps}",
                                   px)
        student = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        student.set_progress_bar_config(disable=True)
        call = json.loads((folder / "stepdistill.json").read_text())["call"]
        student_nfe = evaluations(student, call, outputs[0], images)  # also the student's warm-up
        for output in outputs:  # "np": end to end; "latent": without the VAE decode, which no step count changes
            timed(student, call, output, images), timed(teacher, teacher_call, output, images)  # warm-up
            t_student, t_teacher = [], []
            for _ in range(repeats):  # interleaved: machine load hits both alike
                t_student.append(timed(student, call, output, images))
                t_teacher.append(timed(teacher, teacher_call, output, images))
            measured = statistics.median(t_teacher) / statistics.median(t_student)
            ideal = teacher_nfe / student_nfe
            params = sum(p.numel() for p in getattr(teacher, "unet", None).parameters()) if family in (
                "sd15", "sdxl") else sum(p.numel() for p in teacher.transformer.parameters())
            rows.append({"family": family, "size": size, "device": device, "dtype": str(dtype).removeprefix("torch."),
                         "output": output, "images": images, "backbone_params_M": round(params / 1e6, 2),
                         "teacher_call": f"{steps} steps" + (" x CFG" if cfg else ""), "student_steps": student_steps,
                         "teacher_nfe": teacher_nfe, "student_nfe": student_nfe,
                         "teacher_s": round(statistics.median(t_teacher), 4),
                         "student_s": round(statistics.median(t_student), 4), "speedup": round(measured, 2),
                         "ideal": ideal, "ratio_to_ideal": round(measured / ideal, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl", "sd3", "flux"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "full"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="of the timed pipelines (training always runs in the recipe's precision)")
    p.add_argument("--outputs", nargs="+", default=["np"], choices=["np", "latent"],
                   help="output_type of the timed calls: np (end to end) and/or latent (no VAE decode)")
    p.add_argument("--images", type=int, default=1,
                   help="num_images_per_prompt: on a GPU, batch 1 is bound by kernel launches; a batch fills the GPU")
    args = p.parse_args()
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for family in args.families:
                rows += bench(family, size, args.repeats, Path(tmp), args.device, getattr(torch, args.dtype),
                              args.outputs, args.images)
    print("\nfamily size  output   params  student  teacher_s  student_s  speedup  ideal  ratio")
    for r in rows:
        print(f"{r['family']:6} {r['size']:5} {r['output']:6} {r['backbone_params_M']:6.2f}M  "
              f"{r['student_steps']:>5}    "
              f"{r['teacher_s']:8.3f}  {r['student_s']:8.4f}  {r['speedup']:7.1f}  {r['ideal']:5.0f}  "
              f"{r['ratio_to_ideal']:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
