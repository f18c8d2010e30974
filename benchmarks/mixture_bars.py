"""A shipped GMM recipe on the benchmark mixtures of ``benchmarks/mixtures.py``: mode coverage and mode weights.

    python benchmarks/mixture_bars.py [--recipe dmd2/gmm.yaml] [--family highdim] [--seeds 0 1 2]
                                      [--samples 5000] [--eval-seeds 3] [--set key=value ...] [--out runs/mixtures]
                                      [--json results.json]

For each mixture seed: the recipe's ``teacher.gmm`` is replaced by ``mixture_teacher(family, seed)`` with the fitted
``mlp`` denoiser (``--family ring`` keeps the recipe's own mixture), the recipe is trained, and the student is
printed beside the teacher's own DDIM sampler at 64 NFE and at 4 NFE:

* ``cov``: modes covered (``stepdistill.evaluate.gmm_metrics``: at least a quarter of a mode's share of the samples
  inside its 99.9% ball), ``near``: fraction of the samples inside their component's 99.9% ball;
* ``TV true`` / ``TV t64``: total variation ``0.5 sum_k |p_k - q_k|`` between the sample's mode weights (each sample
  assigned to its most responsible component, ``mixture.responsibilities(x).argmax(1)``) and the true weights / the
  teacher's at 64 NFE (the fitted teacher has its own errors: judge the student against both);
* ``SW``: sliced Wasserstein-2 to exact mixture samples.

Every figure is the mean over ``--eval-seeds`` noise seeds of ``--samples`` samples each (coverage: the worst seed).
The shipped recipes: ``dmd2/gmm.yaml`` (1 NFE), ``dmd/gmm.yaml`` (DMD v1, 1 NFE), ``progressive/gmm.yaml`` (4 NFE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stepdistill.config import load_recipe
from stepdistill.evaluate import gmm_metrics, student_samples, teacher_samples
from stepdistill.train import Trainer


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixtures import MIXTURES, mixture_teacher  # noqa: E402


def mode_weights(x: torch.Tensor, mixture) -> torch.Tensor:
    """Share of the samples whose most responsible component is k, ``[K]``."""
    assign = mixture.responsibilities(x.double().reshape(x.shape[0], -1)).argmax(1)
    return torch.bincount(assign, minlength=mixture.num_modes).double() / x.shape[0]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum())


def metrics(x: torch.Tensor, mixture) -> dict:
    m = gmm_metrics(x, mixture)
    return {"covered": m["modes_covered"], "modes": m["num_modes"], "near": m["fraction_near_a_mode"],
            "sw": m["sliced_wasserstein"], "weights": mode_weights(x, mixture)}


def evaluate(trainer: Trainer, *, samples: int, eval_seeds: int) -> dict[str, dict]:
    """Student, teacher at 64 and at 4 NFE (DDIM), each averaged over the noise seeds (coverage: the worst)."""
    teacher, mixture = trainer.teacher, trainer.teacher.mixture
    student, grid = trainer.sampling_student(), trainer.method.student_grid()
    student.eval()
    runs: dict[str, list[dict]] = {"student": [], "teacher@64": [], "teacher@4": []}
    base = trainer.recipe.eval.seed
    with torch.no_grad():
        for seed in range(base, base + eval_seeds):
            runs["student"].append(metrics(student_samples(student, grid, shape=teacher.sample_shape, num=samples,
                                                           seed=seed), mixture))
            for nfe in (64, 4):
                x = teacher_samples(teacher, nfe, sampler="ddim", num=samples, seed=seed)
                runs[f"teacher@{nfe}"].append(metrics(x, mixture))
    t64 = torch.stack([r["weights"] for r in runs["teacher@64"]]).mean(0)
    out = {}
    for who, rs in runs.items():
        w = torch.stack([r["weights"] for r in rs]).mean(0)
        out[who] = {
            "nfe": grid.steps if who == "student" else int(who.split("@")[1]),
            "covered": min(r["covered"] for r in rs), "modes": rs[0]["modes"],
            "near": sum(r["near"] for r in rs) / len(rs),
            "tv_true": sum(total_variation(r["weights"], mixture.weights) for r in rs) / len(rs),
            "tv_teacher64": sum(total_variation(r["weights"], t64) for r in rs) / len(rs),
            "sw": sum(r["sw"] for r in rs) / len(rs),
            "weights": [round(v, 4) for v in w.tolist()],
        }
    return out


def track_weights(trainer: Trainer, every: int, record: list) -> None:
    """Every ``every`` steps, before the step runs: the student's mode weights on 2000 samples of fixed noise and
    their TV to the true weights, appended to ``record`` and printed (wraps the method's ``begin_step``)."""
    method, mixture = trainer.method, trainer.teacher.mixture
    begin = method.begin_step

    def begin_step(step, nets):
        if step % every == 0:
            with torch.no_grad():
                x = student_samples(nets["student"], method.student_grid(), shape=trainer.teacher.sample_shape,
                                    num=2000, seed=777)
            w = mode_weights(x, mixture)
            record.append({"step": step, "tv_true": round(total_variation(w, mixture.weights), 4),
                           "weights": [round(v, 3) for v in w.tolist()]})
            print(f"  step {step:6d}  TV true {record[-1]['tv_true']:.3f}  weights {record[-1]['weights']}",
                  flush=True)
        return begin(step, nets)

    method.begin_step = begin_step


def run(recipe: str, family: str, seed: int, *, overrides: list[str], out: Path, samples: int,
        eval_seeds: int, tag: str = "", track: int = 0) -> dict:
    r = load_recipe(ROOT / "recipes" / recipe, overrides)
    if family != "ring":
        r.teacher.gmm = {**mixture_teacher(family, seed), "denoiser": "mlp", **(
            {"fit": r.teacher.gmm["fit"]} if "fit" in r.teacher.gmm else {})}
    name = f"{recipe.replace('/', '_').removesuffix('.yaml')}-{family}{'' if family == 'ring' else seed}{tag}"
    start = time.perf_counter()
    trainer = Trainer(r, out / name, overwrite=True, show_progress=False).setup()
    setup_s = time.perf_counter() - start
    history: list[dict] = []
    if track:
        track_weights(trainer, track, history)
    trainer.train()
    train_s = time.perf_counter() - start - setup_s
    m = evaluate(trainer, samples=samples, eval_seeds=eval_seeds)
    m["seconds"] = {"setup_incl_teacher_fit": round(setup_s, 1), "train": round(train_s, 1)}
    m["history"] = history
    m["true_weights"] = [round(v, 4) for v in trainer.teacher.mixture.weights.tolist()]
    (trainer.dir / "mixture_metrics.json").write_text(json.dumps(m, indent=2))
    return m


def table(results: dict[str, dict]) -> str:
    lines = [f"{'run':<34} {'who':<11} {'NFE':>3} {'cov':>7} {'near':>6} {'TV true':>8} {'TV t64':>7} {'SW':>8}"]
    for name, m in results.items():
        for who in ("student", "teacher@64", "teacher@4"):
            s = m[who]
            lines.append(f"{name:<34} {who:<11} {s['nfe']:>3} {s['covered']:>3}/{s['modes']:<3} {s['near']:6.3f} "
                         f"{s['tv_true']:8.3f} {s['tv_teacher64']:7.3f} {s['sw']:8.4f}")
        lines.append(f"{'':<34} train {m['seconds']['train']:.0f} s, setup (teacher fit if not cached) "
                     f"{m['seconds']['setup_incl_teacher_fit']:.0f} s")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="dmd2/gmm.yaml", help="a shipped GMM recipe under recipes/")
    p.add_argument("--family", default="highdim", choices=[*MIXTURES, "ring"],
                   help="mixture family of benchmarks/mixtures.py, or ring: the recipe's own mixture")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="mixture seeds (ignored for ring)")
    p.add_argument("--samples", type=int, default=5000, help="samples per model and noise seed")
    p.add_argument("--eval-seeds", type=int, default=3, help="noise seeds eval.seed, eval.seed+1, ...")
    p.add_argument("--set", nargs="*", default=[], help="dotted recipe overrides, e.g. train.max_steps=1000")
    p.add_argument("--out", default="runs/mixtures")
    p.add_argument("--tag", default="", help="suffix of the run folders under --out")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--track", type=int, default=0, help="print the student's mode weights every N steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for seed in ([0] if args.family == "ring" else args.seeds):
        name = f"{args.recipe.removesuffix('.yaml')} {args.family}{'' if args.family == 'ring' else seed}"
        results[name] = run(args.recipe, args.family, seed, overrides=args.set, out=Path(args.out),
                            samples=args.samples, eval_seeds=args.eval_seeds, tag=args.tag, track=args.track)
        print(table({name: results[name]}), flush=True)
    if len(results) > 1:
        print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
