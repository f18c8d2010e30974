"""Speed of exported SD-family students against their teacher's default call, side by side in one run.

    python benchmarks/bench_family_speed.py [--families sd15 sdxl sd3 flux] [--sizes tiny mid full] [--repeats 3]
                                            [--device cuda] [--dtype float16] [--outputs np latent] [--images 8]

For each family and size: the teacher is saved as its stock pipeline; stepdistill distils a 1-step and a 4-step
student from it (progressive distillation, a few training steps: the weights do not matter for speed) and exports
them; then, interleaved on ``--device`` (CUDA when there is one) in ``--dtype``, median of ``--repeats``:

* the teacher's *default* call (SD1.5/SDXL 50 steps with CFG, SD3 28 with CFG, FLUX 28 with its embedded guidance)
  and each student's exported call (``stepdistill.json`` ``call``), end to end;
* the pieces the student's call is made of, timed directly on the inputs a watched call gave them (``watch``): its
  fixed work (the pipeline's own ``encode_prompt``, once and without a negative prompt, since the student carries its
  guidance; ``prepare_latents``; ``vae.decode`` and ``image_processor.postprocess`` to the output type) and one
  backbone evaluation at the batch the student needs (its images). The bar: student call / (fixed + k evaluations)
  <= 1.1, k the backbone calls the call made; a wasted CFG batch, a second prompt encoding or a negative prompt
  encoded is what would break it (each is also flagged: ``waste``);
* the teacher's pieces alike (its CFG encoding, one evaluation at its CFG batch), a check that the model of the cost
  holds for the stock call too, and one evaluation at half the CFG batch: the CFG pair's measured cost, in
  evaluations (not an assumed 2), from which the ideal speedup (the teacher's backbone calls x that factor / k) is
  computed, beside the measured one.

``tiny`` are the test models of ``stepdistill/tiny.py``; ``mid`` are wider random models of the same families (about
10-20M backbone parameters at 32x32 latents) where the backbone, not the text encoders or the VAE, dominates;
``full`` (SD1.5 only) has SD1.5's own shapes with random weights: the 860M-parameter UNet, the 123M-parameter CLIP
ViT-L text encoder and the 84M-parameter VAE, at 512x512 pixels (64x64 latents), for GPU figures that carry over to
the real checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
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


def _backbone(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


#: what the stock call does around its denoising loop, watched and replayed: (owner, method) by attribute path
FIXED_WORK = (("", "encode_prompt"), ("", "prepare_latents"), ("vae", "decode"), ("image_processor", "postprocess"))


def _kept(x):
    """``x`` with every tensor in it detached and copied (nested dicts, lists and tuples followed)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _kept(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_kept(v) for v in x)
    return x


def watch(pipe, kwargs: dict, output: str, images: int = 1) -> dict:
    """One call of ``pipe``, run and watched: every backbone call (the rows of its input batch, so a CFG step, the
    conditional and unconditional halves as one batch, is 2 rows per image, and a scheduler that calls twice per step
    shows as it runs) with the first call's inputs kept, and the inputs of each piece of the stock call's fixed work
    (``FIXED_WORK``: the pipeline's own ``encode_prompt``, ``prepare_latents``, ``vae.decode`` and
    ``image_processor.postprocess``), each call of them kept, so a second text encoding shows too."""
    seen = {"rows": [], "eval": None, **{name: [] for _, name in FIXED_WORK}}

    def count(_module, args, kw):
        x = args[0] if args else kw.get("sample", kw.get("hidden_states"))
        seen["rows"].append(x.shape[0])
        if seen["eval"] is None:
            seen["eval"] = (_kept(args), _kept(kw))

    def recording(name, method):
        def record(*args, **kw):
            seen[name].append((_kept(args), _kept(kw)))
            return method(*args, **kw)
        return record

    handle = _backbone(pipe).register_forward_pre_hook(count, with_kwargs=True)
    owners = [(getattr(pipe, owner) if owner else pipe, name) for owner, name in FIXED_WORK]
    for obj, name in owners:  # an instance attribute shadows the class's method for this call only
        setattr(obj, name, recording(name, getattr(obj, name)))
    try:
        timed(pipe, kwargs, output, images)
    finally:
        handle.remove()
        for obj, name in owners:
            delattr(obj, name)
    return seen


