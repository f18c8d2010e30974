"""stepdistill: diffusion step distillation for diffusers teachers.

The public API: recipes (``build_recipe``, ``load_recipe``), the loop (``Trainer``), reading a run back
(``load_run``), evaluation (``evaluate``), the shared scheduler pieces (schedules, predictions, denoisers, samplers)
and the method registry (``METHODS``). Names are imported on first use, so ``stepdistill --help`` and ``stepdistill
ls`` answer without loading torch's training stack.
"""

import importlib


__version__ = "0.1.0"

_WHERE = {
    "Recipe": "config", "build_recipe": "config", "load_recipe": "config",
    "Denoiser": "denoisers", "GMMDenoiser": "denoisers", "UNet2DDenoiser": "denoisers", "guided": "denoisers",
    "jvp": "denoisers", "Reparameterized": "denoisers",
    "evaluate": "evaluate", "METHODS": "methods", "GaussianMixture": "mixture", "Prediction": "parameterization",
    "StudentGrid": "sampling", "sample_ddim": "sampling", "sample_dpmpp_2m": "sampling", "sample_euler": "sampling",
    "sample_heun": "sampling", "sample_student": "sampling",
    "EDM": "schedules", "RectifiedFlow": "schedules", "TrigFlow": "schedules", "VPCosine": "schedules",
    "VPDiscrete": "schedules", "map_time": "schedules",
    "Trainer": "train", "load_run": "run",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stepdistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
