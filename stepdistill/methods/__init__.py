"""Method registry: recipe ``method.name`` -> loss class. Each method is one file."""

from .base import Batch, LossOutput, Method, Nets, RoleSpec
from .dmd import DMD
from .progressive import ProgressiveDistillation


METHODS = {
    "dmd": DMD,
    "dmd2": DMD,
    "progressive": ProgressiveDistillation,
}

__all__ = ["DMD", "METHODS", "Batch", "LossOutput", "Method", "Nets", "RoleSpec", "ProgressiveDistillation"]
