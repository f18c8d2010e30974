"""The diffusers model families (SD1.5, SDXL, SD3, FLUX): what differs between them, in one table.

A family names its stock pipeline class, the pipeline component that is the denoising backbone, the adapter that
turns the backbone into ``D(x_t, t, cond)`` (``denoisers.py``), the layers LoRA roles adapt, and how the teacher's
scheduler config becomes a ``NoiseSchedule``. Loading (``teachers.py``), prompt encoding (``conditioning.py``), roles
and export all read this table instead of branching on model names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .denoisers import FluxDenoiser, SD3Denoiser, TextConditioned, UNetCondDenoiser
from .parameterization import DIFFUSERS_PREDICTION
from .schedules import NoiseSchedule, RectifiedFlow, VPDiscrete


#: LoRA targets of UNet2DConditionModel: attention, feed-forward, transformer projections, resnet convs, the down- and
#: upsampling convs and time embedding projections (the list of the LCM-LoRA scripts, ECOSYSTEM.md §2.2/§2.4)
UNET_COND_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|"
                     r"conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|time_emb_proj)$")
#: LoRA targets of the SD3/FLUX transformers: joint-attention projections of both streams, the MLPs, and the output
#: projection of FLUX's single-stream blocks (their attention has no to_out: its output reaches the stream only
#: through proj_out, so leaving it out would adapt those 38 blocks' attention through q/k/v alone)
TRANSFORMER_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\.net\.0\.proj|"
                       r"ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|"
                       r"single_transformer_blocks\.\d+\.proj_out)$")


@dataclass(frozen=True)
class Family:
    """One diffusers model family.

    Attributes:
        name: the ``teacher.tiny`` / recipe name.
        pipeline: the stock diffusers pipeline class name (``model_index.json`` ``_class_name``).
        backbone: the pipeline component that denoises (``unet`` or ``transformer``).
        adapter: the ``denoisers.py`` adapter class.
        lora_targets: regex of the layers LoRA roles and LoRA export adapt.
        flow: rectified-flow family (``sigmas=`` call, FlowMatchEuler scheduler) rather than discrete VP.
        max_sequence_length: the pipeline's default T5 length (``None``: CLIP only, 77 tokens).
        packed_latents: the pipeline packs 2x2 latent patches into tokens (FLUX), so latent sides are even.
        guidance_input: guidance-distilled teachers take the guidance scale as a network input (FLUX.1-dev), not CFG.
    """

    name: str
    pipeline: str
    backbone: str
    adapter: type[TextConditioned]
    lora_targets: str
    flow: bool = False
    max_sequence_length: int | None = None
    packed_latents: bool = False
    guidance_input: bool = False

    def schedule(self, scheduler_config: dict, latent_hw: tuple[int, int], patch_size: int = 2) -> NoiseSchedule:
        """The teacher's noise schedule, from its scheduler config and the latent size (dynamic shifting)."""
        self.check_scheduler(scheduler_config)
        if not self.flow:
            return VPDiscrete.from_scheduler_config(scheduler_config)
        return RectifiedFlow(shift=flow_shift(scheduler_config, self.image_seq_len(latent_hw, patch_size)))

    def check_scheduler(self, cfg: dict) -> None:
        """Refuse a scheduler whose noise schedule this family's reading would get wrong: the SD UNets' schedule is
        built from the config's betas, so an EDM or flow-matching scheduler there (Playground-v2.5-style SDXL) would
        silently read as DDPM's default linear betas; flow families read FlowMatch shift settings."""
        name = cfg.get("_class_name") or "the scheduler"
        if self.flow:
            if not str(cfg.get("_class_name", "FlowMatch")).startswith("FlowMatch"):
                raise ValueError(f"{self.pipeline} teachers need a FlowMatch scheduler; the pipeline has {name}")
            return
        vp = ("beta_schedule" in cfg or "trained_betas" in cfg) and not cfg.get("use_flow_sigmas") \
            and cfg.get("timestep_type", "discrete") == "discrete" and cfg.get("prediction_type") != "flow_prediction"
        if not vp:
            raise ValueError(f"{self.pipeline} teachers need a DDPM-family scheduler (discrete betas, epsilon / "
                             f"v_prediction / sample); {name} with this config is an EDM or flow-matching schedule")

    def prediction(self, scheduler_config: dict) -> str:
        if self.flow:
            return "flow_match"
        kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in DIFFUSERS_PREDICTION:
            raise ValueError(f"scheduler prediction_type {kind!r} unsupported; allowed: {list(DIFFUSERS_PREDICTION)}")
        return DIFFUSERS_PREDICTION[kind]

    def image_seq_len(self, latent_hw: tuple[int, int], patch_size: int = 2) -> int:
        """Tokens the transformer sees, which dynamic shifting depends on: FLUX packs 2x2 latent patches, SD3
        pipelines count ``(h // patch_size) * (w // patch_size)``."""
        h, w = latent_hw
        return (h // patch_size) * (w // patch_size)

    def latent_shape(self, backbone_config, vae_scale: int, resolution: int) -> tuple[int, int, int]:
        """``[C, h, w]`` of the latents the backbone denoises at ``resolution`` pixels (square images)."""
        if self.packed_latents:  # FluxPipeline.prepare_latents: packed 2x2 patches, so an even latent size
            side = 2 * (resolution // (vae_scale * 2))
            return backbone_config.in_channels // 4, side, side
        return backbone_config.in_channels, resolution // vae_scale, resolution // vae_scale

    def default_resolution(self, backbone_config, vae_scale: int) -> int:
        size = getattr(backbone_config, "sample_size", None)
        return (size if isinstance(size, int) else 128) * vae_scale  # FLUX's pipeline default: 128 * 8 = 1024


def flow_shift(cfg: dict, image_seq_len: int) -> float:
    """The constant shift ``k`` of ``sigma = k t / (1 + (k - 1) t)`` that the FlowMatchEuler config applies.

    With ``use_dynamic_shifting`` the pipelines compute ``mu`` from the image token count (``calculate_shift``, a
    line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)); the exponential time shift
    ``e^mu / (e^mu + 1/sigma - 1)`` is this form with ``k = e^mu`` (linear shifting: ``k = mu``).
    """
    for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if cfg.get(key):
            raise ValueError(f"teacher scheduler: FlowMatchEuler with {key} is not supported")
    if not cfg.get("use_dynamic_shifting"):
        return float(cfg.get("shift", 1.0))
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * m + (base_shift - m * base_len)
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("sd15", "StableDiffusionPipeline", "unet", UNetCondDenoiser, UNET_COND_TARGETS),
        Family("sdxl", "StableDiffusionXLPipeline", "unet", UNetCondDenoiser, UNET_COND_TARGETS),
        Family("sd3", "StableDiffusion3Pipeline", "transformer", SD3Denoiser, TRANSFORMER_TARGETS, flow=True,
               max_sequence_length=256),
        Family("flux", "FluxPipeline", "transformer", FluxDenoiser, TRANSFORMER_TARGETS, flow=True,
               max_sequence_length=512, packed_latents=True, guidance_input=True),
    )
}
BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


def vae_scale(vae_config) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def latents_to_images(vae, latents: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Decode latents to images in ``[-1, 1]`` the way the pipelines do (``latents / scaling + shift``); ``grad``
    keeps the graph to the latents (ADD's discriminator on pixels), the VAE's own weights staying frozen."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor + shift
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return vae.decode(z).sample.float().clamp(-1, 1)


def images_to_latents(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode images in ``[-1, 1]`` to the latents the backbone denoises (a sample of the VAE posterior)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return ((dist.sample(generator) - shift) * vae.config.scaling_factor).float()


def family_denoiser(family: Family, backbone, scheduler_config: dict, latent_hw: tuple[int, int],
                    **settings) -> TextConditioned:
    patch = 2 if family.packed_latents else getattr(backbone.config, "patch_size", 2)
    schedule = family.schedule(scheduler_config, latent_hw, patch)
    return family.adapter(backbone, schedule, family.prediction(scheduler_config), **settings)

