"""The recipe every registered method must run with (tests/test_contract.py): its constructor's defaults on the exact
2-D Gaussian mixture, whose roles are built fresh (no teacher weights to copy)."""

from ._recipes import GMM_2D


def contract_recipe(name: str, **train) -> dict:
    return {
        "seed": 0,
        "teacher": {"gmm": dict(GMM_2D)},
        "method": {"name": name},
        "data": {"batch_size": 16},
        "optim": {},
        "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 5,
                  "num_sample_images": 4, **train},
        "eval": {"num_samples": 16, "teacher_full_steps": 4},
    }
