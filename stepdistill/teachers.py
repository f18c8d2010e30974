"""Teacher sources (DESIGN.md §5): exactly one of ``pretrained``, ``tiny``, ``gmm`` or ``embedded``.

Each loader returns a ``Teacher``: the denoiser, its schedule, the diffusers scheduler config it was trained with
(export builds the student's scheduler from it) and the shape of one sample. Teachers of the diffusers families
(SD1.5, SDXL, SD3, FLUX; ``families.py``) also carry their VAE, the prompt-encoding settings and a way to load the
stock pipeline again (prompt encoding and export need its text encoders, which training does not keep in memory).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import DEFAULT_SCHEDULER, digits_unet, tiny_unet2d, vector_unet  # noqa: F401 (re-exported)
from .denoisers import Denoiser, GMMDenoiser, UNet2DDenoiser
from .families import BY_PIPELINE, FAMILIES, Family, family_denoiser, vae_scale
from .mixture import DataMap, GaussianMixture, fit_data_map
from .schedules import VPDiscrete
from .teacher_training import TeacherFit, fit_vector_teacher


ASSETS = Path(__file__).parent / "assets"



@dataclass
class Teacher:
    """A loaded teacher."""

    denoiser: Denoiser
    scheduler_config: dict
    sample_shape: tuple[int, ...]
    source: str
    mixture: GaussianMixture | None = None
    meta: dict = field(default_factory=dict)
    #: the diffusers family (``families.FAMILIES``) of text-conditioned latent teachers; ``None`` otherwise
    family: Family | None = None
    #: ``load_pipeline(**components)``: the teacher's stock pipeline on CPU, with the given components replaced
    load_pipeline: Callable[..., object] | None = None
    vae: nn.Module | None = None
    #: what prompt encoding depends on besides the prompts (``conditioning.ENCODERS``): image size, T5 length
    encode_settings: dict = field(default_factory=dict)
    #: what the prompt and latent caches key on: ``source`` plus, for pretrained teachers, the variant and what was
    #: loaded (a hub snapshot's commit; a local folder's path and file sizes/mtimes), so a replaced text encoder or
    #: VAE is not served stale
    identity: str | None = None
    #: ``teacher.gmm``: the map from data coordinates to the model's (``mixture`` is in model coordinates, the one the
    #: teacher, the data and the students see), and the mixture as the recipe gave it
    data_map: DataMap | None = None
    data_mixture: GaussianMixture | None = None

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in the data's own coordinates (``teacher.gmm.normalize``): what ``sample`` and ``eval`` report."""
        return x if self.data_map is None or self.data_map.identity else self.data_map.to_data(x)

    @property
    def cache_id(self) -> str:
        return self.identity or self.source

    @property
    def backbone(self) -> nn.Module | None:
        return self.denoiser.backbone


class TeacherError(ValueError):
    """A teacher that cannot be loaded; the message names the key or file."""


# ----------------------------------------------------------------------------------------------------------------
# Loaders.


def _unet_teacher(unet, scheduler_config: dict, source: str, sample_shape=None, **kw) -> Teacher:
    schedule = VPDiscrete.from_scheduler_config(scheduler_config)
    unet.requires_grad_(False).eval()
    den = UNet2DDenoiser.from_scheduler_config(unet, schedule, scheduler_config)
    if sample_shape is None:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (unet.config.in_channels, *size)
    return Teacher(den, dict(scheduler_config), tuple(sample_shape), source, **kw)


