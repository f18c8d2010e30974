"""Adapters that make every teacher and student look alike: ``D(x_t, t, cond) -> Prediction``.

This is the only module that converts the library time ``t`` into what a backbone takes (DESIGN.md §2), in the
manner of k-diffusion's ``external.py`` wrappers and EDM's preconditioning wrapper: the backbone itself is untouched.

``cond`` is a dict of backbone keyword inputs (``{"class_labels": LongTensor[B]}``) or ``None`` for unconditional
models. Classifier-free guidance is ``guided(...)`` with one convention everywhere: ``p = p_u + w (p_c - p_u)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .mixture import GaussianMixture
from .parameterization import DIFFUSERS_PREDICTION, KINDS, Coefficients, Prediction
from .schedules import NoiseSchedule


Cond = dict | None


class RoleModule(nn.Module):
    """What the training loop needs of any role: a ``backbone`` to optimise, checkpoint and wrap for DDP/FSDP."""

    @property
    def backbone(self) -> nn.Module | None:
        """The trainable network inside the adapter (``None`` for analytic denoisers)."""
        return getattr(self, "unet", None)

    def wrap_backbone(self, wrapped: nn.Module) -> None:
        """Route forward calls through ``wrapped`` (a DDP/FSDP wrapper of ``backbone``) while parameters, state
        dicts and attributes stay those of the plain backbone. Not registered as a submodule on purpose."""
        object.__setattr__(self, "_wrapped_backbone", wrapped)

    def _call_backbone(self) -> nn.Module:
        return self.__dict__.get("_wrapped_backbone") or self.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What this role's optimizer owns (LoRA roles: their adapter only, ``lora.AdapterDenoiser``)."""
        return list(self.backbone.parameters())

    def role_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for this role."""
        return self.backbone.state_dict()

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.load_state_dict(state)

    def plain_backbone(self) -> nn.Module:
        """The role as a stock backbone with no wrappers or adapters (what export saves)."""
        return self.backbone

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the backbone (diffusers models); a no-op for backbones without it.

        The recompute sees the adapter and ``requires_grad`` state of the original forward (``lora.py``)."""
        from .lora import consistent_checkpoint

        if getattr(self.backbone, "_supports_gradient_checkpointing", False):
            self.backbone.enable_gradient_checkpointing(consistent_checkpoint(self.backbone))


