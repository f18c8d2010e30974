"""stepdistill: diffusion step distillation for diffusers teachers.

The public API: recipes (``build_recipe``, ``load_recipe``), the loop (``Trainer``), evaluation (``evaluate``),
the shared scheduler pieces (schedules, predictions, denoisers, samplers) and the method registry (``METHODS``).
"""

from .config import Recipe, build_recipe, load_recipe
from .denoisers import Denoiser, GMMDenoiser, UNet2DDenoiser, guided
from .evaluate import evaluate
from .methods import METHODS
from .mixture import GaussianMixture
from .parameterization import Prediction
from .sampling import StudentGrid, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun, sample_student
from .schedules import EDM, RectifiedFlow, TrigFlow, VPCosine, VPDiscrete, map_time
from .train import Trainer


__version__ = "0.1.0"

__all__ = [
    "EDM", "METHODS", "Denoiser", "GMMDenoiser", "GaussianMixture", "Prediction", "Recipe", "RectifiedFlow",
    "StudentGrid", "Trainer", "TrigFlow", "UNet2DDenoiser", "VPCosine", "VPDiscrete", "build_recipe", "evaluate",
    "guided", "load_recipe", "map_time", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_heun",
    "sample_student",
]
