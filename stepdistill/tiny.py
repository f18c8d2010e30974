"""Tiny random diffusers pipelines of every supported family, built offline in code (``teacher.tiny``).

They are stock pipeline objects with real tokenizers and text encoders, just very small (ECOSYSTEM.md §4): CLIP and
T5 tokenizers are built from in-memory vocabularies, so nothing is downloaded. Tests and smoke runs use them to drive
every code path a real SD1.5 / SDXL / SD3 / FLUX checkpoint takes. Construction is seeded, so the same call always
returns the same weights.
"""

from __future__ import annotations

import torch


def _byte_level_clip_vocab() -> dict[str, int]:
    """GPT-2's printable byte alphabet, each symbol with and without the word-end marker: any text encodes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return vocab


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_clip_vocab(), merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 77):
    """A unigram T5 tokenizer over lowercase letters (no sentencepiece file needed)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("▁" + chr(c), -1.5) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(**kw):
    from transformers import CLIPTextConfig

    # eos/pad id 1 matches the tokenizer above (CLIP pools at the first eos token).
    cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
               layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, hidden_act="gelu",
               projection_dim=32, max_position_embeddings=77)
    return CLIPTextConfig(**{**cfg, **kw})


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _vae(**kw):
    from diffusers import AutoencoderKL

    cfg = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
    return AutoencoderKL(**{**cfg, **kw})


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_sd15():
    """StableDiffusionPipeline: UNet2DConditionModel (16x16x4 latents), CLIP text encoder, 2x VAE (32 px)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    torch.manual_seed(1)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_clip_config()), tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl():
    """StableDiffusionXLPipeline: two CLIP encoders, pooled text embeds and size/crop time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled projection of text_encoder_2 (32)
        cross_attention_dim=64, norm_num_groups=4)  # the two encoders' hidden sizes, concatenated
    torch.manual_seed(1)
    te1, te2 = CLIPTextModel(_clip_config()), CLIPTextModelWithProjection(_clip_config())
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet, scheduler=sched)


def tiny_sd3():
    """StableDiffusion3Pipeline: MMDiT transformer on 16x16x4 latents, two CLIP encoders and a T5, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(1)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=t5_tokenizer())


def tiny_flux(*, guidance_embeds: bool = False):
    """FluxPipeline: packed 2x2 latent patches, text/image position ids; ``guidance_embeds`` makes it dev-like."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    torch.manual_seed(1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae, text_encoder=CLIPTextModel(_clip_config()), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer())


def _eval(build):
    """Modules built in code start in train mode (T5's dropout would make prompt encoding random): as loaded."""

    def built():
        pipe = build()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    return built


#: ``teacher.tiny`` names of the diffusers families (``unet2d`` lives in ``teachers.py``)
TINY_PIPELINES = {"sd15": _eval(tiny_sd15), "sdxl": _eval(tiny_sdxl), "sd3": _eval(tiny_sd3),
                  "flux": _eval(tiny_flux), "flux-dev": _eval(lambda: tiny_flux(guidance_embeds=True))}


def tiny_clip(image_size: int = 32):
    """``(CLIPModel, CLIPProcessor)``: a seeded random CLIP of the tiny text encoders' size, for the CLIP score's
    tests (``stepdistill eval --clip-model`` takes the folder ``save_pretrained`` writes of both)."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    # transformers 5 names the PIL-backed processor apart (the default one needs torchvision); 4.x has one class
    images = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    text = {k: v for k, v in _clip_config().to_dict().items() if k in (
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_hidden_layers", "vocab_size", "max_position_embeddings")}
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    size = {"shortest_edge": image_size}
    processor = CLIPProcessor(image_processor=images(size=size, crop_size={"height": image_size, "width": image_size}),
                              tokenizer=clip_tokenizer())
    return model, processor