def _family_teacher(family: Family, backbone: nn.Module, vae: nn.Module, scheduler_config: dict, source: str,
                    load_pipeline: Callable[..., object], *, resolution: int | None = None,
                    max_sequence_length: int | None = None, guidance: float | None = None,
                    identity: str | None = None) -> Teacher:
    """A text-conditioned latent teacher of ``family``: the frozen backbone behind its adapter, and the VAE."""
    backbone.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        raise TeacherError("teacher: the VAE normalises latents with latents_mean / latents_std (a Playground-style "
                           "SDXL); stepdistill reads latents with scaling_factor and shift_factor only")
    scale = vae_scale(vae.config)
    resolution = resolution or family.default_resolution(backbone.config, scale)
    # latents must tile into the backbone's patches (FLUX packs 2x2; SD3 patchifies), or the cached data latents
    # and the sample shape would disagree
    unit = scale * (2 if family.packed_latents else getattr(backbone.config, "patch_size", 1))
    if resolution % unit:
        raise TeacherError(f"teacher.resolution: {resolution} px is not a multiple of {unit} (the VAE's factor "
                           f"{scale} times the backbone's patch)")
    shape = family.latent_shape(backbone.config, scale, resolution)
    settings = {"guidance": guidance} if (family.guidance_input and guidance is not None) else {}
    try:
        den = family_denoiser(family, backbone, dict(scheduler_config), shape[1:], **settings)
    except ValueError as err:
        raise TeacherError(f"teacher: {err}") from None
    embedded = family.guidance_input and den.sampling_guidance is not None  # FLUX.1-dev: guidance is an input
    # FLUX.1-schnell (no guidance input) was trained with 256 T5 tokens (BFL's reference code; the diffusers docs)
    default_length = 256 if family.guidance_input and not embedded else family.max_sequence_length
    encode = {"image_size": [resolution, resolution], "max_sequence_length": max_sequence_length or default_length}
    meta = {"resolution": resolution, **({"guidance": den.guidance} if embedded else {})}
    return Teacher(den, dict(scheduler_config), shape, source, family=family, load_pipeline=load_pipeline, vae=vae,
                   encode_settings=encode, meta=meta, identity=identity)


