"""DMD (v1)'s regression loss on teacher ODE pairs (Yin et al., CVPR 2024, §3.3, Eq. 9), as one piece that DMD
composes: on by default in ``dmd`` (weight 0.25, the paper's), and the whole loss of DMD2's ODE warm-up of one-step
students (``regression_warmup``; DMD2's ``train_sd_ode.py``, METHODS.md §4.3)::

    L_reg = E_(z, y) d(G(z), y),    y = ODE_teacher(z), the pairs made once before training and cached (pairs.py)

``d`` is pseudo-Huber (iCT's metric, ``c = 0.00054 sqrt(dim)``), MSE, or LPIPS (the paper's; pixel images only, from
local weights: ``nets/lpips.py``). Text teachers' pairs carry the prompt rows they were sampled with.
"""

from __future__ import annotations

import torch

from ..nets.lpips import LPIPS, lpips_for_samples
from ..nets.lpips import NETS as LPIPS_NETS
from ..pairs import teacher_pairs
from ..sampling import TEACHER_SAMPLERS, prior_noise
from .terms import DISTANCES, regression_loss


class ODERegression:
    """``d(G(z), y)`` on cached teacher ODE pairs; ``prepare`` makes or loads them, a call draws a batch.

    Args (the recipe keys of the method that composes it):
        loss: ``pseudo_huber``, ``mse`` or ``lpips``.
        num_pairs, sampler, steps: the pair set: how many, the teacher sampler and its steps.
        cache: where the pairs are cached; ``None`` keys a file under ``$STEPDISTILL_CACHE/ode_pairs`` by the
            teacher's weights and these settings.
        lpips_net: ``vgg`` or ``alex``, the LPIPS backbone; ``lpips_weights`` a folder holding it and the LPIPS
            heads (``None``: torchvision's hub cache and the installed ``lpips`` package).
    """

    def __init__(self, *, loss: str = "pseudo_huber", num_pairs: int = 2048, sampler: str = "ddim", steps: int = 64,
                 cache: str | None = None, lpips_net: str = "vgg", lpips_weights: str | None = None):
        if loss not in DISTANCES:
            raise ValueError(f"method.regression_loss must be one of {DISTANCES}, got {loss!r}")
        if lpips_net not in LPIPS_NETS:
            raise ValueError(f"method.lpips_net must be one of {sorted(LPIPS_NETS)}, got {lpips_net!r}")
        if sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"method.pair_sampler must be one of {sorted(TEACHER_SAMPLERS)}, got {sampler!r}")
        self.loss, self.num_pairs, self.sampler, self.steps, self.cache = loss, num_pairs, sampler, steps, cache
        self.lpips_net, self.lpips_weights = lpips_net, lpips_weights
        self.lpips: LPIPS | None = None  # frozen, loaded in prepare(); not a role (never trained or checkpointed)
        self.pairs: dict[str, torch.Tensor] | None = None
        self.pair_cond: dict[str, torch.Tensor] | None = None  # text teachers: the prompt table the pairs index

    def prepare(self, teacher, ctx, *, guidance: float, key: str) -> None:
        """Make or load the pairs (text teachers: sampled with the CFG teacher at ``guidance``, each with a prompt of
        the run's table); ``key`` names the recipe setting in messages."""
        self.pairs, self.pair_cond = teacher_pairs(
            teacher, key=key, sample_shape=ctx.sample_shape, device=ctx.device, cache_dir=ctx.cache_dir,
            num_pairs=self.num_pairs, sampler=self.sampler, steps=self.steps, guidance=guidance,
            conditions=ctx.conditions, cache=self.cache, is_main_process=ctx.is_main_process,
            wait_for_everyone=ctx.wait_for_everyone)
        if self.loss == "lpips":
            self.lpips = lpips_for_samples(ctx.sample_shape, self.lpips_net, self.lpips_weights, ctx.device,
                                           key="method.regression_loss")

    def __call__(self, student, t0: float, b: int, device, gen: torch.Generator) -> torch.Tensor:
        """Per-sample loss of one student step at time ``t0`` from ``b`` drawn pairs' noise against their targets."""
        noise, target = self.pairs["noise"], self.pairs["target"]
        idx = torch.randint(0, noise.shape[0], (b,), generator=gen)
        z, y = noise[idx].to(device), target[idx].to(device)
        cond = None if self.pair_cond is None else {k: v[self.pairs["rows"][idx]] for k, v in self.pair_cond.items()}
        x = student(prior_noise(student.schedule, z, t0), torch.full((b,), t0, dtype=torch.float64), cond).x0
        return regression_loss(x, y, self.loss, self.lpips)
