"""Adapters that make every teacher and student look alike: ``D(x_t, t, cond) -> Prediction``.

This is the only module that converts the library time ``t`` into what a backbone takes (DESIGN.md §2), in the
manner of k-diffusion's ``external.py`` wrappers and EDM's preconditioning wrapper: the backbone itself is untouched.

``cond`` is a dict of backbone keyword inputs (``{"class_labels": LongTensor[B]}``) or ``None`` for unconditional
models. Classifier-free guidance is ``guided(...)`` with one convention everywhere: ``p = p_u + w (p_c - p_u)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys

import torch
from torch import nn

from .mixture import GaussianMixture
from .parameterization import DIFFUSERS_PREDICTION, KINDS, Coefficients, Prediction
from .schedules import NoiseSchedule
from .sharding import full, is_sharded, load_local, shard_like
from .types import noise_like


Cond = dict | None


class RoleModule(nn.Module):
    """What the training loop needs of any role: a ``backbone`` to optimise, checkpoint and shard (FSDP)."""

    @property
    def backbone(self) -> nn.Module | None:
        """The trainable network inside the adapter (``None`` for analytic denoisers)."""
        for name in ("unet", "transformer"):
            if name in self._modules:
                return self._modules[name]
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What this role's optimizer owns (LoRA roles: their adapter only, ``lora.AdapterDenoiser``)."""
        return list(self.backbone.parameters())

    def role_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for this role."""
        return self.backbone.state_dict()

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.backbone.state_dict()
        if any(is_sharded(v) for v in own.values()):  # this role is sharded (FSDP2): copy shard for shard
            load_local(own, {k: shard_like(v, own[k]) if k in own else v for k, v in state.items()})
            return
        self.backbone.load_state_dict({k: full(v) for k, v in state.items()})  # from a sharded role: all-gather

    def plain_backbone(self) -> nn.Module:
        """The role as a stock backbone with no wrappers or adapters (what export saves): a copy the caller owns."""
        return copy.deepcopy(self.backbone)


class _Stop(Exception):
    """Ends a forward cut short once the deepest requested feature map is caught (``Denoiser.features``)."""


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

    # ------------------------------------------------------------------------------------------------ features
    def feature_modules(self) -> list[nn.Module]:
        """The blocks whose outputs are the feature maps ``features`` reads, in the order the forward runs them."""
        raise TypeError(f"{type(self).__name__} has no feature maps for a discriminator")

    def feature_map(self, out, x_t: torch.Tensor) -> torch.Tensor:
        """A feature block's output as a ``[B, C, h, w]`` map."""
        return out[0] if isinstance(out, tuple) else out

    def feature_channels(self) -> list[int]:
        """Channels of each ``feature_modules()`` map."""
        raise TypeError(f"{type(self).__name__} has no feature maps for a discriminator")

    @property
    def bottleneck(self) -> int:
        """The index of the map a single GAN head reads (DMD2's ``classify_mode``): a UNet's mid block, the deepest
        and smallest; a transformer's middle block (it has no bottleneck; half the blocks is half the cost)."""
        return len(self.feature_modules()) - 1

    def _layers(self, layers) -> list[int]:
        n = len(self.feature_modules())
        picked = [self.bottleneck] if layers is None else [i % n if -n <= i < n else None for i in layers]
        if None in picked or not picked:
            raise ValueError(f"{type(self).__name__}: feature layers {layers} out of range (it has {n})")
        return picked

    def _hooked(self, x_t: torch.Tensor, layers: list[int], caught: dict, stop: int | None):
        modules = self.feature_modules()

        def hook(index):
            def catch(_module, _inputs, out):
                caught[index] = self.feature_map(out, x_t)
                if index == stop:
                    raise _Stop

            return catch

        return [modules[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]

    def with_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None,
                      layers=None) -> tuple[Prediction, list[torch.Tensor]]:
        """One whole forward pass returning the prediction and the feature maps of ``layers`` (indices into
        ``feature_modules()``; default: the bottleneck), each ``[B, C, h, w]``."""
        picked, caught = self._layers(layers), {}
        handles = self._hooked(x_t, picked, caught, stop=None)
        try:
            pred = self(x_t, t, cond)
        finally:
            for h in handles:
                h.remove()
        return pred, [caught[i] for i in picked]

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, layers=None) -> list[torch.Tensor]:
        """The feature maps of ``layers`` (default: the bottleneck), each ``[B, C, h, w]``: UNets' down and mid blocks,
        SD3/FLUX blocks' image tokens on the latent grid. The forward stops at the deepest requested block, so what
        lies after it (a UNet's decoder half) is neither computed nor kept: DMD2's ``classify_mode`` forward
        (``guidance_model.compute_cls_logits``). FSDP2 shards need their own forward hooks to run to the end, so a
        sharded backbone takes the whole pass instead."""
        if any(is_sharded(p) for p in self.backbone.parameters()):
            return self.with_features(x_t, t, cond, layers)[1]
        picked, caught = self._layers(layers), {}
        handles = self._hooked(x_t, picked, caught, stop=max(picked))
        try:
            self(x_t, t, cond)
        except _Stop:
            return [caught[i] for i in picked]
        finally:
            for h in handles:
                h.remove()
        raise RuntimeError(f"{type(self).__name__}: the forward never reached its feature block {max(picked)}")

    def null_cond(self, cond: Cond) -> Cond:
        """The condition that means "no condition" for CFG. Unconditional models have none."""
        raise ValueError(f"{type(self).__name__} is unconditional; classifier-free guidance needs a condition")

    def with_backbone(self, backbone: nn.Module, prediction: str) -> Denoiser:
        """The same adapter (schedule, conditioning settings) around another backbone: how roles are built."""
        raise TypeError(f"{type(self).__name__} has no backbone to replace")

    @property
    def sampling_guidance(self) -> float | None:
        """The guidance scale the network takes as an input when ``cond`` names none (the scale a w-conditioned
        student samples and exports with); ``None`` when the network takes no guidance input."""
        return None

    def guidance_conditioned(self, default: float) -> Denoiser:
        """This adapter around a backbone that takes a per-sample guidance scale ``cond["guidance"]`` (guided
        distillation, Meng et al. 2023, §3.1), sampling at ``default`` when none is given. Backbones without such an
        input get a new one whose output layer starts at zero, so the network is unchanged until it trains."""
        raise ValueError(f"a guidance-scale input (method.guidance as a range) is not available for "
                         f"{type(self).__name__}: diffusers has no w-embedding for its backbone; distil one fixed "
                         f"scale instead (guidance: [w, w])")

    def with_end_time(self) -> Denoiser:
        """This adapter around a backbone that takes a second time: the end time ``cond["r"]`` of a flow-map jump
        (MeanFlow's average velocity ``u(x, r, t)``, Geng et al. 2025), fed as the gap ``t - r`` in the backbone's
        timestep units; without ``r`` the gap is 0 (``r = t``: the instantaneous velocity, a plain diffusion model).
        Backbones without such an input get a new one whose output layer starts at zero, so the network is unchanged
        until it trains."""
        raise ValueError(f"a flow-map student (MeanFlow) needs a second time input, and stepdistill can give one only "
                         f"to unconditional UNet2DModel backbones (their 'timestep' class embedding), not to "
                         f"{type(self).__name__}; no stock or pipelines/ export passes it for other backbones")

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise shaped like ``like``, drawn (on CPU) in the layout the family's stock pipeline
        draws it, so a seeded re-noising sampler and the exported pipeline see the same numbers."""
        return noise_like(like, generator)

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

    def with_backbone(self, backbone: nn.Module, prediction: str) -> Denoiser:
        return UNet2DDenoiser(backbone, self.schedule, prediction)

    @property
    def takes_end_time(self) -> bool:
        """Whether the backbone's class embedding is a second timestep (``class_embed_type="timestep"``): the gap
        ``t - r`` of a flow-map student (``with_end_time``)."""
        return getattr(getattr(self.unet, "config", None), "class_embed_type", None) == "timestep"

    def with_end_time(self) -> Denoiser:
        if self.num_classes is not None:
            raise ValueError("a flow-map student (MeanFlow) takes its second time through UNet2DModel's class "
                             "embedding, which this class-conditional UNet uses for its labels; distil an "
                             "unconditional UNet2DModel")
        if self.takes_end_time:
            return self
        unet = _grown(self.unet, {"class_embed_type": "timestep"},
                      zero=("class_embedding.linear_2.weight", "class_embedding.linear_2.bias"))
        return self.with_backbone(unet, self.prediction)

    def null_cond(self, cond: Cond) -> Cond:
        if self.num_classes is None:
            return super().null_cond(cond)
        labels = cond["class_labels"]
        return {"class_labels": torch.full_like(labels, self.num_classes)}

    def feature_modules(self) -> list[nn.Module]:
        return unet_feature_modules(self.unet)

    def feature_channels(self) -> list[int]:
        return unet_feature_channels(self.unet)

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        vector = x_t.ndim == 2
        x = x_t[:, :, None, None] if vector else x_t
        param = next(self.unet.parameters())
        cond = dict(cond or {})
        r = cond.pop("r", None)
        if self.takes_end_time:  # the gap t - r in timesteps (the clean end r = 0 is timestep -1, as DDIM's last step)
            end = model_time if r is None else self.schedule.model_time(r).to(model_time.device)
            cond["class_labels"] = (model_time - end).float()
        elif r is not None:
            raise ValueError("cond['r'] (a flow-map end time) given to a UNet2DModel without a second time input")
        out = self.unet(x.to(param.dtype), model_time.to(device=x.device, dtype=torch.float32), **cond).sample
        return out[:, :, 0, 0] if vector else out


def unet_feature_modules(unet: nn.Module) -> list[nn.Module]:
    """A UNet's encoder: each down block (its output after its resnets and downsampling), then the mid block."""
    return [*unet.down_blocks, unet.mid_block]


