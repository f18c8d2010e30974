"""Quality bars of the shipped recipes: run each, evaluate, compare with the teacher.

    python benchmarks/quality_bars.py [gmm gmm16 digits dmd2-gmm dmd2-digits dmd2-digits-4step dmd-gmm
                                       lcm-gmm-2step lcm-gmm16-1step lcm-digits-4step ...]
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
from stepdistill.sampling import sampling_denoiser
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
    #: a consistency student evaluated at this many steps (its method's ``grid_for``); ``None``: the recipe's grid
    steps: int | None = None
    #: a recipe whose teacher replaces the bench recipe's (the 16-D mixture of ``progressive/gmm16.yaml``)
    teacher: str | None = None
    #: only the coverage bar (one-step consistency students: "every mode covered")
    coverage_only: bool = False

    def training(self) -> tuple:
        """What decides the trained model: benches that share it train once."""
        return self.recipe, self.overrides, self.teacher


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


def _consistency_benches() -> dict[str, Bench]:
    """Consistency issue: each variant at 1, 2 and 4 steps on the 2-D and 16-D mixtures and on digits. One trained
    CD/LCM/TCD student serves every step count; PCM trains one student per phase count. GMM: all modes at 1 step,
    SW <= 1.5x at 2 (the issue's bars; 4 steps report only the teacher-at-equal-NFE bar beside the 1.5x); digits: FD
    <= 2.0x / 1.5x / 1.2x at 1 / 2 / 4 steps."""
    out = {}
    for variant in ("cd", "lcm", "pcm", "tcd"):
        for k in (1, 2, 4):
            overrides = (f"method.student_steps={k}",) if variant == "pcm" else ()
            for data, teacher in (("gmm", None), ("gmm16", "progressive/gmm16.yaml")):
                out[f"{variant}-{data}-{k}step"] = Bench(f"{variant}/gmm.yaml", overrides, steps=k, teacher=teacher,
                                                          coverage_only=k == 1)
            out[f"{variant}-digits-{k}step"] = Bench(f"{variant}/digits.yaml", overrides,
                                                     factor={1: 2.0, 2: 1.5, 4: 1.2}[k], steps=k)
    return out


def _continuous_consistency_benches() -> dict[str, Bench]:
    """Continuous-time consistency issue: sCM, rCM, ECT and MeanFlow at 1 and 2 steps (one trained student serves
    both). GMM: SW <= 1.5x at 1 step and 1.2x at 2, every mode covered, beating the teacher at equal NFE (4 NFE at one
    step); digits: FD <= 1.5x / 1.2x (the issue's sCM/rCM/MeanFlow bars; ECT is held to the same)."""
    out = {}
    for method in ("scm", "rcm", "ect", "meanflow"):
        for k, factor in ((1, 1.5), (2, 1.2)):
            beat = 4 if k == 1 else None
            for data, teacher in (("gmm", None), ("gmm16", "progressive/gmm16.yaml")):
                out[f"{method}-{data}-{k}step"] = Bench(f"{method}/gmm.yaml", factor=factor, beat_nfe=beat, steps=k,
                                                        teacher=teacher)
            out[f"{method}-digits-{k}step"] = Bench(f"{method}/digits.yaml", factor=factor, steps=k)
    return out


def _sid_benches() -> dict[str, Bench]:
    """SiD issue: one-step SiD students cover every mode with SW <= 1.3x the teacher's at 64 NFE and beat it at 4 NFE
    (2-D and 16-D mixtures); digits FD <= 1.3x (SiD), 1.2x (SiDA), and the 4-step SiD student <= 1.1x."""
    four = ("method.student_steps=4", "method.regression_warmup=0")  # the warm-up is for one-step students
    return {
        "sid-gmm": Bench("sid/gmm.yaml", factor=1.3, beat_nfe=4),
        "sid-gmm16": Bench("sid/gmm.yaml", factor=1.3, beat_nfe=4, teacher="progressive/gmm16.yaml"),
        # multi-step, reported beside the one-step bar (the issue sets none): SiD-LSG's untrained baseline (the
        # one-step student re-noised to t_init (1 - i/k), ``SiD.grid_for``) and students trained for k steps by
        # backward simulation, each step judged in its band (as the 4-step digits student)
        **{f"sid-gmm-renoise-{k}step": Bench("sid/gmm.yaml", factor=1.3, steps=k) for k in (2, 4)},
        **{f"sid-gmm-{k}step": Bench("sid/gmm.yaml", (f"method.student_steps={k}", "method.regression_warmup=0",
                                                      "method.multistep_matching=phased"), factor=1.3)
           for k in (2, 4)},
        "sid-digits": Bench("sid/digits.yaml", factor=1.3),
        "sida-digits": Bench("sida/digits.yaml", factor=1.2),
        # 4 steps: 4000 steps (their recorded figures; the one-step recipe trains 6000)
        "sid-digits-4step": Bench("sid/digits.yaml", (*four, "train.max_steps=4000"), factor=1.1),
        # each step judged in its own band of times, as DMD2's 4-step digits student needed (README)
        "sid-digits-4step-phased": Bench("sid/digits.yaml", (*four, "method.multistep_matching=phased",
                                                             "train.max_steps=4000"), factor=1.1),
        # the same with SiDA's GAN head on real digits and DMD2's two time scales (the student every 2nd step, as
        # dmd2/digits.yaml, whose 4-step student met its bar), 8000 steps (at 6000, training seed 1 read 1.125x)
        "sida-digits-4step-phased": Bench("sida/digits.yaml", (*four, "method.multistep_matching=phased",
                                                               "train.update_every={student: 2}",
                                                               "train.max_steps=8000"), factor=1.1),
    }


def _phased_benches() -> dict[str, Bench]:
    """Phased DMD issue: 4-step students in K = 2 and K = 4 phases. GMM (2-D and 16-D): SW <= 1.2x the teacher's at
    64 NFE, every mode covered; digits: FD <= 1.1x, 10/10 classes. The diversity claim: each student's
    ``mode_weight_tv`` beside DMD2's 4-step student's on the same budget (``dmd2-gmm*-4step-budget``)."""
    out = {}
    for k in (2, 4):
        phases = (f"method.num_phases={k}",)
        out[f"phased-gmm-k{k}"] = Bench("phased_dmd/gmm.yaml", phases, factor=1.2)
        out[f"phased-gmm16-k{k}"] = Bench("phased_dmd/gmm.yaml", phases, factor=1.2,
                                          teacher="progressive/gmm16.yaml")
        out[f"phased-digits-k{k}"] = Bench("phased_dmd/digits.yaml", phases, factor=1.1)
    # the comparator of the diversity claim: DMD2's 4-step student on the phased recipe's budget (6000 steps, student
    # every 2nd); its mode_weight_tv beside the phased students'. DMD2 as published: no regression (one-step only),
    # the student's LR annealed, as the one-step recipe had it when these figures were measured
    budget = ("method.student_steps=4", "method.regression_weight=0", "optim.student.schedule=cosine",
              "train.update_every.student=2", "train.max_steps=6000")
    out["dmd2-gmm-4step-budget"] = Bench("dmd2/gmm.yaml", budget, factor=1.2)
    out["dmd2-gmm16-4step-budget"] = Bench("dmd2/gmm.yaml", budget, factor=1.2, teacher="progressive/gmm16.yaml")
    return out


def _adversarial_benches() -> dict[str, Bench]:
    """Adversarial issue: LADD's digits students at 1 and 4 steps (FD <= 1.5x / 1.2x, 10/10 classes); its one-step GMM
    student covers every mode (its ``mode_weight_tv`` beside DMD2's ``dmd2-gmm``); ADD's 4-step digits student at
    LADD's bar."""
    return {
        "ladd-gmm": Bench("ladd/gmm.yaml", coverage_only=True),
        "ladd-gmm16": Bench("ladd/gmm.yaml", coverage_only=True, teacher="progressive/gmm16.yaml"),
        "ladd-digits-1step": Bench("ladd/digits.yaml", ("method.student_steps=1",), factor=1.5),
        "ladd-digits-4step": Bench("ladd/digits.yaml", factor=1.2),
        "add-digits-4step": Bench("add/digits.yaml", factor=1.2),
    }


BENCHES.update(_adversarial_benches())
BENCHES.update(_consistency_benches())
BENCHES.update(_phased_benches())
BENCHES.update(_sid_benches())
BENCHES.update(_continuous_consistency_benches())


def bars(bench: Bench, m: dict) -> dict[str, bool]:
    s, beat, full = m["student"], m["teacher_beat"], m["teacher_full"]
    key = "sliced_wasserstein" if "sliced_wasserstein" in s else "frechet_distance"
    out = {} if bench.coverage_only else {
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
    grid = trainer.method.student_grid() if bench.steps is None else trainer.method.grid_for(bench.steps)
    student, teacher = sampling_denoiser(trainer.nets, grid, use_ema=trainer.recipe.export.use_ema), trainer.teacher
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
    summary, trained = {}, {}
    for name in args.names:
        bench = BENCHES[name]
        if bench.training() in trained:  # another step count of a student already trained in this run
            trainer, setup_s, train_s = trained[bench.training()]
        else:
            recipe = load_recipe(ROOT / "recipes" / bench.recipe, [*bench.overrides, *args.set])
            if bench.teacher is not None:
                recipe.teacher = load_recipe(ROOT / "recipes" / bench.teacher).teacher
            start = time.perf_counter()
            trainer = Trainer(recipe, Path(args.out) / name, overwrite=True, show_progress=False).setup()
            setup_s = time.perf_counter() - start
            trainer.train()
            train_s = time.perf_counter() - start - setup_s
            trainer.export()  # OUT/<name>/pipeline, for benchmarks/bench_speed.py
            trained[bench.training()] = trainer, setup_s, train_s
        m = evaluate_seeds(trainer, bench, samples=args.samples, seeds=args.seeds)
        m["bars"] = bars(bench, m)
        m["seconds"] = {"setup_incl_teacher_fit": round(setup_s, 1), "train": round(train_s, 1)}
        out = Path(args.out) / name  # a bench that reused another's student has only its metrics here
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m, indent=2))
        key = "sliced_wasserstein" if "sliced_wasserstein" in m["student"] else "frechet_distance"
        print(f"{name}: student {m['student']['nfe']} NFE {key}={m['student'][key]:.4f} | teacher "
              f"{m['teacher_beat']['nfe']} NFE {m['teacher_beat'][key]:.4f} | teacher "
              f"{m['teacher_full']['nfe']} NFE {m['teacher_full'][key]:.4f} | bars {m['bars']}", flush=True)
        summary[name] = m
    print(json.dumps({k: {"bars": v["bars"], "student": v["student"]} for k, v in summary.items()}, indent=2))
    return 0 if all(all(v["bars"].values()) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
