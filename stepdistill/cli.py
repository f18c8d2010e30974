"""``stepdistill distill | sample | export | eval | demo | ls | build-assets`` (DESIGN.md §6).

``accelerate launch -m stepdistill distill ...`` behaves the same as ``stepdistill distill ...``. Every user error
ends as one line on stderr, ``stepdistill: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


#: the shipped recipes: inside the installed package (a wheel), or the source tree's recipes/ (an editable install)
RECIPES = next((p for p in (Path(__file__).resolve().parent / "recipes",
                            Path(__file__).resolve().parent.parent / "recipes") if p.is_dir()), None)
DEMO_RECIPE = Path(__file__).resolve().parent / "assets" / "demo.yaml"
#: the most samples one ``stepdistill sample`` call draws (they are held in memory and written at once)
MAX_SAMPLES = 1_000_000
#: ``eval``'s defaults for text-to-image students: plain COCO-style captions (bundled), the papers' CLIP model
EVAL_PROMPTS = "prompts/eval.txt"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _user_errors():
    from .config import ConfigError
    from .eval_t2i import EvalError
    from .export import ExportError
    from .teachers import TeacherError
    from .train import RunError

    # OSError: a read-only or missing output location, an unreadable image file (PIL's error is an OSError)
    return ConfigError, EvalError, ExportError, TeacherError, RunError, OSError


# ----------------------------------------------------------------------------------------------------------------


def resolve_recipe(name: str) -> Path:
    """A recipe file, or the name of a shipped one (``progressive/gmm``, ``progressive/gmm.yaml`` or
    ``recipes/progressive/gmm.yaml``), found from any directory."""
    path = Path(name)
    if path.is_file() or RECIPES is None:
        return path
    shipped = RECIPES / Path(name.removeprefix("recipes/")).with_suffix(".yaml")
    return shipped if shipped.is_file() else path


def cmd_distill(args) -> int:
    from .config import ConfigError, dump_recipe, load_recipe
    from .train import Trainer

    path = resolve_recipe(args.recipe)
    recipe = load_recipe(path, args.overrides)
    out = args.output_dir or recipe.output_dir or f"runs/{path.parent.name}_{path.stem}"
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: pass one (continue the run, or replace it)")
    trainer = Trainer(recipe, out, resume=args.resume, overwrite=args.overwrite).setup()
    try:
        trainer.train()
        if recipe.export.pipeline:
            path = trainer.export()
            if path is not None:
                print(f"pipeline: {path}")
        if trainer.writes_lora():  # LoRA-role students of the diffusers families also ship as a LoRA file
            path = trainer.export_lora(kohya=recipe.export.kohya)
            if path is not None:
                print(f"lora: {path}")
        if trainer.accelerator.is_main_process:
            print(f"run directory: {trainer.dir}")
    finally:  # a stop signal or an abort too: the process group and trackers end here
        trainer.close()
    return 0


def _load_student(path: Path):
    """``(student, grid, teacher, prompt table or None)`` from a run directory (latest checkpoint) or an exported
    pipeline folder."""
    from .config import ConfigError, build_recipe
    from .export import load_exported_student
    from .run import load_run
    from .teachers import load_teacher

    if (path / "stepdistill.json").exists():
        meta = json.loads((path / "stepdistill.json").read_text())
        if meta.get("family"):
            raise ConfigError(f"{path}: an exported {meta['pipeline_class']}; sample it with diffusers as its "
                              "README.md shows, or pass the run directory instead")
        teacher = load_teacher(build_recipe({"teacher": meta["teacher"]}).teacher)
        if meta.get("data_map") is None and teacher.data_map is not None and not teacher.data_map.identity:
            # exported before teacher.gmm.normalize (no map recorded): the student works in the data's coordinates
            teacher = load_teacher(build_recipe({"teacher": {"gmm": {**meta["teacher"]["gmm"],
                                                                     "normalize": "off"}}}).teacher)
        student, grid, _ = load_exported_student(path, teacher)
        return student, grid, teacher, None
    if (path / "config.yaml").exists():
        run = load_run(path)
        return run.sampling_student(), run.grid, run.teacher, run.conditions
    raise ConfigError(f"{path}: neither a run directory (config.yaml) nor an exported pipeline (stepdistill.json)")


def cmd_sample(args) -> int:
    from .config import ConfigError
    from .evaluate import student_samples
    from .sampling import StudentGrid
    from .visualize import save_sample_grid

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".npy", ".pt"):
        raise ConfigError(f"--output: {out} must end in .png (a grid), .npy or .pt")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise ConfigError(f"--num-samples: must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    student, grid, teacher, prompts = _load_student(Path(args.path))
    if args.steps and args.steps != grid.steps:
        times = student.schedule.grid(args.steps)
        if not bool((times[:-1] > times[1:]).all()):
            raise ConfigError(f"--steps: {args.steps} steps repeat timesteps of the teacher's schedule")
        grid = StudentGrid(times=tuple(float(t) for t in times[:-1]), transition=grid.transition)
    x = student_samples(student, grid, shape=teacher.sample_shape, num=args.num_samples, seed=args.seed,
                        conditions=prompts)
    if teacher.vae is not None and Path(args.output).suffix not in (".npy", ".pt"):
        from .families import latents_to_images

        x = latents_to_images(teacher.vae, x)  # a grid shows images; .npy / .pt keep the latents
    x = teacher.to_data(x)  # vector teachers: the data's own coordinates (teacher.gmm.normalize)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, x.numpy())
    elif out.suffix == ".pt":
        import torch

        torch.save(x, out)
    else:
        save_sample_grid(x, out, mixture=teacher.data_mixture or teacher.mixture)
    print(f"{args.num_samples} samples ({grid.steps} steps) -> {out}")
    return 0


def cmd_export(args) -> int:
    from .config import ConfigError
    from .export import export_lora, export_pipeline
    from .run import load_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and out.exists() and not args.overwrite:  # the run's own pipeline/ is replaced, not this
        raise ConfigError(f"--output-dir: {out} already exists; pass --overwrite to replace it")
    if out is not None and out.exists() and not _replaceable(out):
        raise ConfigError(f"--overwrite: {out} holds files but no exported pipeline or LoRA (stepdistill.json); "
                          "refusing to delete it")
    run = load_run(run_dir)
    lora = args.lora or args.kohya
    student, grid = run.sampling_student(), run.grid
    if lora:
        path = export_lora(student, run.teacher, grid, run.recipe, out / "lora" if out else run_dir / "lora",
                           kohya=args.kohya)
        print(f"lora: {path}")
    if args.fuse or not lora:  # the stock pipeline, with a LoRA student merged into the backbone
        target = (out / "pipeline" if lora else out) if out else run_dir / "pipeline"
        print(f"pipeline: {export_pipeline(student, run.teacher, grid, run.recipe, target)}")
    return 0


def _replaceable(folder: Path) -> bool:
    """Whether ``export --overwrite`` may replace ``folder``: what an export wrote (a pipeline or LoRA folder with
    ``stepdistill.json``, or a folder holding only such folders), or an empty folder."""
    if not folder.is_dir():
        return False
    if (folder / "stepdistill.json").is_file():
        return True
    return all(e.is_dir() and (e / "stepdistill.json").is_file() for e in folder.iterdir())


def cmd_eval(args) -> int:
    from .config import ConfigError, EvalConfig, load_recipe
    from .eval_t2i import exported_folder
    from .evaluate import evaluate

    path = Path(args.path)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    if not path.exists():
        raise ConfigError(f"{path}: no such run directory or pipeline folder")
    folder = exported_folder(path)
    if folder is not None:
        return _eval_text_to_image(args, path, folder)
    student, grid, teacher, _ = _load_student(path)
    if teacher.family is not None:
        raise ConfigError(f"eval: {path} has no exported pipeline ({path / 'pipeline'}); `stepdistill export "
                          f"{path}` writes it, then evaluate again")
    ev = load_recipe(path / "config.yaml").eval if (path / "config.yaml").exists() else EvalConfig()
    num = args.num_samples or ev.num_samples
    print(f"evaluating: the student and the teacher at {grid.steps} and {ev.teacher_full_steps} steps on {num} "
          "samples each", file=sys.stderr)
    metrics = evaluate(student, grid, teacher, num_samples=num, seed=ev.seed, teacher_sampler=ev.teacher_sampler,
                       full_steps=ev.teacher_full_steps)
    print(json.dumps(metrics, indent=2))
    if (path / "config.yaml").exists():  # a run: its metrics.json, and its exported pipeline's card
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        card = _card_metrics(path, metrics)
        print(f"metrics: {path / 'metrics.json'}" + (f"; model card: {card}" if card else ""), file=sys.stderr)
    else:  # an exported pipeline is left as it is: its card holds its run's own evaluation
        print("metrics printed above; the exported folder is left unchanged (evaluate the run directory to update "
              "its model card)", file=sys.stderr)
    return 0


def _eval_text_to_image(args, path: Path, folder: Path) -> int:
    """A text-to-image student: its exported call beside the teacher's (``eval_t2i``). A run's results go to
    ``RUN/eval/`` and onto its pipeline's model card; an exported folder is left unchanged, its results go beside it
    (``--output-dir``)."""
    import torch

    from .config import ConfigError
    from .eval_t2i import evaluate_export

    is_run = folder != path
    out = Path(args.output_dir) if args.output_dir else (path / "eval" if is_run else
                                                          folder.parent / f"{folder.name}-eval")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here; use --device cpu")
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.prompts is None and RECIPES is None:
        raise ConfigError("--prompts: this install has no bundled prompt list; pass a file (one prompt per line)")
    clip = None if args.clip_model == "none" else args.clip_model or DEFAULT_CLIP
    metrics, metrics_path, picture = evaluate_export(
        folder, out, prompts_file=args.prompts or str(RECIPES / EVAL_PROMPTS), reference=args.reference,
        num=args.num_samples, batch_size=args.batch_size, seed=args.seed, device=device, clip_model=clip,
        features=args.features, inception_weights=args.inception_weights, log=log)
    print(json.dumps(metrics, indent=2))
    log(f"metrics: {metrics_path}\ncompare: {picture}")
    if is_run:
        from .export import card_with_metrics

        card_with_metrics(folder, metrics, picture)
        log(f"model card: {folder / 'README.md'} (metrics and {picture.name} added)")
    return 0


def _card_metrics(path: Path, metrics: dict) -> Path | None:
    """Put ``metrics`` on the model card of a run's exported pipeline (``RUN/pipeline``); returns the card."""
    from .export import card_with_metrics

    folder = path / "pipeline"
    if (folder / "stepdistill.json").exists():
        card_with_metrics(folder, metrics)
        return folder / "README.md"
    return None


