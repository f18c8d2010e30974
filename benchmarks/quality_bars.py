"""Quality bars of the shipped recipes: run each, evaluate, compare with the teacher.

    python benchmarks/quality_bars.py [gmm gmm16 digits dmd2-gmm dmd2-digits dmd2-digits-4step dmd-gmm]
                                      [--out runs/bars] [--set key=value ...] [--samples 5000] [--seeds 3]

For each bench (``BENCHES``): distil, then evaluate the student beside the teacher's own DDIM sampler at 64 NFE and at
the NFE it must beat (``stepdistill.evaluate``), and check the bars:
    GMM:    every mode covered; SW(student) <= factor x SW(teacher, 64 NFE); SW(student) < SW(teacher, beat NFE)
    digits: FD(student) <= factor x FD(teacher, 64 NFE); FD(student) < FD(teacher, beat NFE); 10/10 classes covered
(factor 1.5, except 1.2 for the 4-step DMD2 digits student; beat NFE = the student's own, or 4 for one-step GMM
students.) Writes OUT/<name>/metrics.json and prints one line per bench plus a JSON summary.

Each model is evaluated on ``--samples`` samples from each of ``--seeds`` noise seeds (``eval.seed``, ``+1``, ...) and
the metrics are averaged over the seeds (coverage counts: the worst seed). Why not the recipes' ``eval.num_samples``
(1000) from one seed: the Frechet distance of 1000 digits is dominated by its finite-sample bias and noise; the
teacher's own 64-NFE FD read 1.66 / 2.26 / 3.11 / 4.90 / 3.80 on five seeds (5000 samples: 1.30 / 1.25 / 1.49).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stepdistill.config import load_recipe
from stepdistill.evaluate import evaluate, sample_metrics, teacher_samples
from stepdistill.train import Trainer


ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """One bar: a shipped recipe (+ overrides), the allowed ratio to the teacher at 64 NFE, and the teacher NFE the
    student must beat (``None``: the student's own NFE)."""

    recipe: str
    overrides: tuple[str, ...] = ()
    factor: float = 1.5
    beat_nfe: int | None = None


BENCHES = {
    # foundation issue: progressive distillation, 4-step students
    "gmm": Bench("progressive/gmm.yaml"),
    "gmm16": Bench("progressive/gmm16.yaml"),
    "digits": Bench("progressive/digits.yaml"),
    # DMD/DMD2 issue: one-step students (must beat the teacher's 4-NFE sampler on GMM) and the 4-step digits student
    "dmd2-gmm": Bench("dmd2/gmm.yaml", beat_nfe=4),
    "dmd2-digits": Bench("dmd2/digits.yaml"),
    "dmd2-digits-4step": Bench("dmd2/digits.yaml", ("method.student_steps=4",), factor=1.2),
    "dmd-gmm": Bench("dmd/gmm.yaml", beat_nfe=4),
}


def bars(bench: Bench, m: dict) -> dict[str, bool]:
    s, beat, full = m["student"], m["teacher_beat"], m["teacher_full"]
    key = "sliced_wasserstein" if "sliced_wasserstein" in s else "frechet_distance"
    out = {
        f"{key} <= {bench.factor}x teacher@{full['nfe']}": s[key] <= bench.factor * full[key],
        f"{key} < teacher@{beat['nfe']} NFE": s[key] < beat[key],
    }
    if key == "sliced_wasserstein":
        out["all modes covered"] = s["modes_covered"] == s["num_modes"]
    else:
        out["10/10 classes"] = s["classes_covered"] == 10
    return out


def pooled(runs: list[dict]) -> dict:
    """One metrics dict from per-seed ones: floats averaged, counts (coverage) the worst seed, lists summed."""
    out = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(first, dict):
            out[key] = pooled(values)
        elif isinstance(first, float):
            out[key] = sum(values) / len(values)
        elif isinstance(first, int) and key != "nfe":
            out[key] = min(values)
        elif isinstance(first, list):
            out[key] = [sum(col) for col in zip(*values)]
        else:
            out[key] = first
    return out


def evaluate_seeds(trainer: Trainer, bench: Bench, *, samples: int, seeds: int) -> dict:
    """The student beside the teacher at full NFE and at the NFE to beat, pooled over ``seeds`` noise seeds."""
    ev = trainer.recipe.eval
    student, grid, teacher = trainer.sampling_student(), trainer.method.student_grid(), trainer.teacher
    runs = []
    for i in range(seeds):
        m = evaluate(student, grid, teacher, num_samples=samples, seed=ev.seed + i,
                     teacher_sampler=ev.teacher_sampler, full_steps=ev.teacher_full_steps)
        m["teacher_beat"] = m["teacher_same_nfe"]
        if bench.beat_nfe is not None:
            x = teacher_samples(teacher, bench.beat_nfe, sampler=ev.teacher_sampler, num=samples, seed=ev.seed + i)
            m["teacher_beat"] = {"nfe": bench.beat_nfe, **sample_metrics(x, teacher)}
        runs.append(m)
    key = "sliced_wasserstein" if "sliced_wasserstein" in runs[0]["student"] else "frechet_distance"
    m = pooled(runs)
    m["per_seed"] = {who: [r[who][key] for r in runs] for who in ("student", "teacher_beat", "teacher_full")}
    m["seeds"] = [ev.seed + i for i in range(seeds)]
    return m


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", default=["gmm", "gmm16", "digits"], help=f"from {sorted(BENCHES)}")
    p.add_argument("--out", default="runs/bars")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides applied to every recipe")
    p.add_argument("--samples", type=int, default=5000, help="samples per model and seed")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds eval.seed, eval.seed+1, ... (metrics averaged)")
    args = p.parse_args()
    summary = {}
    for name in args.names:
        bench = BENCHES[name]
        recipe = load_recipe(ROOT / "recipes" / bench.recipe, [*bench.overrides, *args.set])
        start = time.perf_counter()
        trainer = Trainer(recipe, Path(args.out) / name, overwrite=True, show_progress=False).setup()
        setup_s = time.perf_counter() - start
        trainer.train()
        train_s = time.perf_counter() - start - setup_s
        m = evaluate_seeds(trainer, bench, samples=args.samples, seeds=args.seeds)
        trainer.export()  # OUT/<name>/pipeline, for benchmarks/bench_speed.py
        m["bars"] = bars(bench, m)
        m["seconds"] = {"setup_incl_teacher_fit": round(setup_s, 1), "train": round(train_s, 1)}
        (trainer.dir / "metrics.json").write_text(json.dumps(m, indent=2))
        key = "sliced_wasserstein" if "sliced_wasserstein" in m["student"] else "frechet_distance"
        print(f"{name}: student {m['student']['nfe']} NFE {key}={m['student'][key]:.4f} | teacher "
              f"{m['teacher_beat']['nfe']} NFE {m['teacher_beat'][key]:.4f} | teacher "
              f"{m['teacher_full']['nfe']} NFE {m['teacher_full'][key]:.4f} | bars {m['bars']}", flush=True)
        summary[name] = m
    print(json.dumps({k: {"bars": v["bars"], "student": v["student"]} for k, v in summary.items()}, indent=2))
    return 0 if all(all(v["bars"].values()) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