def _fresh(x):
    """``x`` with any ``torch.Generator`` in it replaced by a new seeded one (a replay draws the same noise)."""
    if isinstance(x, torch.Generator):
        return torch.Generator(x.device).manual_seed(0)
    if isinstance(x, dict):
        return {k: _fresh(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_fresh(v) for v in x)
    return x


def fixed_work(pipe, seen: dict, cfg: bool) -> dict:
    """The stock call's fixed work, as callables to time directly on the inputs the watched call (``seen``) gave them:
    ``encode`` (the pipeline's ``encode_prompt``, once; with ``cfg`` False, as a call without CFG makes it: no
    negative prompt encoded), ``latents`` (``prepare_latents``, a fresh generator) and, when the call decoded,
    ``decode`` (``vae.decode`` then ``image_processor.postprocess`` to the call's output type)."""
    (args, kw), *_ = seen["encode_prompt"]
    bound = inspect.signature(pipe.encode_prompt).bind(*args, **kw)
    bound.apply_defaults()
    if not cfg:
        for name in bound.arguments:
            if name == "do_classifier_free_guidance":
                bound.arguments[name] = False
            elif name.startswith("negative_"):
                bound.arguments[name] = None
    pieces = {"encode": lambda: pipe.encode_prompt(*bound.args, **bound.kwargs)}
    (l_args, l_kw), *_ = seen["prepare_latents"]
    pieces["latents"] = lambda: pipe.prepare_latents(*_fresh(l_args), **_fresh(l_kw))
    if seen["decode"]:
        (d_args, d_kw), *_ = seen["decode"]
        (p_args, p_kw), *_ = seen["postprocess"]
        latents, vae_dtype = (d_args[0] if d_args else d_kw["z"]), pipe.vae.dtype
        upcast = latents.dtype != vae_dtype  # SDXL's force_upcast in float16: the call casts the VAE there and back

        def decode():
            if upcast:
                pipe.vae.to(latents.dtype)
            out = pipe.vae.decode(*_fresh(d_args), **_fresh(d_kw))
            if upcast:
                pipe.vae.to(vae_dtype)
            return pipe.image_processor.postprocess(out[0] if isinstance(out, tuple) else out.sample, *p_args[1:],
                                                    **p_kw)
        pieces["decode"] = decode
    return pieces


def _rebatch(x, seen: int, batch: int):
    """``x`` (a backbone input, nested) with every tensor of ``seen`` rows cut to, or repeated up to, ``batch``."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or x.shape[0] != seen or batch == seen:
            return x
        return x[:batch] if batch < seen else x.repeat(batch // seen, *[1] * (x.dim() - 1))
    if isinstance(x, dict):
        return {k: _rebatch(v, seen, batch) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rebatch(v, seen, batch) for v in x)
    return x


def one_evaluation(pipe, seen: dict, batch: int):
    """One backbone evaluation on the inputs of the watched call's first one, at ``batch`` rows, as a callable."""
    args, kw = seen["eval"]
    rows = seen["rows"][0]
    args, kw = _rebatch(args, rows, batch), _rebatch(kw, rows, batch)
    backbone = _backbone(pipe)
    return lambda: backbone(*args, **kw)


def clock(fn) -> float:
    """Seconds ``fn()`` takes under ``torch.no_grad`` (as in the pipelines' calls), the device synchronised."""
    cuda = torch.cuda.is_available()
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - start


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


def _median_rounds(times: dict, names) -> float:
    """Median over the timed rounds of the sum of ``names``' times in each round (pieces timed in the same round)."""
    names = [n for n in names if n in times]
    return statistics.median(sum(r) for r in zip(*(times[n] for n in names))) if names else 0.0


def _waste(pipe, seen: dict, images: int, cfg: bool) -> list[str]:
    """What a watched call ran beyond what a call with (``cfg``) or without CFG needs, read off what it ran: a CFG
    batch, a second prompt encoding, a negative prompt encoded."""
    found = []
    if max(seen["rows"]) > images * (2 if cfg else 1):
        found.append(f"backbone batch {max(seen['rows'])} where {images * (2 if cfg else 1)} is needed")
    if len(seen["encode_prompt"]) > 1:
        found.append(f"encode_prompt called {len(seen['encode_prompt'])} times")
    args, kw = seen["encode_prompt"][0]
    bound = inspect.signature(pipe.encode_prompt).bind(*args, **kw)
    bound.apply_defaults()
    if not cfg and bound.arguments.get("do_classifier_free_guidance"):
        found.append("encode_prompt encoded the negative prompt too (do_classifier_free_guidance=True)")
    return found


def bench(family: str, size: str, repeats: int, work: Path, device: str, dtype: torch.dtype,
          outputs: list[str], images: int = 1) -> list[dict]:
    """Times, interleaved on one machine: the teacher's default call and each student's exported call end to end,
    and the pieces the student call is made of, measured directly (``fixed_work``, and one backbone evaluation at the
    batch the student needs: its images, no CFG); and for the teacher, one evaluation at its CFG batch and at half of
    it (the CFG pair's cost, measured). One row per student step count and output type."""
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
    teacher_seen = {output: watch(teacher, teacher_call, output, images) for output in outputs}  # also warm-ups
    teacher_nfe = sum(teacher_seen[outputs[0]]["rows"]) / images
    if teacher_nfe != steps * (2 if cfg else 1):  # the default call is what ECOSYSTEM.md §1.3 says it is
        raise SystemExit(f"{family}: the teacher's default call ran {teacher_nfe:g} evaluations, not {steps}"
                         + (" x 2 (CFG)" if cfg else ""))
    params = sum(p.numel() for p in _backbone(teacher).parameters())
    rows = []
    for student_steps in (1, 4):
        folder = distil_and_export(teacher_dir, family, student_steps, work / f"{family}-{size}-{student_steps}",
                                   px)
        student = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        student.set_progress_bar_config(disable=True)
        call = json.loads((folder / "stepdistill.json").read_text())["call"]
        for output in outputs:  # "np": end to end; "latent": without the VAE decode, which no step count changes
            seen, t_seen = watch(student, call, output, images), teacher_seen[output]  # the student's warm-up
            # the exported student carries its guidance (export.py: no CFG at sampling time): its call needs one
            # prompt encoding and one evaluation at its images per step; anything more is waste the ratio shows
            jobs = {"student": lambda: timed(student, call, output, images),
                    **fixed_work(student, seen, cfg=False), "eval": one_evaluation(student, seen, images),
                    "teacher": lambda: timed(teacher, teacher_call, output, images),
                    **{f"teacher_{k}": v for k, v in fixed_work(teacher, t_seen, cfg=cfg).items()},
                    "teacher_eval": one_evaluation(teacher, t_seen, t_seen["rows"][0])}
            if cfg:  # the CFG pair's cost: one evaluation at the teacher's batch against one at half of it
                jobs["teacher_half"] = one_evaluation(teacher, t_seen, t_seen["rows"][0] // 2)
            for fn in jobs.values():
                clock(fn)  # warm-up
            times = {name: [] for name in jobs}
            for _ in range(repeats):  # interleaved: machine load hits every piece alike
                for name, fn in jobs.items():
                    times[name].append(clock(fn))
            med = {name: statistics.median(t) for name, t in times.items()}
            k, k_teacher = len(seen["rows"]), len(t_seen["rows"])
            fixed = _median_rounds(times, ("encode", "latents", "decode"))
            teacher_fixed = _median_rounds(times, ("teacher_encode", "teacher_latents", "teacher_decode"))
            one = med["eval"]
            cfg_factor = med["teacher_eval"] / med["teacher_half"] if cfg else None
            # the teacher's loop in evaluations at the student's batch, a CFG pair at its measured cost
            teacher_evals = k_teacher * (cfg_factor if cfg else 1)
            rows.append({
                "family": family, "size": size, "device": device, "dtype": str(dtype).removeprefix("torch."),
                "output": output, "images": images, "backbone_params_M": round(params / 1e6, 2),
                "teacher_call": f"{steps} steps" + (" x CFG" if cfg else ""), "student_steps": student_steps,
                "teacher_nfe": teacher_nfe, "student_nfe": sum(seen["rows"]) / images,
                "nfe_ratio": teacher_nfe / (sum(seen["rows"]) / images),
                "student_s": round(med["student"], 6), "student_k": k, "student_batch": max(seen["rows"]),
                "student_encode_calls": len(seen["encode_prompt"]),
                "fixed_s": round(fixed, 6), **{f"{n}_s": round(med[n], 6) for n in ("encode", "latents", "decode")
                                                if n in med},
                "eval_s": round(one, 6), "expected_s": round(fixed + k * one, 6),
                "student_ratio": round(med["student"] / (fixed + k * one), 3),
                "waste": _waste(student, seen, images, cfg=False),
                "teacher_s": round(med["teacher"], 6), "teacher_k": k_teacher, "teacher_batch": t_seen["rows"][0],
                "teacher_fixed_s": round(teacher_fixed, 6), "teacher_eval_s": round(med["teacher_eval"], 6),
                "teacher_half_eval_s": round(med["teacher_half"], 6) if cfg else None,
                "cfg_factor": round(cfg_factor, 3) if cfg else None,
                "teacher_ratio": round(med["teacher"] / (teacher_fixed + k_teacher * med["teacher_eval"]), 3),
                "speedup": round(med["teacher"] / med["student"], 2),
                "ideal": round(teacher_evals / k, 2),
                "ideal_with_fixed": round((teacher_fixed + k_teacher * med["teacher_eval"]) / (fixed + k * one), 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}


def _s(x: float) -> str:
    return f"{x:#.3g} s" if x < 1 else f"{x:.2f} s"


def table(rows: list[dict]) -> str:
    """The README's table: per family, size and student step count, the student call against its parts (the bar:
    student / (fixed + k evals) <= 1.1), and the speedup over the teacher's default call beside the ideal one."""
    lines = ["| Family | Backbone | Output | Steps | Student call | Fixed | One eval (batch) | k | Student / (fixed + "
             "k evals) | Teacher call | Teacher / (fixed + k evals) | CFG pair / one eval | Speedup | Ideal (NFE, "
             "measured CFG) | Ideal with fixed work |",
             "|" + "---|" * 15]
    for r in rows:
        cfg = "—" if r["cfg_factor"] is None else f"{r['cfg_factor']:.2f}"
        size = f"{r['size']}, {r['backbone_params_M']:.{2 if r['backbone_params_M'] < 1 else 1}f}M"
        lines.append(
            f"| {NAMES.get(r['family'], r['family'])} | {size} | {r['output']} | "
            f"{r['student_steps']} | {_s(r['student_s'])} | {_s(r['fixed_s'])} | {_s(r['eval_s'])} "
            f"({r['student_batch']}) | {r['student_k']} | **{r['student_ratio']:.2f}** | {_s(r['teacher_s'])} | "
            f"{r['teacher_ratio']:.2f} | {cfg} | {r['speedup']:.1f}x | {r['ideal']:.1f}x | "
            f"{r['ideal_with_fixed']:.1f}x |")
    waste = [f"{r['family']} {r['size']} {r['student_steps']}-step: {'; '.join(r['waste'])}" for r in rows
             if r["waste"]]
    return "\n".join(lines + (["", "waste in the student calls:", *waste] if waste else []))


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
    p.add_argument("--json", help="also write the rows (every measured piece) to this file")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else every core)")
    args = p.parse_args()
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    torch.set_num_threads(max(1, args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for family in args.families:
                rows += bench(family, size, args.repeats, Path(tmp), args.device, getattr(torch, args.dtype),
                              args.outputs, args.images)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
