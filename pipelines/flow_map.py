"""A diffusers pipeline for flow-map students (stepdistill's MeanFlow export): a ``UNet2DModel`` that takes, besides
the current timestep, the gap to the end of its jump through its 'timestep' class embedding, and moves there by the
DDIM jump of its prediction (the MeanFlow step ``z_r = z_t - (t - r) u`` written on the teacher's own schedule).

Stock ``DDPMPipeline`` cannot pass that second time, which is why this file exists (stepdistill DESIGN.md §1:
``pipelines/`` only where a stock pipeline cannot express the sampler). It imports only diffusers and torch. Load
it with::

    DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)

and call it as ``DDPMPipeline``: ``pipe(batch_size=16, num_inference_steps=1, output_type="np").images``.
"""

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class FlowMapPipeline(DiffusionPipeline):
    """Few-step sampling of a flow-map ``UNet2DModel`` on the timesteps of a ``DDIMScheduler`` (trailing spacing)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _clean_and_noise(self, out, x, alpha_bar):
        """The prediction as ``(x0, eps)`` for the scheduler's ``prediction_type``."""
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - s * out) / a, out
        if kind == "v_prediction":
            return a * x - s * out, a * out + s * x
        if kind == "sample":
            return out, (x - a * out) / s
        raise ValueError(f"FlowMapPipeline: unsupported prediction_type {kind!r}")

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, timesteps: list[int] | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """``timesteps`` (decreasing) overrides the scheduler's own ``num_inference_steps`` grid. Each step from
        timestep ``t`` jumps to the next one (the last to the clean end, timestep -1) and tells the network the gap."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps)
            timesteps = self.scheduler.timesteps.tolist()
        alpha_bar = self.scheduler.alphas_cumprod.to(self.device)
        ends = [*timesteps[1:], -1]
        for t, end in self.progress_bar(list(zip(timesteps, ends))):
            gap = torch.full((batch_size,), float(t - end), device=self.device)
            out = self.unet(x, t, class_labels=gap).sample.float()
            x0, eps = self._clean_and_noise(out, x.float(), alpha_bar[t])
            a_end = alpha_bar[end] if end >= 0 else torch.ones((), device=self.device)
            x = (a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps).to(self.unet.dtype)
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
