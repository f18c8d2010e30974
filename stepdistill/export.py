"""Export a student as a stock diffusers pipeline whose scheduler config encodes the student grid (DESIGN.md §6).

UNet2DModel students are saved as ``DDPMPipeline(unet, scheduler)`` on the teacher's betas, so
``DiffusionPipeline.from_pretrained(dir)(num_inference_steps=N)`` runs exactly the training grid:

* deterministic grids (progressive distillation, one-step students): ``DDIMScheduler`` with
  ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True`` (ECOSYSTEM.md §0.2: the default spacings put a
  1-step grid at t=0); ``DDPMPipeline`` calls ``scheduler.step(out, t, x, generator=...)`` with DDIM's ``eta=0``.
  A one-step student conditioned on another time (DMD2) uses ``"leading"`` spacing with ``steps_offset`` = that step;
* re-noising grids (DMD2 multi-step): ``LCMScheduler(original_inference_steps=K)``, whose step denoises and then
  re-noises with fresh noise from the pipeline's generator.

The grid is checked against what the scheduler actually produces before anything is written.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from pathlib import Path

import torch

from .denoisers import Denoiser
from .parameterization import OURS_TO_DIFFUSERS
from .sampling import StudentGrid
from .schedules import VPDiscrete


class ExportError(ValueError):
    """The student cannot be expressed by a stock pipeline; the message says why."""


def _scheduler_candidates(teacher_scheduler_config: dict, prediction: str, grid: StudentGrid, timesteps: list[int]):
    """Stock schedulers that may replay ``grid`` on the teacher's betas, most natural first."""
    from diffusers import DDIMScheduler, LCMScheduler

    cfg = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    cfg.update(set_alpha_to_one=True, clip_sample=False, thresholding=False,
               prediction_type=OURS_TO_DIFFUSERS[prediction])
    if grid.transition == "renoise":
        # LCMScheduler's multistep sampling is "denoise, then re-noise with fresh noise" (DMD2's 4-step sampler);
        # original_inference_steps = K puts its grid at DMD2's 999/749/499/249 (ECOSYSTEM.md §1). Its boundary
        # scalings (timestep_scaling 10) leave c_skip < 2e-7 at every grid step >= N/8.
        accepted = inspect.signature(LCMScheduler.__init__).parameters  # DDPM-only keys would only draw a warning
        yield LCMScheduler.from_config({**{k: v for k, v in cfg.items() if k in accepted},
                                        "original_inference_steps": grid.steps})
        return
    yield DDIMScheduler.from_config({**cfg, "timestep_spacing": "trailing", "steps_offset": 0})
    if grid.steps == 1:
        # A one-step student told another time than the start (DMD2's conditioning timestep): DDIM's "leading"
        # spacing puts its single step at steps_offset, and that step lands on x0 (set_alpha_to_one).
        yield DDIMScheduler.from_config({**cfg, "timestep_spacing": "leading", "steps_offset": timesteps[0]})


def student_scheduler(teacher_scheduler_config: dict, prediction: str, grid: StudentGrid, timesteps: list[int]):
    """The stock scheduler whose ``set_timesteps(K)`` reproduces the student grid exactly (checked, not assumed)."""
    tried = []
    for scheduler in _scheduler_candidates(teacher_scheduler_config, prediction, grid, timesteps):
        scheduler.set_timesteps(grid.steps)
        if scheduler.timesteps.tolist() == timesteps:
            return scheduler
        tried.append(f"{type(scheduler).__name__}: {scheduler.timesteps.tolist()}")
    raise ExportError(f"export: no stock scheduler reproduces the {grid.transition} student grid {timesteps} "
                      f"({'; '.join(tried)})")


def grid_timesteps(schedule: VPDiscrete, grid: StudentGrid) -> list[int]:
    """The integer diffusers timesteps of a student grid."""
    return [int(round(float(v))) for v in schedule.model_time(torch.tensor(grid.times, dtype=torch.float64))]


