"""Prompt conditioning per model family, with an on-disk cache (DESIGN.md §1 ``conditioning.py``).

Prompts are encoded by the family's own stock pipeline (``pipe.encode_prompt``), so the embeddings are exactly what
``StableDiffusionPipeline`` & co. feed their backbone; the tests check this against the pipelines' own denoising step.
The result is a table of tensors, one row per prompt, whose keys are the backbone inputs the adapters in
``denoisers.py`` take. The null condition (CFG's unconditional branch) is the encoded empty prompt, or zeros where the
pipeline zeroes it (SDXL's ``force_zeros_for_empty_prompt``).

Encoded tables are cached as safetensors under ``<cache>/prompt_embeds/<key>.safetensors``, keyed by the teacher's id,
the family settings and the prompt list, so a run after the first never loads the text encoders.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_file
from .data import read_text


def read_prompts(path: str, *, what: str = "data.prompts") -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (``what``: the setting that named it, for errors)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no such file: {path}")
    prompts = [line.strip() for line in read_text(p, what).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what}: {path} holds no prompts (one per line expected)")
    return prompts


def _encode_sd15(pipe, prompts: list[str], *, image_size, **_) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return {"encoder_hidden_states": embeds}


def _encode_sdxl(pipe, prompts: list[str], *, image_size, **_) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    # The pipeline's default micro-conditioning: original size = target size = the image size, no crop.
    time_ids = pipe._get_add_time_ids(tuple(image_size), (0, 0), tuple(image_size), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled,
            "time_ids": time_ids.expand(len(prompts), -1).clone()}


def _encode_sd3(pipe, prompts: list[str], *, max_sequence_length: int, **_) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _encode_flux(pipe, prompts: list[str], *, max_sequence_length: int, **_) -> dict[str, torch.Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu",
                                           max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


ENCODERS = {"sd15": _encode_sd15, "sdxl": _encode_sdxl, "sd3": _encode_sd3, "flux": _encode_flux}


@torch.no_grad()
def encode_prompts(pipe, family: str, prompts: list[str], *, batch_size: int = 64,
                   **settings) -> dict[str, torch.Tensor]:
    """Encode ``prompts`` with the stock pipeline ``pipe`` into a table ``{key: [N, ...]}`` (float32, CPU)."""
    encode = ENCODERS[family]
    chunks = [encode(pipe, prompts[i:i + batch_size], **settings) for i in range(0, len(prompts), batch_size)]
    return {k: torch.cat([c[k] for c in chunks]).float().cpu().contiguous() for k in chunks[0]}


@torch.no_grad()
def null_condition(pipe, family: str, **settings) -> dict[str, torch.Tensor]:
    """CFG's unconditional input: the keys the empty prompt sets, ``[1, ...]``. Size ids and guidance stay the
    conditional sample's own (``TextConditioned.null_cond``)."""
    null = encode_prompts(pipe, family, [""], **settings)
    null.pop("time_ids", None)
    if pipe.config.get("force_zeros_for_empty_prompt", False):  # SDXL pipelines zero the empty prompt
        null = {k: torch.zeros_like(v) for k, v in null.items()}
    return null


def cache_key(teacher_id: str, family: str, prompts: list[str], settings: dict) -> str:
    blob = json.dumps({"teacher": teacher_id, "family": family, "prompts": prompts,
                       "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_encode(load_pipeline, family: str, prompts: list[str], *, teacher_id: str, cache_dir: Path,
                   settings: dict, is_main_process: bool = True,
                   wait_for_everyone=lambda: None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The prompt table and the null condition, from the cache or encoded now (then cached atomically).

    ``load_pipeline()`` returns the stock pipeline with its text encoders; it is called only on a cache miss, and the
    pipeline is dropped once the prompts are encoded, so the text encoders do not stay in memory during training.
    The main process encodes and writes; the others wait and read the file.
    """
    key = cache_key(teacher_id, family, prompts, settings)
    path = Path(cache_dir) / "prompt_embeds" / f"{key}.safetensors"
    if not path.exists() and is_main_process:
        pipe = load_pipeline()
        table = encode_prompts(pipe, family, prompts, **settings)
        null = null_condition(pipe, family, **settings)
        del pipe
        with atomic_file(path) as tmp:
            save_file({**{f"prompt.{k}": v for k, v in table.items()}, **{f"null.{k}": v for k, v in null.items()}},
                      str(tmp), metadata={"num_prompts": str(len(prompts)), "family": family})
    wait_for_everyone()
    blob = load_file(str(path))
    table = {k.removeprefix("prompt."): v for k, v in blob.items() if k.startswith("prompt.")}
    null = {k.removeprefix("null."): v for k, v in blob.items() if k.startswith("null.")}
    n = next(iter(table.values())).shape[0]
    if n != len(prompts):
        raise ValueError(f"prompt cache {path} holds {n} prompts, expected {len(prompts)}; delete it")
    return table, null
