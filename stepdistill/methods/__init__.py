"""Method registry: recipe ``method.name`` -> the method's constructor. Each method is one file; a registered name
may be a method with other defaults (``dmd`` is DMD2's class with DMD v1's regression on by default)."""

import functools
import inspect
import typing

from .adversarial import Adversarial
from .base import Batch, LossOutput, Method, Nets, RoleSpec
from .consistency import Consistency
from .dmd import DMD
from .lightning import Lightning
from .meanflow import MeanFlow
from .phased_dmd import PhasedDMD
from .progressive import ProgressiveDistillation
from .scm import SCM
from .sid import SiD


METHODS = {
    # ADD: real data, hinge loss with R1 and the teacher's score distillation (lambda 2.5); the discriminator's
    # features are the recipe's choice (method.source: dino, ADD's DINOv2 on decoded pixels, in the SD recipes)
    "add": functools.partial(Adversarial, distill_weight=2.5, r1_weight=1e-5),
    # LADD: the teacher's own samples as reals, its features as the discriminator, no distillation loss
    "ladd": functools.partial(Adversarial, real="teacher"),
    # consistency distillation: LCM's defaults, CD with its Heun teacher step, PCM's phases, TCD's random endpoint
    "cd": functools.partial(Consistency, solver="heun"),
    "lcm": Consistency,
    "pcm": functools.partial(Consistency, endpoint="phase", target_ema=0.0, distance="huber"),
    "tcd": functools.partial(Consistency, endpoint="random"),
    # ECT: consistency training (no teacher) on its continuous pairs, from the teacher's weights (method.solver: ddim
    # makes it distillation)
    "ect": functools.partial(Consistency, times="ect", solver="forward", target_ema=0.0, distance="l2"),
    # iCT: consistency training on its doubling Karras grid, pseudo-Huber, no target EMA
    "ict": functools.partial(Consistency, times="ict", solver="forward", target_ema=0.0, distance="pseudo_huber"),
    "dmd": functools.partial(DMD, regression_weight=0.25),
    "dmd2": DMD,
    # SDXL-Lightning: progressive distillation's stages, the first by MSE, then a conditional adversarial loss
    "lightning": Lightning,
    # MeanFlow: the average velocity u(z, r, t) of the teacher's flow, by its JVP identity (one- and two-step jumps)
    "meanflow": MeanFlow,
    # phased DMD: DMD per SNR phase of a deterministic few-step grid, an expert and a critic per phase
    "phased_dmd": PhasedDMD,
    "progressive": ProgressiveDistillation,
    # rCM: sCM with DMD's distribution-matching loss (and its fake score) as a regulariser after the warm-up
    "rcm": functools.partial(SCM, dmd={}),
    "scm": SCM,
    # SiD: score identity distillation (through the inputs of the teacher and the fake score); SiDA adds DMD2's GAN
    # term on the fake score's bottleneck
    "sid": SiD,
    "sida": functools.partial(SiD, gan_weight=3e-3),
}


def method_class(name: str) -> type[Method]:
    """The class behind a registered name."""
    factory = METHODS[name]
    return factory.func if isinstance(factory, functools.partial) else factory


def method_parameters(name: str) -> dict[str, tuple[object, object]]:
    """The recipe keys of method ``name``: ``{key: (type hint, default)}``, from its constructor's signature."""
    hints = typing.get_type_hints(method_class(name).__init__)
    sig = inspect.signature(METHODS[name])
    return {k: (hints.get(k, typing.Any), p.default) for k, p in sig.parameters.items()}


__all__ = ["Adversarial", "Consistency", "DMD", "METHODS", "Batch", "Lightning", "LossOutput", "MeanFlow", "Method",
           "Nets", "PhasedDMD", "RoleSpec", "ProgressiveDistillation", "SCM", "SiD", "method_class",
           "method_parameters"]
