"""Speed of an exported student pipeline against its teacher's full-step pipeline, side by side in one run.

    python benchmarks/bench_speed.py runs/demo/pipeline [--teacher-steps 64] [--batch 256] [--repeats 5]

Both are stock ``DDPMPipeline``s with ``DDIMScheduler(trailing)``: the student as exported, the teacher with the
same scheduler config run at ``--teacher-steps``. Reports median wall time per call, the measured speedup, the ideal
speedup (ratio of network evaluations) and their ratio (the bar is >= 0.8). Interleaves the two so that machine
load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline


def timed(pipe, steps: int, batch: int) -> float:
    start = time.perf_counter()
    pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pipeline")
    p.add_argument("--teacher", default=None, help="teacher pipeline dir (default: the embedded digits teacher)")
    p.add_argument("--teacher-steps", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    student = DiffusionPipeline.from_pretrained(args.pipeline)
    student.set_progress_bar_config(disable=True)
    meta = json.loads((Path(args.pipeline) / "stepdistill.json").read_text())
    steps = meta["num_inference_steps"]
    if args.teacher:
        teacher = DiffusionPipeline.from_pretrained(args.teacher)
    else:
        from diffusers import UNet2DModel

        from stepdistill.teachers import ASSETS

        unet = UNet2DModel.from_pretrained(ASSETS / "digits_teacher" / "unet")
        teacher = DDPMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(student.scheduler.config,
                                                                              prediction_type="v_prediction"))
    teacher.set_progress_bar_config(disable=True)

    timed(student, steps, args.batch), timed(teacher, args.teacher_steps, args.batch)  # warm-up
    ts, tt = [], []
    for _ in range(args.repeats):
        ts.append(timed(student, steps, args.batch))
        tt.append(timed(teacher, args.teacher_steps, args.batch))
    s, t = statistics.median(ts), statistics.median(tt)
    ideal = args.teacher_steps / steps
    result = {"batch": args.batch, "threads": torch.get_num_threads(), "student_steps": steps,
              "teacher_steps": args.teacher_steps, "student_s": round(s, 4), "teacher_s": round(t, 4),
              "speedup": round(t / s, 2), "ideal_speedup": ideal, "fraction_of_ideal": round(t / s / ideal, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