def _weights_identity(path: str, *, revision: str | None, variant: str | None, index: dict) -> str:
    """``Teacher.identity`` of a pipeline folder or hub id.

    A hub id: the commit its cached snapshot is named by, and the variant (a commit never changes; its files are
    downloaded piecemeal, the text encoders only when prompts are first encoded, so they cannot be listed here). A
    local folder: its resolved path, the variant and each component file's size and mtime.
    """
    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "model_index.json", revision=revision)
        commit = Path(found).parent.name if isinstance(found, str) else revision
        blob = json.dumps([path, commit, variant])
    else:
        stamp = []
        for name in sorted(k for k, v in index.items() if isinstance(v, list)):
            for f in sorted((root / name).rglob("*")) if (root / name).is_dir() else []:
                if f.is_file():
                    st = f.stat()
                    stamp.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
        blob = json.dumps([str(root.resolve()), variant, stamp])
    return f"pretrained:{path}#{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _model_index(path: str, revision: str | None) -> dict | None:
    """``model_index.json`` of a pipeline directory or hub id, or ``None`` when there is none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except (OSError, ValueError):
        return None


def _load_family_pretrained(path: str, index: dict, family: Family, *, variant, revision, resolution,
                            max_sequence_length, guidance, dtype: str = "float32") -> Teacher:
    import diffusers

    if os.path.isdir(path):  # a missing component fails here with its name, not deep inside diffusers
        for name, entry in index.items():
            if isinstance(entry, list) and entry[0] is not None and not (Path(path) / name).is_dir():
                raise TeacherError(f"teacher.pretrained: {path} is missing component {name!r} (model_index.json "
                                   f"lists {entry[1]}, but there is no {name}/ folder)")

    def component(name: str, torch_dtype=None):
        cls = getattr(diffusers, index[name][1])
        try:
            return cls.from_pretrained(path, subfolder=name, variant=variant, revision=revision,
                                       torch_dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise TeacherError(f"teacher.pretrained: cannot load {name} ({index[name][1]}) from {path!r}: "
                               f"{str(err).splitlines()[0]}") from None

    # A frozen bf16 base (LoRA roles) is loaded in bf16: loading FLUX's 12B-parameter transformer in float32 first
    # would take 48 GB of host memory for weights that are rounded to bf16 right after.
    backbone = component(family.backbone, None if dtype == "float32" else getattr(torch, dtype))
    vae = component("vae")
    sched_cls = getattr(diffusers, index["scheduler"][1])
    sched_cfg = dict(sched_cls.load_config(path, subfolder="scheduler", revision=revision))

    def load_pipeline(**components):
        return diffusers.DiffusionPipeline.from_pretrained(path, variant=variant, revision=revision, **components)

    return _family_teacher(family, backbone, vae, sched_cfg, f"pretrained:{path}", load_pipeline,
                           resolution=resolution, max_sequence_length=max_sequence_length, guidance=guidance,
                           identity=_weights_identity(path, revision=revision, variant=variant, index=index))


def load_pretrained(path: str, *, subfolder: str | None = None, variant: str | None = None,
                    revision: str | None = None, family: str | None = None, resolution: int | None = None,
                    max_sequence_length: int | None = None, guidance: float | None = None,
                    dtype: str = "float32") -> Teacher:
    """A local or hub diffusers directory (``dtype``: what a family backbone is loaded in).

    * A pipeline of a supported family (``model_index.json`` names StableDiffusionPipeline,
      StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline): its backbone, VAE and scheduler.
      ``family``, when given, must match.
    * Otherwise a ``UNet2DModel`` and a DDPM-family scheduler: a pipeline directory (``unet/`` + ``scheduler/``)
      or, with ``subfolder``, a model folder inside one.
    """
    from diffusers import UNet2DModel

    local = os.path.isdir(path)
    # a path, not a hub id: it starts like one, or its first part is a local folder ("teachers/sd15x")
    looks_local = path.startswith((".", "/", "~")) or os.path.isdir(path.split("/")[0])
    if not local and looks_local:
        raise TeacherError(f"teacher.pretrained: no such directory: {path}")
    index = None if subfolder else _model_index(path, revision)
    found = BY_PIPELINE.get((index or {}).get("_class_name"))
    if family is not None and family not in FAMILIES and family != "unet2d":
        raise TeacherError(f"teacher.family: unknown {family!r}; allowed: {['unet2d', *FAMILIES]}")
    if family is not None and (found.name if found else "unet2d") != family:
        if index is None and not local:
            raise TeacherError(f"teacher.pretrained: {path!r} is no local directory, and no hub repository of that "
                               "name could be read (offline, or a mistyped path?)")
        what = index.get("_class_name") if index else "no model_index.json (a UNet2DModel folder?)"
        raise TeacherError(f"teacher.family: the recipe says {family!r} but {path} holds {what}")
    name = (index or {}).get("_class_name")
    if found is None and name and (index.get("unet") or [None, None])[1] != "UNet2DModel":
        raise TeacherError(f"teacher.pretrained: {path} is a {name}; supported: {', '.join(BY_PIPELINE)} and "
                           "pipelines of a UNet2DModel (DDPMPipeline)")
    if found is not None:
        return _load_family_pretrained(path, index, found, variant=variant, revision=revision, resolution=resolution,
                                       max_sequence_length=max_sequence_length, guidance=guidance, dtype=dtype)
    unet_sub = subfolder or "unet"
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder=unet_sub, variant=variant, revision=revision)
    except (OSError, ValueError) as err:
        where = "directory" if local else "hub id (offline or missing?)"
        raise TeacherError(f"teacher.pretrained: cannot load a UNet2DModel from {where} {path!r} "
                           f"(subfolder {unet_sub!r}): {str(err).splitlines()[0]}") from None
    try:
        from diffusers import DDPMScheduler

        sched_cfg = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    except (OSError, ValueError):
        raise TeacherError(f"teacher.pretrained: {path!r} has no scheduler/scheduler_config.json; the teacher's "
                           "noise schedule comes from it") from None
    return _unet_teacher(unet, sched_cfg, f"pretrained:{path}")


#: image size of the tiny family teachers (the FLUX one has a 1x VAE, so 16 px are 16x16 latents, 64 tokens)
TINY_RESOLUTION = {"sd15": 32, "sdxl": 32, "sd3": 32, "flux": 16, "flux-dev": 16}


def load_tiny(kind: str, *, seed: int = 0, resolution: int | None = None, max_sequence_length: int | None = None,
              guidance: float | None = None) -> Teacher:
    """``teacher.tiny``: a random tiny model built offline: ``unet2d`` or a diffusers family (``tiny.py``)."""
    from .tiny import TINY_PIPELINES

    if kind == "unet2d":
        torch.manual_seed(seed)
        return _unet_teacher(tiny_unet2d(), dict(DEFAULT_SCHEDULER), "tiny:unet2d")
    if kind not in TINY_PIPELINES:
        raise TeacherError(f"teacher.tiny: unknown kind {kind!r}; available: {['unet2d', *TINY_PIPELINES]}")
    build = TINY_PIPELINES[kind]
    pipe = build()
    family = BY_PIPELINE[type(pipe).__name__]

    def load_pipeline(**components):
        # Through the pipeline's constructor, as from_pretrained does, so what a pipeline rewrites at construction
        # (StableDiffusionPipeline resets a scheduler's steps_offset to 1) happens with tiny teachers too.
        fresh = build()
        params = inspect.signature(type(fresh).__init__).parameters
        settings = {k: v for k, v in fresh.config.items() if k in params and k not in fresh.components}
        return type(fresh)(**{**fresh.components, **components}, **settings)

    backbone = getattr(pipe, family.backbone)
    scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}  # as saved on disk
    return _family_teacher(family, backbone, pipe.vae, scheduler_config, f"tiny:{kind}", load_pipeline,
                           resolution=resolution or TINY_RESOLUTION[kind],
                           max_sequence_length=max_sequence_length or 16, guidance=guidance)


def load_embedded(name: str) -> Teacher:
    """The teachers shipped inside the package (``stepdistill/assets/<name>/``)."""
    from diffusers import UNet2DModel

    folder = ASSETS / f"{name}_teacher"
    if not (folder / "unet" / "config.json").exists():
        available = sorted(p.name.removesuffix("_teacher") for p in ASSETS.glob("*_teacher"))
        raise TeacherError(f"teacher.embedded: no embedded teacher {name!r}; available: {available}")
    unet = UNet2DModel.from_pretrained(folder / "unet")
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return _unet_teacher(unet, sched_cfg, f"embedded:{name}")


def cache_root() -> Path:
    """Where derived artefacts (fitted GMM teachers, ODE pair sets) are cached: ``$STEPDISTILL_CACHE`` or
    ``~/.cache/stepdistill``."""
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))


def gmm_fingerprint(mixture: GaussianMixture, fit: dict) -> str:
    blob = json.dumps({"mixture": mixture.config(), "fit": fit, "scheduler": DEFAULT_SCHEDULER}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_gmm(means, *, std=None, stds=None, weights=None, denoiser: str = "mlp", fit: dict | None = None,
             cache_dir: str | None = None, normalize: str = "auto") -> Teacher:
    """``teacher.gmm``: an analytic Gaussian mixture.

    Args:
        normalize: ``auto`` maps a mixture that reaches outside [-1, 1] (its modes' means -+ 4 stds) into it with
            one affine map (``mixture.fit_data_map``), applied before the teacher is fitted and recorded with the
            export, since ``DDPMPipeline`` clamps its output to [-1, 1]; a mixture inside keeps its coordinates.
            ``off`` keeps the data's coordinates (a run that exports a pipeline then refuses data outside).
        denoiser: ``mlp`` (default) distils from a network fitted to the mixture (``teacher_training.TeacherFit``,
            fitted once and cached by a fingerprint of the mixture and the fit settings), ``exact`` uses the
            closed-form ``E[x0 | x_t]`` as an oracle teacher (the roles that would copy a teacher start fresh).
        fit: overrides of ``TeacherFit``'s settings (``steps``, ``batch_size``, ``lr``, ``width``, ``layers``,
            ``time_dim``, ``times``, ``target``, ...).
    """
    if (std is None) == (stds is None):
        raise TeacherError("teacher.gmm needs exactly one of 'std' (shared) or 'stds' (per mode)")
    if normalize not in ("auto", "off"):
        raise TeacherError(f"teacher.gmm.normalize must be 'auto' or 'off', got {normalize!r}")
    try:
        data = GaussianMixture(means, std if stds is None else stds, weights)
    except (ValueError, RuntimeError) as err:
        raise TeacherError(str(err)) from None
    given = torch.as_tensor(weights, dtype=torch.float64).sum() if weights is not None else None
    if given is not None and abs(float(given) - 1.0) > 1e-6:
        print(f"note: teacher.gmm.weights sum to {float(given):g}; they are divided by that sum", file=sys.stderr)
    data_map = fit_data_map(data) if normalize == "auto" else DataMap(shift=(0.0,) * data.dim, scale=1.0)
    mixture = data_map.mixture(data)
    maps = {"data_map": data_map, "data_mixture": data}
    sched_cfg = dict(DEFAULT_SCHEDULER)
    schedule = VPDiscrete.from_scheduler_config(sched_cfg)
    if denoiser == "exact":
        return Teacher(GMMDenoiser(mixture, schedule), sched_cfg, (mixture.dim,), "gmm:exact", mixture=mixture,
                       **maps)
    if denoiser != "mlp":
        raise TeacherError(f"teacher.gmm.denoiser must be 'mlp' or 'exact', got {denoiser!r}")

    fit_cfg = TeacherFit(**(fit or {}))
    key = gmm_fingerprint(mixture, fit_cfg.__dict__)
    folder = (Path(cache_dir) if cache_dir else cache_root()) / "gmm_teachers" / key
    from diffusers import UNet2DModel

    if (folder / "unet" / "config.json").exists():
        unet = UNet2DModel.from_pretrained(folder / "unet")
    else:
        unet = fit_vector_teacher(mixture, fit_cfg, sched_cfg, folder)
    return _unet_teacher(unet, sched_cfg, f"gmm:mlp:{key}", sample_shape=(mixture.dim,), mixture=mixture, **maps)


def load_teacher(cfg, *, dtype: str = "float32") -> Teacher:
    """Dispatch on the one teacher source a recipe names (``config.TeacherConfig``). ``dtype``: what a pretrained
    family backbone is loaded in (a frozen bf16 base: ``roles.mode: lora`` with ``roles.teacher_dtype: bfloat16``)."""
    source = cfg.source()
    family = {"resolution": cfg.resolution, "max_sequence_length": cfg.max_sequence_length, "guidance": cfg.guidance}
    if source == "pretrained":
        return load_pretrained(cfg.pretrained, subfolder=cfg.subfolder, variant=cfg.variant, revision=cfg.revision,
                               family=cfg.family, dtype=dtype, **family)
    if source == "tiny":
        teacher = load_tiny(cfg.tiny, **family)
        found = teacher.family.name if teacher.family else "unet2d"
        if cfg.family is not None and cfg.family != found:
            raise TeacherError(f"teacher.family: the recipe says {cfg.family!r} but teacher.tiny {cfg.tiny!r} is "
                               f"{found!r}")
        return teacher
    if source == "embedded":
        return load_embedded(cfg.embedded)
    gmm = dict(cfg.gmm)
    allowed = {"means", "std", "stds", "weights", "denoiser", "fit", "cache_dir", "normalize"}
    unknown = set(gmm) - allowed
    if unknown or "means" not in gmm:
        raise TeacherError(f"teacher.gmm: {'unknown key(s) ' + str(sorted(unknown)) if unknown else 'means missing'};"
                           f" allowed: {sorted(allowed)}")
    means = gmm.pop("means")
    try:
        return load_gmm(means, **gmm)
    except (TypeError, ValueError) as err:  # e.g. std: abc, or means of unequal lengths
        raise TeacherError(f"teacher.gmm: cannot build the mixture from these values ({err})") from None