def export_pipeline(student: Denoiser, teacher, grid: StudentGrid, recipe, out_dir: Path) -> Path:
    """Write ``out_dir`` (atomically): the pipeline, ``stepdistill.json`` and a model card ``README.md``."""
    from diffusers import DDPMPipeline

    schedule = student.schedule
    if not isinstance(schedule, VPDiscrete) or student.backbone is None:
        raise ExportError("export: only UNet2DModel students on a discrete VP schedule export to DDPMPipeline today")
    if grid.transition == "renoise" and student.prediction not in ("x0", "eps", "v"):
        raise ExportError(f"export: LCMScheduler takes epsilon, v_prediction or sample outputs, not "
                          f"{student.prediction!r}")
    timesteps = grid_timesteps(schedule, grid)
    scheduler = student_scheduler(teacher.scheduler_config, student.prediction, grid, timesteps)

    unet = copy.deepcopy(student.plain_backbone()).float().eval()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    vector = len(teacher.sample_shape) == 1
    meta = {
        "method": recipe.method.name,
        "teacher": recipe.to_dict()["teacher"],
        "teacher_source": teacher.source,
        "prediction_type": OURS_TO_DIFFUSERS[student.prediction],
        "num_inference_steps": grid.steps,
        "guidance_scale": None,
        "timesteps": timesteps,
        "transition": grid.transition,
        "scheduler": type(scheduler).__name__,
        "call": {"num_inference_steps": grid.steps},
        "sample_shape": list(teacher.sample_shape),
        "data": "vector" if vector else "image",
        "output": "DDPMPipeline returns (x / 2 + 0.5).clamp(0, 1); x = 2 * output - 1 recovers the sample"
                  + ("; vector samples come as [B, 1, 1, D] arrays" if vector else ""),
    }
    (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
    (tmp / "README.md").write_text(model_card(meta))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def model_card(meta: dict, metrics: dict | None = None) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in meta["call"].items())
    lines = [
        f"# {meta['num_inference_steps']}-step student ({meta['method']})",
        "",
        f"Distilled with [stepdistill](https://github.com/) from `{meta['teacher_source']}` by {meta['method']} "
        "distillation. The scheduler config encodes the student grid, so the stock pipeline runs it as trained.",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_FOLDER")',
        f'images = pipe(batch_size=16, {call}, output_type="np").images',
        "```",
        "",
        f"- timesteps: `{meta['timesteps']}` ({meta.get('scheduler', 'DDIMScheduler')}: "
        + ("denoise, then re-noise with fresh noise" if meta.get("transition") == "renoise" else
           "deterministic DDIM jumps, eta 0") + ")",
        "- the pipeline's `generator` also drives the re-noising, so a seeded call is reproducible"
        if meta.get("transition") == "renoise" else "- deterministic given the initial noise",
        f"- prediction type: `{meta['prediction_type']}`",
        f"- output: {meta['output']}",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"


def load_exported_student(pipeline_dir: Path, teacher) -> tuple[Denoiser, StudentGrid, dict]:
    """Rebuild ``(student denoiser, grid, stepdistill.json)`` from an exported pipeline folder."""
    from diffusers import UNet2DModel

    from .denoisers import UNet2DDenoiser
    from .parameterization import DIFFUSERS_PREDICTION

    meta = json.loads((Path(pipeline_dir) / "stepdistill.json").read_text())
    unet = UNet2DModel.from_pretrained(Path(pipeline_dir) / "unet").eval()
    schedule = teacher.denoiser.schedule
    student = UNet2DDenoiser(unet, schedule, DIFFUSERS_PREDICTION[meta["prediction_type"]])
    times = tuple(float(v) for v in schedule.index_to_t(torch.tensor(meta["timesteps"], dtype=torch.float64)))
    return student, StudentGrid(times=times, transition=meta.get("transition", "ddim")), meta
