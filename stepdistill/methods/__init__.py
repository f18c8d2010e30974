"""Method registry: recipe ``method.name`` -> loss class. Each method is one file."""

from .base import Batch, LossOutput, Method, Nets, RoleSpec
from .progressive import ProgressiveDistillation


METHODS = {
    "progressive": ProgressiveDistillation,
}

__all__ = ["METHODS", "Batch", "LossOutput", "Method", "Nets", "RoleSpec", "ProgressiveDistillation"]
