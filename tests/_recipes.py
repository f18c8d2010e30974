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
    for key, value in overrides.items():
        node = recipe
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe
