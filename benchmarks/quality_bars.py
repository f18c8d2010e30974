"""Quality bars of the shipped recipes: run each, evaluate, compare with the teacher.

    python benchmarks/quality_bars.py [gmm gmm16 digits dmd2-gmm dmd2-digits dmd2-digits-4step dmd-gmm]
                                      [--out runs/bars] [--set key=value ...]

For each bench (``BENCHES``): distil, then evaluate the student beside the teacher's own DDIM sampler at 64 NFE and at
the NFE it must beat (``stepdistill.evaluate``), and check the bars:
    GMM:    every mode covered; SW(student) <= factor x SW(teacher, 64 NFE); SW(student) < SW(teacher, beat NFE)
    digits: FD(student) <= factor x FD(teacher, 64 NFE); FD(student) < FD(teacher, beat NFE); 10/10 classes covered
(factor 1.5, except 1.2 for the 4-step DMD2 digits student; beat NFE = the student's own, or 4 for one-step GMM
students.) Writes OUT/<name>/metrics.json and prints one line per bench plus a JSON summary.
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", default=["gmm", "gmm16", "digits"], help=f"from {sorted(BENCHES)}")
    p.add_argument("--out", default="runs/bars")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides applied to every recipe")
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
        student, grid, teacher = trainer.sampling_student(), trainer.method.student_grid(), trainer.teacher
        m = evaluate(student, grid, teacher, num_samples=recipe.eval.num_samples,
                     teacher_sampler=recipe.eval.teacher_sampler, full_steps=recipe.eval.teacher_full_steps)
        m["teacher_beat"] = m["teacher_same_nfe"]
        if bench.beat_nfe is not None:
            x = teacher_samples(teacher, bench.beat_nfe, sampler=recipe.eval.teacher_sampler,
                                num=recipe.eval.num_samples, seed=recipe.eval.seed)
            m["teacher_beat"] = {"nfe": bench.beat_nfe, **sample_metrics(x, teacher)}
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