class Denoiser(RoleModule):
    """Base adapter. Subclasses implement ``raw(x_t, model_time, cond)`` returning the backbone's output."""

    def __init__(self, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        if prediction not in KINDS:
            raise ValueError(f"prediction must be one of {KINDS}, got {prediction!r}")
        self.schedule = schedule
        self.prediction = prediction

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The backbone's raw output at the backbone's own timestep. Analytic denoisers override ``forward``."""
        raise TypeError(f"{type(self).__name__} must implement raw() or override forward()")

    def feature_module(self) -> nn.Module:
        """The block whose output is the bottleneck feature map (GAN heads read it, DMD2 §3.2)."""
        raise TypeError(f"{type(self).__name__} has no bottleneck features for a GAN head")

    def with_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> tuple[Prediction, torch.Tensor]:
        """One forward pass returning the prediction and the bottleneck features ``[B, C, h, w]``.

        The features are caught by a forward hook on ``feature_module()``, so the pass goes through the (possibly
        DDP-wrapped) backbone like any other: DDP sees every parameter used and its reducer stays consistent.
        """
        caught = []
        handle = self.feature_module().register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            pred = self(x_t, t, cond)
        finally:
            handle.remove()
        feats = caught[-1][0] if isinstance(caught[-1], tuple) else caught[-1]
        return pred, feats

    def null_cond(self, cond: Cond) -> Cond:
        """The condition that means "no condition" for CFG. Unconditional models have none."""
        raise ValueError(f"{type(self).__name__} is unconditional; classifier-free guidance needs a condition")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        out = self.raw(x_t, self.schedule.model_time(t), cond)
        return Prediction.from_output(self.prediction, out, x_t, Coefficients.at(self.schedule, t, x_t))


def guided(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, w) -> Prediction:
    """Classifier-free guidance in the one convention of DESIGN.md §2: ``p_u + w (p_c - p_u)``; ``w = 1`` is plain.

    The conditional and unconditional passes share one batched forward, as diffusers pipelines do.
    ``w`` is a float or a per-sample ``[B]`` tensor.
    """
    if cond is None or (not torch.is_tensor(w) and w == 1.0):
        return denoiser(x_t, t, cond)
    null = denoiser.null_cond(cond)
    both = {k: torch.cat([null[k], cond[k]]) for k in cond}
    t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
    uncond_pred, cond_pred = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return Prediction.combine(uncond_pred, cond_pred, w)


# ----------------------------------------------------------------------------------------------------------------


class UNet2DDenoiser(Denoiser):
    """A diffusers ``UNet2DModel`` (unconditional or class-conditional) on any ``NoiseSchedule``.

    Vector data ``[B, D]`` is fed as ``[B, D, 1, 1]``; that is how the vector backbones of ``nets/vector.py`` work.
    For class-conditional UNets (``num_class_embeds = classes + 1``) the last embedding is the null class.

    Args:
        unet: the backbone.
        schedule: the schedule the backbone was trained on.
        prediction: ``x0 | eps | v | flow``; defaults to the ``prediction_type`` the UNet config does not carry,
            so pass it from the scheduler config (``DIFFUSERS_PREDICTION[cfg["prediction_type"]]``).
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction: str):
        super().__init__(schedule, prediction)
        self.unet = unet

    @classmethod
    def from_scheduler_config(cls, unet: nn.Module, schedule: NoiseSchedule, scheduler_config) -> UNet2DDenoiser:
        kind = dict(scheduler_config).get("prediction_type", "epsilon")
        if kind not in DIFFUSERS_PREDICTION:
            raise ValueError(f"scheduler prediction_type {kind!r} unsupported; allowed: {list(DIFFUSERS_PREDICTION)}")
        return cls(unet, schedule, DIFFUSERS_PREDICTION[kind])

    @property
    def num_classes(self) -> int | None:
        n = getattr(self.unet.config, "num_class_embeds", None)
        return None if n is None else n - 1

    def null_cond(self, cond: Cond) -> Cond:
        if self.num_classes is None:
            return super().null_cond(cond)
        labels = cond["class_labels"]
        return {"class_labels": torch.full_like(labels, self.num_classes)}

    def feature_module(self) -> nn.Module:
        return self.unet.mid_block

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        vector = x_t.ndim == 2
        x = x_t[:, :, None, None] if vector else x_t
        param = next(self.unet.parameters())
        out = self._call_backbone()(x.to(param.dtype), model_time.to(device=x.device, dtype=torch.float32),
                                    **(cond or {})).sample
        return out[:, :, 0, 0] if vector else out


class GMMDenoiser(Denoiser):
    """The exact denoiser of a Gaussian mixture: ``E[x0 | x_t]`` in closed form (an oracle teacher).

    Conditional when ``cond = {"class_labels": k}``: then it is the denoiser of component k alone. The null class is
    ``num_modes`` (the whole mixture).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__(schedule, "x0")
        self.mixture = mixture
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def null_cond(self, cond: Cond) -> Cond:
        return {"class_labels": torch.full_like(cond["class_labels"], self.mixture.num_modes)}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        labels = None if cond is None else cond["class_labels"].cpu()
        x0 = self.mixture.denoise(x_t.cpu(), a.cpu(), s.cpu(), labels=labels)
        coeffs = Coefficients.at(self.schedule, t, x_t)
        x0 = x0.to(x_t.device)
        eps = (x_t.double() - coeffs.a * x0) / coeffs.s
        return Prediction(x0, eps, coeffs, x_t.dtype)
