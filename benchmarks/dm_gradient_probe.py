"""Where does a DMD/DMD2 run's distribution-matching gradient act? A probe of a trained run's fake score.

    python benchmarks/dm_gradient_probe.py RUN_DIR [--checkpoint step-N] [--num 256] [--times 0.02 0.1 0.4 0.7]

For student samples and for the teacher's own 64-step DDIM samples (the target distribution), each sample is noised
to fixed times t and the DM gradient of METHODS.md §4.1 is formed, ``(x0_fake - x0_real) / mean|x - x0_real|``
(without CFG). Printed per t and per sample set: ``mean|x - x0_real|`` (how far the teacher moves the sample),
``mean|x0_fake - x0_real|`` (what the fake score disagrees with) and the gradient's rms.

``--reference N`` adds what the fake score *should* say on the student's samples: the exact posterior mean
``E[x0 | x_t]`` of the empirical distribution of N further student samples (a softmax over them of
``-|x_t - a_t s_j|^2 / 2 s_t^2``), the fake score of a perfect critic up to the sampling of the reference (good
for low-dimensional data at noise levels above the reference's sample spacing). Printed per t: the cosine between the
live ``x0_fake - x0_real`` and the reference's ``x0_ref - x0_real`` and the live error ``|x0_fake - x0_ref|`` against
that signal ``|x0_ref - x0_real|`` (error/signal above 1: the DM gradient at that t is mostly the critic's error).

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
def noised_predictions(run: Run, x: torch.Tensor, t: float, seed: int):
    """``x`` noised to time ``t`` (float64) and the teacher's and the fake score's x0 there (no CFG)."""
    nets, sch = run.nets, run.nets.teacher.schedule
    tt = torch.full((x.shape[0],), t, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_t = sch.add_noise(x.double(), eps, tt)
    return x_t, nets.teacher(x_t.float(), tt, None).x0_64, nets["fake_score"](x_t.float(), tt, None).x0_64


@torch.no_grad()
def probe(run: Run, x: torch.Tensor, t: float, seed: int) -> dict[str, float]:
    x = x.double()
    _, real, fake = noised_predictions(run, x, t, seed)
    norm = (x - real).abs().mean(tuple(range(1, x.ndim)), keepdim=True)
    return {"x-real": float(norm.mean()), "fake-real": float((fake - real).abs().mean()),
            "grad_rms": float(((fake - real) / norm).pow(2).mean().sqrt())}


@torch.no_grad()
def empirical_x0(x_t: torch.Tensor, reference: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """``E[x0 | x_t]`` at one time (``x_t = a x0 + s eps``) when x0 is drawn uniformly from ``reference`` ``[N, ...]``
    (float64, chunked over x_t)."""
    flat, ref = x_t.double().flatten(1), reference.double().flatten(1)
    out = [torch.softmax(-torch.cdist(rows, a * ref) ** 2 / (2 * s**2), dim=1) @ ref for rows in flat.split(256)]
    return torch.cat(out).reshape(x_t.shape)


@torch.no_grad()
def critic_error(run: Run, x: torch.Tensor, reference: torch.Tensor, t: float, seed: int) -> dict[str, float]:
    """Live fake score against the empirical posterior mean of ``reference`` at student samples ``x`` noised to t."""
    sch, tt = run.nets.teacher.schedule, torch.tensor([t], dtype=torch.float64)
    x_t, real, fake = noised_predictions(run, x, t, seed)
    ref = empirical_x0(x_t, reference, float(sch.alpha(tt)), float(sch.sigma(tt)))
    live, true = (fake - real).flatten(1), (ref - real).flatten(1)
    cos = torch.nn.functional.cosine_similarity(live, true, dim=1).mean()
    return {"cos": float(cos), "error/signal": float((fake - ref).norm() / (ref - real).norm())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default=None, help="e.g. step-3000; default: the latest")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--times", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2, 0.4, 0.7])
    p.add_argument("--reference", type=int, default=0, help="student samples of the empirical fake score (0: off)")
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
    if args.reference:
        with torch.no_grad():
            ref_noise = torch.cat(list(noise_batches(args.reference, run.teacher.sample_shape, 1)))
            reference = sample_student(run.nets.student, ref_noise, run.grid)
        print(f"\nthe live fake score vs the exact posterior mean of {args.reference} student samples")
        print(f"{'t':>5} {'cos(live, exact)':>17} {'error/signal':>13}")
        for t in args.times:
            m = critic_error(run, sets["student"], reference, t, seed=int(t * 1e6) + 1)
            print(f"{t:5.2f} {m['cos']:17.3f} {m['error/signal']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
