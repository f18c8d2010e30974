"""Where does a DMD/DMD2 run's distribution-matching gradient act? A probe of a trained run's fake score.

    python benchmarks/dm_gradient_probe.py RUN_DIR [--checkpoint step-N] [--num 256] [--times 0.02 0.1 0.4 0.7]

For student samples and for the teacher's own 64-step DDIM samples (the target distribution), each sample is noised
to fixed times t and the DM gradient of METHODS.md §4.1 is formed, ``(x0_fake - x0_real) / mean|x - x0_real|``
(without CFG). Printed per t and per sample set: ``mean|x - x0_real|`` (how far the teacher moves the sample),
``mean|x0_fake - x0_real|`` (what the fake score disagrees with) and the gradient's rms.

Reading it: where the fake score follows the student, the gradient is larger on student samples than on teacher
samples. Where it is as large or larger on the teacher's samples, the gradient at that t is mostly the fake score's
own error, and the DM loss there adds noise rather than signal. Unconditional runs only (the embedded digits and GMM
teachers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stepdistill.evaluate import noise_batches, teacher_samples
from stepdistill.run import Run, RunError, load_run
from stepdistill.sampling import sample_student


@torch.no_grad()
def probe(run: Run, x: torch.Tensor, t: float, seed: int) -> dict[str, float]:
    nets, sch = run.nets, run.nets.teacher.schedule
    x = x.double()
    dims = tuple(range(1, x.ndim))
    tt = torch.full((x.shape[0],), t, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_t = sch.add_noise(x, eps, tt).float()
    real = nets.teacher(x_t, tt, None).x0_64
    fake = nets["fake_score"](x_t, tt, None).x0_64
    norm = (x - real).abs().mean(dims, keepdim=True)
    return {"x-real": float(norm.mean()), "fake-real": float((fake - real).abs().mean()),
            "grad_rms": float(((fake - real) / norm).pow(2).mean().sqrt())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default=None, help="e.g. step-3000; default: the latest")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--times", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2, 0.4, 0.7])
    args = p.parse_args()
    try:
        run = load_run(args.run_dir, checkpoint=args.checkpoint, all_roles=True)  # a run read back
    except RunError as err:
        print(f"{Path(__file__).stem}: error: {err}", file=sys.stderr)
        return 2
    if "fake_score" not in run.nets.extra or run.teacher.family is not None:
        print("dm_gradient_probe: error: needs a DMD/DMD2 run on an unconditional teacher", file=sys.stderr)
        return 2
    noise = torch.cat(list(noise_batches(args.num, run.teacher.sample_shape, 0)))
    with torch.no_grad():
        sets = {"student": sample_student(run.nets.student, noise, run.grid),
                "teacher@64": teacher_samples(run.teacher, 64, sampler="ddim", num=args.num, seed=0)}
    print(f"{'t':>5} {'samples':>11} {'|x-x0_real|':>12} {'|x0_fake-x0_real|':>18} {'grad rms':>9}")
    for t in args.times:
        for name, x in sets.items():
            m = probe(run, x, t, seed=int(t * 1e6))
            print(f"{t:5.2f} {name:>11} {m['x-real']:12.4f} {m['fake-real']:18.4f} {m['grad_rms']:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