def cmd_demo(args) -> int:
    """Distil the embedded digits teacher (64 -> 4 steps), export, evaluate, and say where everything is."""
    import time

    from .config import ConfigError, load_recipe
    from .evaluate import evaluate
    from .train import Trainer

    start = time.perf_counter()
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} already holds files (an earlier demo?); pass --overwrite to run the demo again "
                          "there, or --output-dir DIR")
    recipe = load_recipe(DEMO_RECIPE, args.overrides)
    trainer = Trainer(recipe, args.output_dir, overwrite=args.overwrite).setup()
    trainer.train()
    print("exporting the 4-step pipeline ...", file=sys.stderr)
    pipe = trainer.export()
    ev = recipe.eval
    print(f"evaluating: the student and the teacher at {trainer.method.student_grid().steps} and "
          f"{ev.teacher_full_steps} steps on {ev.num_samples} samples each ...", file=sys.stderr)
    metrics = evaluate(trainer.sampling_student(), trainer.method.student_grid(), trainer.teacher,
                       num_samples=ev.num_samples, seed=ev.seed, teacher_sampler=ev.teacher_sampler,
                       full_steps=ev.teacher_full_steps)
    (trainer.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _card_metrics(trainer.dir, metrics)
    s, tn, tf = metrics["student"], metrics["teacher_same_nfe"], metrics["teacher_full"]
    print(f"\nFrechet distance (lower is better): student {s['nfe']} NFE {s['frechet_distance']:.2f} | "
          f"teacher {tn['nfe']} NFE {tn['frechet_distance']:.2f} | teacher {tf['nfe']} NFE "
          f"{tf['frechet_distance']:.2f}; classes covered by the student: {s['classes_covered']}/10")
    print(f"pipeline:     {pipe}")
    print(f"sample grid:  {trainer.dir / 'samples' / f'step-{trainer.step}.png'}")
    print(f"metrics:      {trainer.dir / 'metrics.json'}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    return 0


def cmd_ls(args) -> int:
    from .families import FAMILIES
    from .methods import METHODS
    from .tiny import TINY_PIPELINES

    print("methods:  " + ", ".join(sorted(METHODS)))
    pipelines = " | ".join(f.pipeline for f in FAMILIES.values())
    print(f"teachers: pretrained: <dir or hub id> (a UNet2DModel folder, or {pipelines})")
    print(f"          tiny: {' | '.join(['unet2d', *TINY_PIPELINES])}")
    print("          gmm: {means, std|stds, weights} | embedded: digits")
    if RECIPES is not None:
        print(f"recipes (in {RECIPES}; `stepdistill distill NAME` takes a file or one of these names):")
        for p in sorted(RECIPES.rglob("*.yaml")):
            if p.parent.name != "accelerate":
                print(f"  {p.relative_to(RECIPES).with_suffix('')}")
    return 0


def cmd_build_assets(args) -> int:
    """Re-train the shipped digits teacher and digits classifier (recorded seeds; a few minutes per asset on CPU)."""
    from .teacher_training import build_digits_classifier, build_digits_teacher

    out = Path(args.output_dir)
    _, acc = build_digits_classifier(out / "digits_classifier.safetensors")
    print(f"digits classifier: held-out accuracy {acc:.3f} -> {out / 'digits_classifier.safetensors'}")
    build_digits_teacher(out / "digits_teacher")
    print(f"digits teacher -> {out / 'digits_teacher'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepdistill", description="Diffusion step distillation for diffusers teachers.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distil a teacher into a few-step student from a recipe")
    d.add_argument("recipe")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    d.add_argument("--output-dir")
    d.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output dir")
    d.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    d.set_defaults(fn=cmd_distill)

    s = sub.add_parser("sample", help="sample a run directory or an exported pipeline")
    s.add_argument("path")
    s.add_argument("--steps", type=int)
    s.add_argument("--num-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", required=True, help="FILE.png (grid) | FILE.npy | FILE.pt")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("export", help="write pipeline/ (and lora/) from a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--output-dir")
    e.add_argument("--lora", action="store_true", help="lora/pytorch_lora_weights.safetensors (roles.mode: lora runs)")
    e.add_argument("--kohya", action="store_true", help="also a kohya/webui LoRA file (SD1.5, SDXL); implies --lora")
    e.add_argument("--fuse", action="store_true", help="with --lora: also write the merged full pipeline")
    e.add_argument("--overwrite", action="store_true", help="replace what is at --output-dir")
    e.set_defaults(fn=cmd_export)

    v = sub.add_parser("eval", help="metrics of a run or pipeline beside the teacher's; prints JSON")
    v.add_argument("path")
    v.add_argument("--num-samples", type=int, help="samples (text-to-image: images; default one per prompt)")
    t = v.add_argument_group("text-to-image students (SD1.5, SDXL, SD3, FLUX)")
    t.add_argument("--prompts", help="prompt file, one per line (COCO captions); default: a bundled list")
    t.add_argument("--reference", help="folder of reference images (one size) for FID/KID against real images")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="default: cuda when there is one, else cpu")
    t.add_argument("--clip-model", help=f"CLIPModel hub id or folder (default {DEFAULT_CLIP}); none: no CLIP score")
    t.add_argument("--features", default="inception",
                   help="FID/KID features: inception (default) | dinov2[:HUB_ID_OR_DIR] (FD_DINOv2, ViT-L/14 default)")
    t.add_argument("--inception-weights", help="torch-fidelity's Inception weights file (offline, not cached)")
    t.add_argument("--output-dir", help="where metrics.json and compare.png go (default RUN/eval, or DIR-eval)")
    v.set_defaults(fn=cmd_eval)

    m = sub.add_parser("demo", help="the embedded digits teacher, distilled end to end")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--output-dir", default="runs/demo")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_demo)

    sub.add_parser("ls", help="methods, teachers and recipes").set_defaults(fn=cmd_ls)

    b = sub.add_parser("build-assets", help="re-train the shipped digits teacher and classifier")
    b.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "assets"))
    b.set_defaults(fn=cmd_build_assets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may follow options (`distill r.yaml --output-dir d train.max_steps=10`).
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except _user_errors() as err:
        print(f"stepdistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
