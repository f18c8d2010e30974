"""Export a student as a stock diffusers pipeline whose scheduler config encodes the student grid (DESIGN.md §6).

UNet2DModel students are saved as ``DDPMPipeline(unet, DDIMScheduler)``. The scheduler keeps the teacher's betas and
uses ``timestep_spacing="trailing"`` with ``set_alpha_to_one=True`` (ECOSYSTEM.md §0.2: the default spacings put a
1-step grid at t=0), so ``DiffusionPipeline.from_pretrained(dir)(num_inference_steps=N)`` runs exactly the training
grid. The grid is checked against what the scheduler actually produces before anything is written. ``DDPMPipeline``
calls ``scheduler.step(out, t, x, generator=...)`` with DDIM's default ``eta=0``: the deterministic DDIM jump the
progressive-distillation student was trained for.
"""

from __future__ import annotations

import copy
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


def student_scheduler(teacher_scheduler_config: dict, prediction: str):
    """The DDIM scheduler that replays a deterministic student grid on the teacher's betas."""
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    cfg.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
               steps_offset=0, prediction_type=OURS_TO_DIFFUSERS[prediction])
    return DDIMScheduler.from_config(cfg)


def grid_timesteps(schedule: VPDiscrete, grid: StudentGrid) -> list[int]:
    """The integer diffusers timesteps of a student grid."""
    return [int(round(float(v))) for v in schedule.model_time(torch.tensor(grid.times, dtype=torch.float64))]


def export_pipeline(student: Denoiser, teacher, grid: StudentGrid, recipe, out_dir: Path) -> Path:
    """Write ``out_dir`` (atomically): the pipeline, ``stepdistill.json`` and a model card ``README.md``."""
    from diffusers import DDPMPipeline

    schedule = student.schedule
    if not isinstance(schedule, VPDiscrete) or student.backbone is None:
        raise ExportError("export: only UNet2DModel students on a discrete VP schedule export to DDPMPipeline today")
    if grid.transition != "ddim":
        raise ExportError(f"export: a {grid.transition!r} student grid needs a consistency-style scheduler; "
                          "DDPMPipeline + DDIM replays deterministic grids only")
    timesteps = grid_timesteps(schedule, grid)
    scheduler = student_scheduler(teacher.scheduler_config, student.prediction)
    scheduler.set_timesteps(grid.steps)
    if scheduler.timesteps.tolist() != timesteps:
        raise ExportError(f"export: the student grid {timesteps} is not what DDIMScheduler(trailing) produces for "
                          f"{grid.steps} steps ({scheduler.timesteps.tolist()})")

    unet = copy.deepcopy(student.backbone).float().eval()
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
        f"- timesteps: `{meta['timesteps']}` (DDIMScheduler, trailing spacing, eta 0)",
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
    return student, StudentGrid(times=times, transition="ddim"), meta
