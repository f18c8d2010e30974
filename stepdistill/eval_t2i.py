"""Text-to-image students evaluated as the distillation papers report them (issue 23).

The student's exported call and the teacher's stock call run on the same prompts and the same initial noise, and
each image set is scored by

* FID and KID (Heusel et al. 2017; Binkowski et al. 2018) on Inception-v3 pool features: torchmetrics'
  ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, fed features computed once per image set, with the
  feature network torchmetrics uses (torch-fidelity's ``inception-v3-compat``, its weights from torch-fidelity's
  cache or a local file). Against a folder of reference images when one is given, and against the teacher's images;
* CLIP score (Hessel et al. 2021, Eq. 1 with w = 100): ``100 * max(cos(E_image, E_prompt), 0)`` per image, averaged,
  with transformers' ``CLIPModel`` (written here because torchmetrics' ``CLIPScore`` reads transformers 4's
  ``get_image_features`` and fails on transformers 5);
* wall time per image of each call, end to end (prompt encoding, denoising, VAE decoding), and the network
  evaluations per image it really ran (counted on the backbone: a CFG pair counts 2).

Images stream through the scorers a batch at a time; only features, scores and the rows of ``compare.png`` stay in
memory, so a 30k-caption COCO run holds 30k feature vectors, not 30k images.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalError(ValueError):
    """Bad evaluation input (prompts, reference images, a run without its export): one line for the user."""


class Unavailable(RuntimeError):
    """A scorer whose network cannot be loaded here; the message says which metrics it leaves out and why."""


# ---------------------------------------------------------------------------------------------------------------
# Scorers.


class InceptionFeatures(nn.Module):
    """Images in [0, 1] -> the 2048-d pool features torchmetrics' FID/KID use (torch-fidelity's network, which
    takes uint8 pixels and resizes to 299 itself)."""

    num_features = 2048
    description = "inception-v3-compat (torch-fidelity), 2048-d pool"

    def __init__(self, weights: str | None = None):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as err:
            raise Unavailable(f"FID/KID not computed: torchmetrics is not installed ({err})") from err
        if not _TORCH_FIDELITY_AVAILABLE:
            raise Unavailable("FID/KID not computed: their Inception network needs torch-fidelity "
                              "(pip install torch-fidelity)")
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights)
        except Exception as err:  # noqa: BLE001 - offline without the cached weights, a bad file: say which
            raise Unavailable(f"FID/KID not computed: the Inception weights could not be loaded "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                              "pass --inception-weights FILE (torch-fidelity's pt_inception-2015-12-05 file)") from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # to uint8 as torchmetrics' FID(normalize=True) does (truncating), so the figures are its figures
        return self.net((images.clamp(0, 1) * 255).byte()).reshape(images.shape[0], -1)


class DinoV2Features(nn.Module):
    """Images in [0, 1] -> DINOv2's final CLS embedding at 224 px: the features of FD_DINOv2 (Stein et al. 2023,
    "Exposing flaws of generative model evaluation metrics"; EDM2 reports it with ViT-L/14), an alternative to
    Inception's for FID/KID (``--features dinov2:NAME_OR_DIR``)."""

    def __init__(self, weights: str):
        super().__init__()
        from .nets.dino import load_dino

        try:
            self.net = load_dino(weights, layers=(-1,), resolution=224, what="--features dinov2")
        except ValueError as err:
            raise Unavailable(f"FID/KID not computed: {err}") from err
        self.num_features = self.net.hidden_size
        self.description = f"dinov2 ({weights}), CLS token at 224 px"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)[1]


def feature_network(name: str, *, inception_weights: str | None = None) -> nn.Module:
    """``inception`` (torchmetrics' default) or ``dinov2[:NAME_OR_DIR]`` (default ``facebook/dinov2-large``)."""
    kind, _, weights = name.partition(":")
    if kind == "inception" and not weights:
        return InceptionFeatures(inception_weights)
    if kind == "dinov2":
        return DinoV2Features(weights or "facebook/dinov2-large")
    raise EvalError(f"--features: {name!r}; use inception or dinov2[:HUB_ID_OR_FOLDER]")


class _Given(nn.Identity):
    """The feature "network" handed to torchmetrics' metrics: the features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def fid_kid(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
            seed: int = 0) -> dict:
    """FID and KID (mean, std over ``subsets`` random subsets) between two feature sets ``[N, D]``."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "KID keeps every feature in memory": these features are held anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: a seeded, isolated draw
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": size}


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)`` of matching rows (Hessel et al. 2021, Eq. 1)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cos.clamp(min=0)


