"""How good is each step of a multi-step student? Every step's clean estimate, scored against the teacher.

    python benchmarks/multistep_probe.py RUN_DIR [--checkpoint step-N] [--num 3000] [--seed 0]

The student is sampled on its own grid (``sample_student``); after each step its x0 estimate is scored like a final
sample (digits: Frechet distance and class coverage; GMM: sliced Wasserstein and modes covered), beside the mean and
std of its values, and the teacher's 64-step DDIM samples on the same noise are the reference row.

Why: a DMD2 multi-step student is trained on every step's x0 (backward simulation), and with one fake score of the
mixture of steps (``method.multistep_matching: mixture``) only their mixture has to match the data. On the digits
teacher the steps' mean pixel value erred in opposite directions and averaged to the teacher's (README, "Quality: DMD
and DMD2"); this probe is how that was seen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stepdistill.evaluate import noise_batches, sample_metrics, teacher_samples
from stepdistill.run import RunError, load_run
from stepdistill.sampling import sample_student


def row(name: str, x: torch.Tensor, teacher) -> str:
    m = sample_metrics(x.float(), teacher)
    scores = "  ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
    return f"{name:>22}  mean {float(x.mean()):+.3f}  std {float(x.std()):.3f}  {scores}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default=None, help="e.g. step-3000; default: the latest")
    p.add_argument("--num", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        run = load_run(args.run_dir, checkpoint=args.checkpoint, all_roles=True)  # a run read back
    except RunError as err:
        print(f"{Path(__file__).stem}: error: {err}", file=sys.stderr)
        return 2
    teacher = run.teacher
    if teacher.family is not None or getattr(teacher, "num_classes", None):
        print("multistep_probe: error: needs a run on an unconditional embedded teacher (digits or GMM)",
              file=sys.stderr)
        return 2
    student, grid = run.sampling_student(), run.grid
    noise = torch.cat(list(noise_batches(args.num, teacher.sample_shape, args.seed)))
    estimates = []
    with torch.no_grad():
        sample_student(student, noise, grid, generator=torch.Generator().manual_seed(args.seed),
                       callback=lambda i, x, pred: estimates.append(pred.x0.float()))
        print(row("teacher, 64-step DDIM", teacher_samples(teacher, 64, sampler="ddim", num=args.num,
                                                            seed=args.seed), teacher))
    for i, (t, x0) in enumerate(zip(grid.times, estimates)):
        print(row(f"step {i} x0 (t={t:.3f})", x0, teacher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