def unet_feature_channels(unet: nn.Module) -> list[int]:
    channels = list(unet.config.block_out_channels)
    return [*channels, channels[-1]]


class TokenFeatures:
    """Feature maps of a transformer backbone: each block's image tokens ``[B, N, C]`` (the second output of SD3's and
    FLUX's blocks, ``(encoder_hidden_states, hidden_states)``) laid back on the latent grid of ``patch``-sized
    patches, row by row, as the patch embedding (SD3) and ``pack_latents`` (FLUX) flattened them."""

    patch = 2

    def feature_map(self, out, x_t: torch.Tensor) -> torch.Tensor:
        tokens = out[1] if isinstance(out, tuple) else out
        b, _, c = tokens.shape
        h, w = x_t.shape[-2] // self.patch, x_t.shape[-1] // self.patch
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def feature_channels(self) -> list[int]:
        cfg = self.backbone.config
        return [cfg.num_attention_heads * cfg.attention_head_dim] * len(self.feature_modules())

    @property
    def bottleneck(self) -> int:
        return len(self.feature_modules()) // 2


def _grown(backbone: nn.Module, changes: dict, zero: tuple[str, ...]) -> nn.Module:
    """A backbone of the same class whose config has ``changes``, carrying every weight of ``backbone``. The
    parameters the change adds must be exactly ``zero`` plus what feeds them; ``zero`` (the new module's output layer)
    starts at zero, so the new input has no effect until it trains while gradients still reach it. (The LCM script
    adds its w-embedding to SD the same way, with ``strict=False``, but keeps the default initialisation.)"""
    # Without the private keys: ``_use_default_values`` would reset the very keys being changed to their defaults.
    config = {k: v for k, v in backbone.config.items() if not k.startswith("_")}
    new = type(backbone).from_config({**config, **changes})
    missing, unexpected = new.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or not set(zero) <= set(missing):
        raise ValueError(f"{type(backbone).__name__}: config change {changes} did not add {list(zero)} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    params = dict(new.named_parameters())
    with torch.no_grad():
        for name in zero:
            params[name].zero_()
    ref = next(backbone.parameters())
    return new.to(ref.device, ref.dtype).train(backbone.training)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of a guidance scale that w-conditioned UNets take as ``timestep_cond``.

    Latent Consistency Models (Luo et al. 2023), following Meng et al. (2023) guided distillation; the same formula as
    diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``, which the exported pipeline uses
    (called there with ``w = guidance_scale - 1``).
    """
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TextConditioned(Denoiser):
    """Base of the text-conditioned adapters (SD1.5, SDXL, SD3, FLUX).

    ``cond`` holds a prompt encoded by the family's own pipeline (``conditioning.py``): ``encoder_hidden_states`` plus
    the family's pooled embeddings and ids. The null condition of CFG is the encoding of the empty prompt, exactly what
    the stock pipeline uses as its default negative prompt (zeros for SDXL, ``force_zeros_for_empty_prompt``). It is
    set once by ``set_null_condition``; keys it does not hold (SDXL's size ids, FLUX's embedded guidance) are kept
    from ``cond``.
    """

    def set_null_condition(self, null: dict[str, torch.Tensor]) -> None:
        self._null_keys = tuple(null)
        for key, value in null.items():
            self.register_buffer(f"null_{key}", value[:1].detach().clone(), persistent=False)

    def null_cond(self, cond: Cond) -> Cond:
        keys = getattr(self, "_null_keys", None)
        if keys is None:
            raise ValueError(f"{type(self).__name__}: no null condition set; encode prompts first (conditioning.py)")
        out = dict(cond)
        for key in keys:
            ref, null = cond[key], getattr(self, f"null_{key}")
            out[key] = null.to(ref.device, ref.dtype).expand(ref.shape[0], *null.shape[1:])
        return out

    def settings(self) -> dict:
        """Constructor keywords beyond ``(backbone, schedule, prediction)``."""
        return {}

    def with_backbone(self, backbone: nn.Module, prediction: str) -> Denoiser:
        new = type(self)(backbone, self.schedule, prediction, **self.settings())
        if hasattr(self, "_null_keys"):
            new.set_null_condition({k: getattr(self, f"null_{k}") for k in self._null_keys})
        return new

    def _inputs(self, cond: Cond) -> dict[str, torch.Tensor]:
        if cond is None or "encoder_hidden_states" not in cond:
            raise ValueError(f"{type(self).__name__} needs an encoded prompt (cond['encoder_hidden_states'])")
        dtype = next(self.backbone.parameters()).dtype
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


class UNetCondDenoiser(TextConditioned):
    """A diffusers ``UNet2DConditionModel``: SD1.5-type (``encoder_hidden_states``) or SDXL-type (plus
    ``text_embeds`` and ``time_ids``, passed as ``added_cond_kwargs``), on the teacher's discrete VP schedule.

    ``cond["guidance"]`` (a per-sample guidance scale) feeds the w-embedding of LCM-style students
    (``time_cond_proj_dim``), as ``LatentConsistencyModelPipeline`` does; without it such a UNet gets ``guidance``
    (stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` embed their ``guidance_scale`` the same way and
    then skip CFG).
    """

    #: width of the w-embedding given to students that lack one (the LCM scripts' ``unet_time_cond_proj_dim``)
    W_EMBEDDING_DIM = 256

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction: str, *, guidance: float | None = None):
        super().__init__(schedule, prediction)
        self.unet = unet
        self.guidance = guidance

    def settings(self) -> dict:
        return {"guidance": self.guidance}

    @property
    def sampling_guidance(self) -> float | None:
        return self.guidance if self.unet.config.time_cond_proj_dim is not None else None

    def guidance_conditioned(self, default: float) -> Denoiser:
        unet = self.unet
        if unet.config.time_cond_proj_dim is None:
            unet = _grown(unet, {"time_cond_proj_dim": self.W_EMBEDDING_DIM},
                          zero=("time_embedding.cond_proj.weight",))
        new = self.with_backbone(unet, self.prediction)
        new.guidance = float(default)
        return new

    def feature_modules(self) -> list[nn.Module]:
        return unet_feature_modules(self.unet)

    def feature_channels(self) -> list[int]:
        return unet_feature_channels(self.unet)

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = self._inputs(cond)
        kwargs = {"encoder_hidden_states": c.pop("encoder_hidden_states")}
        added = {k: c.pop(k) for k in ("text_embeds", "time_ids") if k in c}
        if added:
            kwargs["added_cond_kwargs"] = added
        dim = self.unet.config.time_cond_proj_dim
        w = c.pop("guidance", None)
        if w is None and dim is not None and self.guidance is not None:
            w = torch.full((x_t.shape[0],), self.guidance, device=x_t.device)
        if w is not None:
            if dim is None:
                raise ValueError("a guidance-conditioned UNet needs time_cond_proj_dim (the LCM w-embedding)")
            kwargs["timestep_cond"] = guidance_embedding(w - 1.0, dim).to(x_t.device)
        if c:
            raise ValueError(f"UNetCondDenoiser: unexpected condition keys {sorted(c)}")
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x_t.to(dtype), model_time.to(x_t.device, torch.float32), **kwargs).sample


class SD3Denoiser(TokenFeatures, TextConditioned):
    """A diffusers ``SD3Transformer2DModel`` on rectified flow: timestep ``1000 sigma``, output ``eps - x0``."""

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, prediction: str = "flow_match"):
        super().__init__(schedule, prediction)
        self.transformer = transformer
        self.patch = transformer.config.patch_size

    def feature_modules(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = self._inputs(cond)
        dtype = next(self.transformer.parameters()).dtype
        return self.transformer(
            hidden_states=x_t.to(dtype), timestep=model_time.to(x_t.device, torch.float32),
            encoder_hidden_states=c.pop("encoder_hidden_states"), pooled_projections=c.pop("pooled_projections"),
            return_dict=False)[0]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing: ``[B, C, H, W] -> [B, H/2 * W/2, 4C]`` (as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a ``[B, C, h, w]`` latent."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class FluxDenoiser(TokenFeatures, TextConditioned):
    """A diffusers ``FluxTransformer2DModel``. The library keeps latents unpacked ``[B, C, H, W]``; this adapter
    packs them, builds the position ids and unpacks the velocity ``eps - x0``.

    Guidance-distilled teachers (FLUX.1-dev, ``guidance_embeds``) take the guidance scale as an input, not as CFG:
    ``cond["guidance"]`` when given, else ``guidance`` (the pipeline's default 3.5).
    """

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, prediction: str = "flow_match", *,
                 guidance: float = 3.5):
        super().__init__(schedule, prediction)
        self.transformer = transformer
        self.guidance = guidance

    def settings(self) -> dict:
        return {"guidance": self.guidance}

    def feature_modules(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @property
    def sampling_guidance(self) -> float | None:
        return self.guidance if self.transformer.config.guidance_embeds else None

    def guidance_conditioned(self, default: float) -> Denoiser:
        transformer = self.transformer
        if not transformer.config.guidance_embeds:  # schnell-like: add FLUX.1-dev's guidance embedder
            out = "time_text_embed.guidance_embedder.linear_2"
            transformer = _grown(transformer, {"guidance_embeds": True}, zero=(f"{out}.weight", f"{out}.bias"))
        new = self.with_backbone(transformer, self.prediction)
        new.guidance = float(default)
        return new

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # FluxPipeline's scheduler draws re-noising noise in the packed [B, H/2 * W/2, 4C] layout
        b, c, h, w = like.shape
        packed = torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=generator, dtype=like.dtype)
        return unpack_latents(packed, h, w).to(like.device)

    def raw(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = self._inputs(cond)
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
        dtype, dev = next(self.transformer.parameters()).dtype, x_t.device
        text = c.pop("encoder_hidden_states")
        guidance = c.pop("guidance", None)
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=dev) if guidance is None else guidance.float()
        elif guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (schnell-like); drop cond['guidance']")
        rows = torch.arange(h // 2, device=dev, dtype=dtype)[:, None].expand(h // 2, w // 2)
        cols = torch.arange(w // 2, device=dev, dtype=dtype)[None, :].expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
        txt_ids = torch.zeros(text.shape[1], 3, device=dev, dtype=dtype)
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(dtype)), timestep=(model_time / 1000.0).to(dev, dtype),
            guidance=guidance, pooled_projections=c.pop("pooled_projections"), encoder_hidden_states=text,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)


class _MappedTime(torch.autograd.Function):
    """``dst.t_from_logsnr(src.logsnr(t))`` (the SNR-matched time, METHODS.md §1.3) with its derivative
    ``lambda_src'(t) / lambda_dst'(u)`` (implicit function theorem) for both autograd modes: bisection itself has none,
    and sCM-type losses differentiate the network in another schedule's time (``jvp``)."""

    @staticmethod
    def forward(t, src, dst):
        return dst.t_from_logsnr(src.logsnr(t))

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, ctx.src, ctx.dst = inputs
        ctx.save_for_backward(t, output)
        ctx.save_for_forward(t, output)

    @staticmethod
    def _slope(ctx, t, u):
        def dlogsnr(schedule, v):  # forward mode, which also works inside a torch.func transform
            return torch.func.jvp(schedule.logsnr, (v,), (torch.ones_like(v),))[1]

        return dlogsnr(ctx.src, t.detach()) / dlogsnr(ctx.dst, u.detach())

    @staticmethod
    def jvp(ctx, dt, _src, _dst):
        t, u = ctx.saved_tensors
        return dt * _MappedTime._slope(ctx, t, u)

    @staticmethod
    def backward(ctx, grad):
        t, u = ctx.saved_tensors
        return grad * _MappedTime._slope(ctx, t, u), None, None


class Reparameterized(Denoiser):
    """``inner`` seen in ``schedule``'s time (k-diffusion's wrappers, METHODS.md §1.3): a sample ``x`` at time ``t`` of
    ``schedule`` is the inner backbone's sample ``(a_in / a) x`` at the SNR-matched inner time, and the clean estimate
    and noise are the same in both. sCM / rCM train a VP or flow backbone in TrigFlow time this way while the backbone
    keeps its native output, so the student exports as the stock model it is.

    Args:
        inner: any denoiser (its schedule is the backbone's own).
        schedule: the schedule to present it in (e.g. ``TrigFlow(sigma_data=0.5)``).
        prediction: the output kind the view stands for (``trigflow`` for sCM's ``F``); default the inner one's.
    """

    def __init__(self, inner: Denoiser, schedule: NoiseSchedule, prediction: str | None = None):
        super().__init__(schedule, prediction or inner.prediction)
        self.inner = inner

    @property
    def backbone(self) -> nn.Module | None:
        return self.inner.backbone

    def null_cond(self, cond: Cond) -> Cond:
        return self.inner.null_cond(cond)

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.fresh_noise(like, generator)

    @property
    def t_max(self) -> float:
        """The latest time of this schedule whose SNR the inner one reaches (its noisiest is its time 1): SD's betas
        end at logSNR -10.6, which TrigFlow (sigma_data 0.5) passes at t = 0.978."""
        floor = self.inner.schedule.logsnr(torch.tensor(1.0, dtype=torch.float64))
        return float(self.schedule.t_from_logsnr(floor))

    def inner_time(self, t: torch.Tensor) -> torch.Tensor:
        """The inner schedule's time with the SNR of ``t`` on this one."""
        if float(t.detach().max()) > self.t_max + 1e-9:
            raise ValueError(f"Reparameterized: time {float(t.max()):.4g} is noisier than the inner schedule reaches "
                             f"(its SNR ends at time {self.t_max:.4g} here); draw times up to t_max")
        return _MappedTime.apply(t, self.schedule, self.inner.schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        t_in = self.inner_time(t)
        scale = self.inner.schedule.alpha(t_in) / self.schedule.alpha(t)
        x_in = (x_t.double() * scale.view(-1, *([1] * (x_t.ndim - 1)))).to(x_t.dtype)
        if cond is not None and "r" in cond:  # a flow-map end time: the inner schedule's time too (0 stays 0)
            r = torch.as_tensor(cond["r"], dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
            cond = {**cond, "r": torch.where(r > 0, self.inner_time(r.clamp(min=1e-12)), torch.zeros_like(r))}
        pred = self.inner(x_in, t_in, cond)
        return Prediction(pred.x0_64, pred.eps_64, Coefficients.at(self.schedule, t, x_t), x_t.dtype)


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


# ----------------------------------------------------------------------------------------------------------------
# Time derivatives of a network (sCM, rCM, MeanFlow).


class JVPError(ValueError):
    """Forward-mode AD is not available for a backbone (``jvp(..., mode="exact")``); the message says why."""


#: backbone classes forward-mode AD failed on (``jvp(mode="auto")`` then goes straight to the difference)
_NO_FORWARD_AD: set[str] = set()


@contextlib.contextmanager
def forward_ad_friendly(denoiser: Denoiser):
    """What forward-mode AD needs of diffusers backbones, for the duration of one call: attention on torch's math
    SDPA kernel (the fused CPU/CUDA kernels have no forward-AD formula) and, for models on diffusers' attention
    dispatcher (FLUX, SD3), its ``_native_math`` backend; GroupNorm on contiguous inputs (its forward-AD formula
    views the input, which fails on the transposed maps of UNet2DModel's attention blocks); no autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backbone = denoiser.backbone
    group_norm = torch.nn.functional.group_norm
    restore = _attention_backend(backbone, "_native_math") if backbone is not None else None
    torch.nn.functional.group_norm = lambda x, *args, **kwargs: group_norm(x.contiguous(), *args, **kwargs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.autocast(device, enabled=False):
            yield
    finally:
        torch.nn.functional.group_norm = group_norm
        if restore is not None:
            restore()


def _attention_backend(backbone: nn.Module, name: str):
    """Set diffusers' attention backend of ``backbone``'s dispatcher-based attention processors to ``name``; returns
    a function that puts every processor's previous backend back (``None`` when no processor uses the dispatcher)."""
    processors = [m.processor for m in backbone.modules()
                  if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not processors:
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    before = [p._attention_backend for p in processors]
    active = _AttentionBackendRegistry._active_backend
    for p in processors:
        p._attention_backend = AttentionBackendName(name)

    def restore():
        for p, value in zip(processors, before):
            p._attention_backend = value
        _AttentionBackendRegistry._active_backend = active

    return restore


def jvp(denoiser: Denoiser, primals: tuple[torch.Tensor, torch.Tensor], tangents: tuple[torch.Tensor, torch.Tensor],
        *, cond: Cond = None, output: str = "x0", mode: str = "auto",
        step: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """The value and the directional derivative of ``denoiser(x, t, cond).get(output)`` along ``(dx, dt)``: the
    time derivative sCM / rCM (Lu & Song 2024, Eq. 8) and MeanFlow (Geng et al. 2025, Eq. 8) need, float64.

    Args:
        primals: ``(x, t)``, the sample and its per-sample times ``[B]``.
        tangents: ``(dx, dt)``, e.g. the PF-ODE velocity and ones.
        output: the prediction kind to differentiate (``parameterization.KINDS``, ``trigflow`` included).
        mode: ``exact`` (forward-mode AD, ``torch.func.jvp``, on an attention backend that supports it and outside
            autocast; ``JVPError`` where the backbone cannot), ``fd`` (a central finite difference: two extra
            evaluations at ``primals +- step * tangents`` with the same dropout masks), or ``auto`` (exact, else the
            finite difference, saying so once per backbone class).
        step: the finite difference's step along the tangent. Backbones embed their timestep with frequencies up to
            about one per timestep (a thousandth of the time axis), so the default 1e-4 resolves the time direction;
            on float32 backbones it leaves errors of about 1e-3 relative (measured against the exact derivative on
            the tiny UNet2D, SD3 and FLUX models).
    """
    x, t = primals
    dx, dt = tangents
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
    dt = torch.as_tensor(dt, dtype=torch.float64, device=x.device).expand(x.shape[0])

    def f(x_, t_):
        return denoiser(x_, t_, cond).get(output, exact=True)

    if mode not in ("exact", "fd", "auto"):
        raise ValueError(f"jvp mode must be exact, fd or auto, got {mode!r}")
    name = type(denoiser.backbone or denoiser).__name__
    if mode == "exact" or (mode == "auto" and name not in _NO_FORWARD_AD):
        try:
            with forward_ad_friendly(denoiser):
                return torch.func.jvp(f, (x, t), (dx.to(x.dtype), dt))
        except torch.cuda.OutOfMemoryError:
            raise
        except (NotImplementedError, RuntimeError) as err:
            reason = str(err).splitlines()[0][:200]
            if mode == "exact":
                raise JVPError(f"forward-mode AD fails on {name} ({reason})") from None
            _NO_FORWARD_AD.add(name)  # not tried again: a failed forward costs as much as a good one
            print(f"note: forward-mode AD is not available for {name} ({reason}); time derivatives use a "
                  "float64 central difference instead", file=sys.stderr)
    return _central_difference(f, x, t, dx, dt, step)


def _central_difference(f, x, t, dx, dt, h: float):
    """``(f(p + h v) - f(p - h v)) / 2h`` with the perturbed inputs formed in float64 and every evaluation under the
    same RNG state, so dropout draws the same masks in each (what the exact derivative assumes)."""
    cuda = torch.cuda.is_available()
    state = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)

    def at(sign):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state_all(state[1])
        xs = (x.double() + sign * h * dx.double()).to(x.dtype)
        return f(xs, t + sign * h * dt)

    plus, minus, value = at(1.0), at(-1.0), at(0.0)
    return value, (plus - minus) / (2 * h)
