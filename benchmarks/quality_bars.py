"""Quality bars of progressive distillation (foundation issue): run the shipped recipes, evaluate, compare.

    python benchmarks/quality_bars.py [gmm gmm16 digits] [--out runs/bars] [--set key=value ...]

For each recipe: distil, then evaluate the student beside the teacher's own DDIM sampler at the same NFE and at 64
NFE (``stepdistill.evaluate.evaluate``), and check the bars:
    GMM:    every mode covered; SW(student) <= 1.5 x SW(teacher, 64 NFE); SW(student) < SW(teacher, same NFE)
    digits: FD(student) <= 1.5 x FD(teacher, 64 NFE); FD(student) < FD(teacher, same NFE); 10/10 classes covered
Writes OUT/<name>/metrics.json and prints one line per recipe plus a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stepdistill.config import load_recipe
from stepdistill.evaluate import evaluate
from stepdistill.train import Trainer


ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "gmm": ROOT / "recipes" / "progressive" / "gmm.yaml",
    "gmm16": ROOT / "recipes" / "progressive" / "gmm16.yaml",
    "digits": ROOT / "recipes" / "progressive" / "digits.yaml",
}


def bars(name: str, m: dict) -> dict[str, bool]:
    s, same, full = m["student"], m["teacher_same_nfe"], m["teacher_full"]
    if name.startswith("gmm"):
        return {
            "all modes covered": s["modes_covered"] == s["num_modes"],
            "SW <= 1.5x teacher@64": s["sliced_wasserstein"] <= 1.5 * full["sliced_wasserstein"],
            "SW < teacher@same NFE": s["sliced_wasserstein"] < same["sliced_wasserstein"],
        }
    return {
        "FD <= 1.5x teacher@64": s["frechet_distance"] <= 1.5 * full["frechet_distance"],
        "FD < teacher@same NFE": s["frechet_distance"] < same["frechet_distance"],
        "10/10 classes": s["classes_covered"] == 10,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", default=list(RECIPES))
    p.add_argument("--out", default="runs/bars")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides applied to every recipe")
    args = p.parse_args()
    summary = {}
    for name in args.names:
        recipe = load_recipe(RECIPES[name], args.set)
        start = time.perf_counter()
        trainer = Trainer(recipe, Path(args.out) / name, overwrite=True, show_progress=False).setup()
        setup_s = time.perf_counter() - start
        trainer.train()
        train_s = time.perf_counter() - start - setup_s
        m = evaluate(trainer.sampling_student(), trainer.method.student_grid(), trainer.teacher,
                     num_samples=recipe.eval.num_samples, teacher_sampler=recipe.eval.teacher_sampler,
                     full_steps=recipe.eval.teacher_full_steps)
        trainer.export()  # OUT/<name>/pipeline, for benchmarks/bench_speed.py
        m["bars"] = bars(name, m)
        m["seconds"] = {"setup_incl_teacher_fit": round(setup_s, 1), "train": round(train_s, 1)}
        (trainer.dir / "metrics.json").write_text(json.dumps(m, indent=2))
        key = "sliced_wasserstein" if name.startswith("gmm") else "frechet_distance"
        print(f"{name}: student {m['student']['nfe']} NFE {key}={m['student'][key]:.4f} | teacher "
              f"{m['teacher_same_nfe']['nfe']} NFE {m['teacher_same_nfe'][key]:.4f} | teacher "
              f"{m['teacher_full']['nfe']} NFE {m['teacher_full'][key]:.4f} | bars {m['bars']}", flush=True)
        summary[name] = m
    print(json.dumps({k: {"bars": v["bars"], "student": v["student"]} for k, v in summary.items()}, indent=2))
    return 0 if all(all(v["bars"].values()) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
