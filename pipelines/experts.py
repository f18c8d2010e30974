"""A diffusers pipeline for few-step students of several experts (stepdistill's phased DMD export): one
``UNet2DModel`` per phase of the sampling grid, switched by timestep, stepped by the folder's scheduler as
``DDPMPipeline`` steps its one network.

Stock pipelines hold one backbone (diffusers switches experts natively only in Wan 2.2's pipelines), which is why this
file exists (stepdistill DESIGN.md §1: ``pipelines/`` only where a stock pipeline cannot express the sampler). It
imports only diffusers and torch. Load it with::

    DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)

and call it as ``DDPMPipeline``: ``pipe(batch_size=16, num_inference_steps=4, output_type="np").images``.
Expert 0 is ``unet``, expert k is ``unet_k``; ``expert_from[k - 1]`` is the first (largest) timestep expert k takes.
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


#: the most experts a folder holds (components ``unet``, ``unet_1`` .. ``unet_7``)
MAX_EXPERTS = 8


class ExpertsPipeline(DiffusionPipeline):
    """Few-step sampling with a ``UNet2DModel`` expert per phase: timestep ``t`` goes to expert ``k``, the number of
    ``expert_from`` entries at or above ``t``."""

    model_cpu_offload_seq = "->".join(["unet"] + [f"unet_{k}" for k in range(1, MAX_EXPERTS)])
    _optional_components = [f"unet_{k}" for k in range(1, MAX_EXPERTS)]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, unet_1: UNet2DModel = None,
                 unet_2: UNet2DModel = None, unet_3: UNet2DModel = None, unet_4: UNet2DModel = None,
                 unet_5: UNet2DModel = None, unet_6: UNet2DModel = None, unet_7: UNet2DModel = None,
                 expert_from: list = None):
        super().__init__()
        experts = [unet, unet_1, unet_2, unet_3, unet_4, unet_5, unet_6, unet_7]
        count = 1 + len(expert_from or [])
        if any(e is None for e in experts[:count]) or any(e is not None for e in experts[count:]):
            raise ValueError(f"ExpertsPipeline: expert_from {expert_from} names {count} experts; give unet .. "
                             f"unet_{count - 1}")
        self.register_modules(scheduler=scheduler, **{("unet" if k == 0 else f"unet_{k}"): e
                                                      for k, e in enumerate(experts)})  # absent ones as None
        self.register_to_config(expert_from=list(expert_from or []))

    def expert(self, t) -> UNet2DModel:
        """The expert that takes timestep ``t``."""
        k = sum(int(t) <= int(b) for b in self.config.expert_from)
        return self.unet if k == 0 else getattr(self, f"unet_{k}")

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