class ClipScorer:
    """CLIP score of images against their prompts with a transformers ``CLIPModel`` (a hub id or a local folder)."""

    def __init__(self, name_or_path: str, *, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except Exception as err:  # noqa: BLE001 - offline and not cached, not a CLIP folder: say so and go on
            raise Unavailable(f"CLIP score not computed: {name_or_path} could not be loaded "
                              f"({type(err).__name__}); pass --clip-model DIR (a saved CLIPModel + CLIPProcessor)"
                              ) from err
        self.name, self.device = name_or_path, device

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 | 5

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        img = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"].to(self.device)
        txt = self.processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        image_embeds = self._pooled(self.model.get_image_features(pixel_values=img))
        text_embeds = self._pooled(self.model.get_text_features(input_ids=txt["input_ids"],
                                                                attention_mask=txt["attention_mask"]))
        return clip_scores(image_embeds, text_embeds).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Inputs.


def read_prompts(path: str) -> list[str]:
    """The prompts, one per non-empty line."""
    from .conditioning import read_prompts as read

    try:
        return read(path, what="--prompts")
    except ValueError as err:
        raise EvalError(str(err)) from err


def reference_files(folder: str) -> list[Path]:
    """The image files of a reference folder, checked before anything runs: at least two, all of one size."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"--reference: no such folder: {folder}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise EvalError(f"--reference: {folder} holds {len(files)} images ({'/'.join(IMAGE_SUFFIXES)}); FID and KID "
                        "need at least two")
    sizes = {}
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
        except OSError as err:
            raise EvalError(f"--reference: {p} is not a readable image ({err})") from err
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise EvalError(f"--reference: images of mixed sizes ({p1.name} is {s1[0]}x{s1[1]}, {p2.name} is "
                        f"{s2[0]}x{s2[1]}); resize them to one size first, as FID references are")
    return files


def reference_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    import numpy as np
    from PIL import Image

    for start in range(0, len(files), batch_size):
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files[start:start + batch_size]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------------------------
# Calls.


@dataclass
class Call:
    """One way of making images: a pipeline and the keyword arguments of its call."""

    name: str
    pipe: object
    kwargs: dict
    label: str


@dataclass
class ImageSet:
    """What the scorers kept of one call's (or the reference folder's) images."""

    features: list = field(default_factory=list)
    clip: list = field(default_factory=list)
    shown: list = field(default_factory=list)
    seconds: float = 0.0
    rows: int = 0  # backbone rows evaluated: one per image per network evaluation
    images: int = 0

    def summary(self) -> dict:
        out = {}
        if self.images and self.seconds:
            out.update(seconds_per_image=self.seconds / self.images, nfe_per_image=self.rows / self.images)
        if self.clip:
            out["clip_score"] = float(torch.cat(self.clip).mean())
        return out


def call_defaults(pipe) -> dict:
    """The teacher's default call: its pipeline's own ``num_inference_steps`` and ``guidance_scale`` defaults."""
    params = inspect.signature(type(pipe).__call__).parameters
    return {k: params[k].default for k in ("num_inference_steps", "guidance_scale") if k in params}


def _count_rows(backbone: nn.Module, image_set: ImageSet):
    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        image_set.rows += int(x.shape[0])

    return backbone.register_forward_pre_hook(hook, with_kwargs=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run_call(call: Call, prompts: list[str], *, num: int, batch_size: int, seed: int, device: str,
             features: Callable | None, clip: ClipScorer | None, show: int, backbone: str) -> ImageSet:
    """Make ``num`` images (prompt ``i % len(prompts)`` for image i; batch b's noise from seed ``seed + b``, so
    every call sees the same initial noise) and score them as they come."""
    from tqdm.auto import tqdm

    out = ImageSet()
    pipe = call.pipe
    pipe.set_progress_bar_config(disable=True)
    first = [prompts[i % len(prompts)] for i in range(min(num, batch_size))]  # warm-up at the timed shapes
    pipe(first, generator=torch.Generator(device).manual_seed(seed), output_type="pt", **call.kwargs)
    handle = _count_rows(getattr(pipe, backbone), out)
    try:
        for b, start in enumerate(tqdm(range(0, num, batch_size), desc=call.label, unit="batch")):
            batch = [prompts[i % len(prompts)] for i in range(start, min(num, start + batch_size))]
            torch.manual_seed(seed + b)  # SD3/FLUX pipelines re-noise with the global RNG
            generator = torch.Generator(device).manual_seed(seed + b)
            _sync(device)
            tic = time.perf_counter()
            images = pipe(batch, generator=generator, output_type="pt", **call.kwargs).images
            _sync(device)
            out.seconds += time.perf_counter() - tic
            out.images += len(batch)
            _score(out, images.float(), batch, features=features, clip=clip, show=show)
    finally:
        handle.remove()
    return out


def _score(out: ImageSet, images: torch.Tensor, prompts: list[str] | None, *, features, clip, show: int) -> None:
    if features is not None:
        out.features.append(features(images).double().cpu())
    if clip is not None and prompts is not None:
        out.clip.append(clip(images, prompts))
    if sum(len(s) for s in out.shown) < show:
        out.shown.append(images[:show - sum(len(s) for s in out.shown)].cpu())


# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_text_to_image(student_pipe, teacher_pipe, student_call: dict, *, backbone: str, prompts: list[str],
                           num: int, batch_size: int = 8, seed: int = 0, device: str = "cpu",
                           features: Callable | None = None, clip: ClipScorer | None = None,
                           reference: list[Path] | None = None, show: int = 8) -> tuple[dict, list[ImageSet]]:
    """Metrics of the student's call beside the teacher's default call and the teacher at the student's number of
    steps (same prompts, same noise); returns ``(metrics, image sets)`` (the sets' ``shown`` rows make
    ``compare.png``)."""
    size = {k: student_call[k] for k in ("height", "width", "max_sequence_length") if k in student_call}
    teacher = {**call_defaults(teacher_pipe), **size}
    steps = student_call["num_inference_steps"]
    calls = [Call("teacher_default", teacher_pipe, teacher, f"teacher ({teacher['num_inference_steps']} steps)"),
             Call("teacher_same_steps", teacher_pipe, {**teacher, "num_inference_steps": steps},
                  f"teacher ({steps} steps)"),
             Call("student", student_pipe, dict(student_call), f"student ({steps} steps)")]
    sets = {c.name: run_call(c, prompts, num=num, batch_size=batch_size, seed=seed, device=device,
                             features=features, clip=clip, show=show, backbone=backbone) for c in calls}
    metrics = {c.name: {"call": c.kwargs, **sets[c.name].summary()} for c in calls}
    if features is not None:
        ref = None
        if reference:
            ref = ImageSet()
            for images in reference_batches(reference, batch_size):
                _score(ref, images.to(device), None, features=features, clip=None, show=0)
        gen = {name: torch.cat(s.features) for name, s in sets.items()}
        for name in ("teacher_same_steps", "student"):  # against the teacher's own images at its default call
            metrics[name].update({f"{k}_vs_teacher": v for k, v in fid_kid(gen["teacher_default"], gen[name],
                                                                          seed=seed).items()})
        if ref is not None:
            real = torch.cat(ref.features)
            for name in gen:
                metrics[name].update({f"{k}_vs_reference": v for k, v in fid_kid(real, gen[name], seed=seed).items()})
    s, t = metrics["student"], metrics["teacher_default"]
    metrics["speedup_vs_teacher_default"] = t["seconds_per_image"] / s["seconds_per_image"]
    return metrics, [sets[c.name] for c in calls]


def write_results(out_dir: Path, metrics: dict, image_sets: list[ImageSet], prompts: list[str], labels: list[str]):
    """``metrics.json`` and ``compare.png`` (prompts x calls), each written atomically."""
    from .atomic import atomic_file
    from .visualize import compare_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    columns = [torch.cat(x.shown) for x in image_sets]  # the same prompts and noise in each: row i is image i
    with atomic_file(out_dir / "compare.png") as tmp:
        compare_grid(columns, labels, [prompts[i % len(prompts)] for i in range(len(columns[0]))]).save(
            tmp, format="PNG")
    return out_dir / "metrics.json", out_dir / "compare.png"


# ---------------------------------------------------------------------------------------------------------------
# A run or an exported folder, end to end (``stepdistill eval``).


def exported_folder(path: Path) -> Path | None:
    """The exported text-to-image pipeline to evaluate for ``path`` (the folder itself, or a run's ``pipeline/``);
    ``None`` when ``path`` is not a text-to-image export or a run with one."""
    for folder in (path, path / "pipeline"):
        meta = folder / "stepdistill.json"
        if meta.is_file() and json.loads(meta.read_text()).get("family"):
            if not (folder / "model_index.json").is_file():
                raise EvalError(f"{folder}: a LoRA folder, not a pipeline; evaluate the run directory, or a folder "
                                "`stepdistill export RUN` wrote")
            return folder
    return None


def load_pipelines(folder: Path, *, device: str):
    """The student's exported pipeline as its card loads it and the teacher's stock pipeline (reusing the loaded
    teacher's backbone and VAE), on ``device``: float32 on CPU, the export's dtype on CUDA. Safety checkers are off,
    as in the papers' evaluations (a blacked-out image would count as a sample)."""
    from diffusers import DiffusionPipeline

    from .config import build_recipe
    from .teachers import load_teacher

    meta = json.loads((folder / "stepdistill.json").read_text())
    kwargs = dict(meta.get("load_kwargs") or {})
    dtype = getattr(torch, meta.get("dtype", "float32")) if device.startswith("cuda") else torch.float32
    kwargs["dtype"] = dtype
    student = DiffusionPipeline.from_pretrained(folder, **kwargs)
    teacher = load_teacher(build_recipe({"teacher": meta["teacher"]}).teacher)
    family = teacher.family
    pipe = teacher.load_pipeline(**{family.backbone: teacher.backbone, "vae": teacher.vae})
    for p in (student, pipe):
        if getattr(p, "safety_checker", None) is not None:
            p.safety_checker = None
        p.to(device)
        if p.dtype != dtype:  # only when it changes: diffusers warns on every cast
            p.to(dtype)
    return student, pipe, meta, family.backbone


def evaluate_export(folder: Path, out_dir: Path, *, prompts_file: str, reference: str | None,
                    num: int | None, batch_size: int, seed: int, device: str, clip_model: str | None,
                    features: str | nn.Module = "inception", inception_weights: str | None = None, show: int = 8,
                    log=print) -> tuple[dict, Path, Path]:
    """Check the inputs, load both pipelines and the scorers, evaluate, write ``out_dir/{metrics.json,
    compare.png}``. ``features``: the FID/KID feature network, by name (``feature_network``) or a module. Scorers
    that cannot load (and CLIP with ``clip_model`` None) are reported through ``log`` and left out."""
    prompts = read_prompts(prompts_file)
    num = num or len(prompts)
    if num < 2:
        raise EvalError(f"--num-samples: FID and KID need at least 2 images, got {num}")
    if batch_size < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {batch_size}")
    files = reference_files(reference) if reference else None
    left_out, clip = [], None
    if isinstance(features, str):
        try:
            features = feature_network(features, inception_weights=inception_weights).to(device).eval()
        except Unavailable as why:
            left_out.append(str(why))
            features = None
    student, teacher, meta, backbone = load_pipelines(folder, device=device)
    if clip_model is not None:
        try:
            clip = ClipScorer(clip_model, device=device)
        except Unavailable as why:
            left_out.append(str(why))
    if left_out:  # one line each for what is missing, and one for what still runs
        ran = ["FID/KID"] * (features is not None) + ["CLIP score"] * (clip is not None)
        for line in left_out:
            log(line)
        log(f"still computed: {', '.join([*ran, 'wall time and NFE per image', 'compare.png'])}")
    metrics, sets = evaluate_text_to_image(student, teacher, meta["call"], backbone=backbone, prompts=prompts,
                                           num=num, batch_size=batch_size, seed=seed, device=device,
                                           features=features, clip=clip, reference=files, show=show)
    metrics = {"pipeline": str(folder), "prompts": prompts_file, "num_images": num, "seed": seed, "device": device,
               "feature_network": getattr(features, "description", type(features).__name__)
               if features is not None else None,
               "clip_model": clip.name if clip else None, "not_computed": left_out,
               "reference": {"folder": reference, "num_images": len(files)} if files else None,
               "safety_checker": "off", **metrics}
    labels = [f"teacher, {metrics['teacher_default']['call']['num_inference_steps']} steps",
              f"teacher, {meta['call']['num_inference_steps']} steps", f"student, {meta['num_inference_steps']} steps"]
    paths = write_results(out_dir, metrics, sets, prompts, labels)
    return metrics, *paths
