"""Diffusers pipelines for few-step students of several experts (stepdistill's phased DMD export): one backbone per
phase of the sampling grid, switched by timestep, inside the stock pipeline's own loop.

Stock pipelines hold one backbone (diffusers switches experts natively only in Wan 2.2's pipelines), which is why this
file exists (stepdistill DESIGN.md §1: ``pipelines/`` only where a stock pipeline cannot express the sampler). It
imports only diffusers and torch. Load a folder with::

    DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)

and call it as the stock pipeline it extends (``DDPMPipeline``, ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``), with the ``call`` arguments of the
folder's ``stepdistill.json``. Expert 0 is the stock component (``unet`` or ``transformer``), expert k is
``<component>_k``; ``expert_from[k - 1]`` is the first (largest) scheduler timestep expert k takes. The family
pipelines switch in ``callback_on_step_end`` (a callback of your own still runs, first).
"""

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    ImagePipelineOutput,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor


#: the most experts a folder holds (the stock component and ``<component>_1`` .. ``<component>_3``)
MAX_EXPERTS = 4
#: timesteps within this of a boundary count as at it (flow schedulers' timesteps are float32 sigmas x 1000)
TOLERANCE = 1e-3


class _Experts:
    """What every expert pipeline shares: registering the experts, picking one by timestep, and switching them inside
    the stock pipeline's own loop (``ExpertsPipeline`` runs its own loop instead)."""

    backbone = "unet"

    def _register_experts(self, experts: list, expert_from) -> None:
        count = 1 + len(expert_from or [])
        if any(e is None for e in experts[:count - 1]) or any(e is not None for e in experts[count - 1:]):
            raise ValueError(f"{type(self).__name__}: expert_from {expert_from} names {count} experts; give "
                             f"{self.backbone} .. {self.backbone}_{count - 1}")
        self.register_modules(**{f"{self.backbone}_{k}": e for k, e in enumerate(experts, 1)})  # absent: None
        self.register_to_config(expert_from=[float(b) for b in expert_from or []])

    def expert(self, t):
        """The backbone that takes timestep ``t``: expert ``k``, the number of ``expert_from`` entries at or above
        ``t``."""
        k = sum(float(t) <= b + TOLERANCE for b in self.config.expert_from)
        return getattr(self, self.backbone if k == 0 else f"{self.backbone}_{k}")

    def __call__(self, *args, callback_on_step_end=None, **kwargs):
        """The stock pipeline's call, with the backbone component set, before each step, to that step's expert."""
        first = getattr(self, self.backbone)

        def switch(pipe, i, t, tensors):
            out = callback_on_step_end(pipe, i, t, tensors) if callback_on_step_end is not None else {}
            if i + 1 < len(pipe.scheduler.timesteps):  # the next step's expert (the first step is expert 0's)
                pipe.__dict__[self.backbone] = pipe.expert(pipe.scheduler.timesteps[i + 1])
            return out

        try:  # the next class in the MRO: the stock pipeline
            return super().__call__(*args, callback_on_step_end=switch, **kwargs)
        finally:
            self.__dict__[self.backbone] = first


class ExpertsPipeline(_Experts, DiffusionPipeline):
    """``UNet2DModel`` experts, sampled as ``DDPMPipeline`` samples its one network."""

    _optional_components = [f"unet_{k}" for k in range(1, MAX_EXPERTS)]

    def __init__(self, unet, scheduler, unet_1=None, unet_2=None, unet_3=None, expert_from: list = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._register_experts([unet_1, unet_2, unet_3], expert_from)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 4, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.expert(t)(image, t).sample
            image = self.scheduler.step(out, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class ExpertsStableDiffusionPipeline(_Experts, StableDiffusionPipeline):
    """SD1.5 ``UNet2DConditionModel`` experts."""

    _optional_components = [*StableDiffusionPipeline._optional_components,
                            *(f"unet_{k}" for k in range(1, MAX_EXPERTS))]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True, unet_1=None, unet_2=None, unet_3=None,
                 expert_from: list = None):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self._register_experts([unet_1, unet_2, unet_3], expert_from)


class ExpertsStableDiffusionXLPipeline(_Experts, StableDiffusionXLPipeline):
    """SDXL ``UNet2DConditionModel`` experts."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components,
                            *(f"unet_{k}" for k in range(1, MAX_EXPERTS))]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None, unet_1=None, unet_2=None, unet_3=None,
                 expert_from: list = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)
        self._register_experts([unet_1, unet_2, unet_3], expert_from)


class ExpertsStableDiffusion3Pipeline(_Experts, StableDiffusion3Pipeline):
    """SD3 ``SD3Transformer2DModel`` experts."""

    backbone = "transformer"
    _optional_components = [*StableDiffusion3Pipeline._optional_components,
                            *(f"transformer_{k}" for k in range(1, MAX_EXPERTS))]

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, image_encoder=None, feature_extractor=None, transformer_1=None,
                 transformer_2=None, transformer_3=None, expert_from: list = None):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder, feature_extractor)
        self._register_experts([transformer_1, transformer_2, transformer_3], expert_from)


class ExpertsFluxPipeline(_Experts, FluxPipeline):
    """FLUX ``FluxTransformer2DModel`` experts."""

    backbone = "transformer"
    _optional_components = [*FluxPipeline._optional_components,
                            *(f"transformer_{k}" for k in range(1, MAX_EXPERTS))]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None, transformer_1=None, transformer_2=None,
                 transformer_3=None, expert_from: list = None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        self._register_experts([transformer_1, transformer_2, transformer_3], expert_from)


#: the expert pipeline of each stock pipeline class (what stepdistill's export looks up)
FOR_STOCK = {"DDPMPipeline": ExpertsPipeline, "StableDiffusionPipeline": ExpertsStableDiffusionPipeline,
             "StableDiffusionXLPipeline": ExpertsStableDiffusionXLPipeline,
             "StableDiffusion3Pipeline": ExpertsStableDiffusion3Pipeline, "FluxPipeline": ExpertsFluxPipeline}
