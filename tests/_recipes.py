"""Small recipes shared by the end-to-end tests (fast on 2 CPU cores)."""

from __future__ import annotations

import copy


GMM_2D = {
    "means": [[0.6, 0.0], [-0.6, 0.0], [0.0, 0.6], [0.0, -0.6]],
    "std": 0.08,
    "denoiser": "exact",
}


def gmm_recipe(**overrides) -> dict:
    """PD 8 -> 2 steps on the exact 2-D GMM teacher with a fresh vector student; a few steps only."""
    recipe = {
        "seed": 0,
        "teacher": {"gmm": copy.deepcopy(GMM_2D)},
        "student": {"init": "new"},
        "method": {"name": "progressive", "teacher_steps": 8, "final_steps": 2, "steps_per_stage": 3},
        "data": {"batch_size": 32},
        "optim": {"student": {"lr": 1e-3}},
        "train": {"max_steps": 6, "log_every": 1, "checkpoint_every": 3, "num_sample_images": 16,
                  "keep_checkpoints": 5},
        "eval": {"num_samples": 64, "teacher_full_steps": 8},
    }
    return _apply(recipe, overrides)


def _apply(recipe: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        node = recipe
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def dmd_recipe(**overrides) -> dict:
    """DMD2 with the GAN head, one-step, on a 2-D GMM whose MLP teacher is a quick (cached) fit; a few steps."""
    recipe = gmm_recipe()
    recipe["teacher"] = {"gmm": {**copy.deepcopy(GMM_2D), "denoiser": "mlp",
                                 "fit": {"steps": 200, "batch_size": 256, "width": 32}}}
    recipe["student"] = {"init": "teacher"}
    recipe["method"] = {"name": "dmd2", "student_steps": 1, "gan_weight": 1e-2}
    recipe["optim"] = {"student": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}}
    recipe["train"]["update_every"] = {"student": 2}
    recipe = _apply(recipe, overrides)
    method = recipe["method"]
    if not (method.get("gan_weight", 0) > 0 or method.get("divergence", "reverse_kl") != "reverse_kl"):
        del recipe["optim"]["discriminator"]  # no GAN head is built
    return recipe


FAMILIES = ("sd15", "sdxl", "sd3", "flux")
SMOKE_PROMPTS = str(__import__("pathlib").Path(__file__).parents[1] / "recipes" / "prompts" / "smoke.txt")


def family_recipe(tiny: str, **overrides) -> dict:
    """PD 4 -> 2 steps on a tiny random diffusers-family teacher (``tiny.py``) with CFG w = 3; three steps (for the
    eps-predicting SD teachers the first is the regression stage in which the v-student learns its output)."""
    flow = tiny.startswith(("sd3", "flux"))
    recipe = {
        "seed": 0,
        "teacher": {"tiny": tiny},
        "method": {"name": "progressive", "teacher_steps": 4, "final_steps": 2, "steps_per_stage": 3,
                   "student_prediction": "flow_match" if flow else "v", **({} if flow else {"regression_steps": 1}),
                   **({} if tiny.startswith("flux") else {"guidance": [3.0, 3.0]})},
        "data": {"source": "gaussian", "prompts": SMOKE_PROMPTS, "batch_size": 2},
        "optim": {"student": {"lr": 1e-3}},
        "train": {"max_steps": 3, "log_every": 1, "num_sample_images": 2},
        "eval": {"num_samples": 4, "teacher_full_steps": 4},
    }
    return _apply(recipe, overrides)


def family_dmd_recipe(tiny: str, **overrides) -> dict:
    """DMD2 (no GAN term), 2-step re-noising student, CFG teacher w = 3, on a tiny diffusers-family teacher, with the
    student and fake score as LoRA adapters (rank 4, alpha 8: the scale is exercised); three steps."""
    recipe = family_recipe(tiny)
    recipe["method"] = {"name": "dmd2", "student_steps": 2,
                        **({} if tiny.startswith("flux") else {"guidance_scale": 3.0})}
    recipe["optim"] = {"student": {"lr": 1e-2}, "fake_score": {"lr": 1e-2}}
    recipe["roles"] = {"mode": "lora", "rank": 4, "alpha": 8.0}
    return _apply(recipe, overrides)


def stock_pipeline_latents(consumer: str, folder, noise, prompts: list[str], tmp_path):
    """Run ``consumer`` (a script that loads the exported pipeline with stock diffusers and never imports
    stepdistill) in a fresh process on ``noise``; returns its output latents and its stdout."""
    import json
    import subprocess
    import sys

    import numpy as np
    import torch

    np.save(tmp_path / "noise.npy", noise.numpy())
    argv = [sys.executable, "-c", consumer, str(folder), str(tmp_path / "noise.npy"), str(tmp_path / "out.npy"),
            json.dumps(prompts)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.from_numpy(np.load(tmp_path / "out.npy")), proc.stdout


#: what every shipped gmm recipe also runs with: the true mixture as teacher and fresh roles, a short budget
EXACT_GMM = ["teacher.gmm.denoiser=exact", "student.init=new", "data.batch_size=16", "train.checkpoint_every=1",
             "train.log_every=1", "train.sample_every=0", "train.num_sample_images=4", "eval.num_samples=16",
             "train.update_every={}"]


def two_steps_and_a_resume(recipe_path, overrides: list[str], tmp_path):
    """Two steps of a recipe file, then the same as one step and a resume: the finished two-step trainer and both
    runs' log rows (without the timing), which an exact resume makes equal."""
    import json

    from stepdistill.config import load_recipe
    from stepdistill.train import Trainer

    def run(out, steps, resume=False):
        recipe = load_recipe(recipe_path, [*overrides, f"train.max_steps={steps}"])
        trainer = Trainer(recipe, tmp_path / out, resume=resume, show_progress=False).setup()
        trainer.train()
        return trainer

    full = run("full", 2)
    run("part", 1)
    run("part", 2, resume=True)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "it_per_s"}
             for line in (tmp_path / out / "log.jsonl").read_text().splitlines()] for out in ("full", "part")]
    return full, rows
