"""Export a student as a stock diffusers pipeline whose scheduler config encodes the student grid (DESIGN.md §6).

Students of the diffusers families (SD1.5, SDXL, SD3, FLUX) are saved with their teacher's stock pipeline class
(``_family_pipeline``); SD3/FLUX grids go in ``FlowMatchEulerDiscreteScheduler`` plus the ``sigmas=`` call argument.
UNet2DModel students are saved as ``DDPMPipeline(unet, scheduler)`` on the teacher's betas, so
``DiffusionPipeline.from_pretrained(dir)(num_inference_steps=N)`` runs exactly the training grid:

* deterministic grids (progressive distillation, one-step students): ``DDIMScheduler`` with
  ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True`` (ECOSYSTEM.md §0.2: the default spacings put a
  1-step grid at t=0); ``DDPMPipeline`` calls ``scheduler.step(out, t, x, generator=...)`` with DDIM's ``eta=0``.
  A one-step student conditioned on another time (DMD2's t = 399) is called as DMD2 ships it in SD pipelines,
  ``LCMScheduler`` with ``timesteps=[t]`` in ``call``; ``DDPMPipeline`` has no ``timesteps`` argument, so there DDIM's
  ``"leading"`` spacing puts the step at ``steps_offset`` (which ``StableDiffusionPipeline`` would reset to 1).
  ``DDIMScheduler`` steps ``t`` to ``t - N // steps``, so it replays evenly spaced grids only; SD pipelines take an
  uneven one (3 or 16 steps on 1000 timesteps) as ``timesteps=`` with ``EulerDiscreteScheduler``, whose Euler step
  in sigma is the DDIM step;
* re-noising grids (DMD2 multi-step): ``LCMScheduler(original_inference_steps=K)``, whose step denoises and then
  re-noises with fresh noise from the pipeline's generator; a grid its own spacing misses goes as ``timesteps=``.

* flow-map jumps (MeanFlow: the network takes the jump's end as a second time): no stock pipeline passes it, so the
  folder holds the single-file pipeline ``pipelines/<name>.py`` of the grid's transition (``Transition.pipeline``),
  loaded with ``trust_remote_code=True``, with ``DDIMScheduler`` (trailing spacing) giving its timesteps.

The grid is checked against what the scheduler actually produces before anything is written.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch

from .atomic import atomic_dir
from .denoisers import Denoiser
from .mixture import data_range
from .parameterization import OURS_TO_DIFFUSERS
from .sampling import StudentGrid
from .schedules import VPDiscrete
from .transitions import DDIM
from .transitions import transition as transition_of


#: the single-file pipelines (``pipelines/`` in the source tree, ``stepdistill/pipelines`` in a wheel)
PIPELINES = next((p for p in (Path(__file__).resolve().parent / "pipelines",
                              Path(__file__).resolve().parent.parent / "pipelines") if p.is_dir()), None)


#: the most experts ``pipelines/experts.py`` holds (the stock component, then ``<component>_1`` .. ``_3``)
EXPERTS_MAX = 4


class ExportError(ValueError):
    """The student cannot be expressed by a stock pipeline; the message says why."""


def custom_pipeline_class(name: str, class_name: str | None = None):
    """The ``DiffusionPipeline`` subclass ``class_name`` (``None``: the only one) defined in ``pipelines/<name>.py``,
    imported from the file (what diffusers' ``trust_remote_code`` loading does with the copy in an exported folder)."""
    from diffusers import DiffusionPipeline

    path = None if PIPELINES is None else PIPELINES / f"{name}.py"
    if path is None or not path.is_file():
        raise ExportError(f"export: the pipeline file pipelines/{name}.py is missing from this installation")
    spec = importlib.util.spec_from_file_location(f"stepdistill_pipeline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, DiffusionPipeline)
             and v.__module__ == module.__name__ and (class_name is None or v.__name__ == class_name)]
    if len(found) != 1:
        raise ExportError(f"export: pipelines/{name}.py must define exactly one DiffusionPipeline"
                          f"{'' if class_name is None else ' named ' + class_name}, found {found}")
    return found[0]


def _with_experts(pipe, student: Denoiser, grid: StudentGrid, fields: dict):
    """A student of several experts (``StudentGrid.experts``): the stock ``pipe`` (expert 0's backbone in it) rebuilt
    as its ``pipelines/experts.py`` counterpart holding every expert's backbone (LoRA experts merged, each a copy) and
    the scheduler timestep at which each takes over, read from the scheduler as the pipeline will run it."""
    roles = grid.roles()
    if len(roles) == 1:
        return pipe
    name = "unet" if isinstance(pipe.components.get("unet"), torch.nn.Module) else "transformer"
    stock = type(pipe).__name__
    cls = custom_pipeline_class("experts", f"Experts{stock.removesuffix('Pipeline')}Pipeline"
                                if stock != "DDPMPipeline" else "ExpertsPipeline")
    call = fields["call"]
    if "sigmas" in call:
        pipe.scheduler.set_timesteps(sigmas=call["sigmas"])
        ran = pipe.scheduler.timesteps.tolist()
    else:
        ran = replay(pipe.scheduler, grid.steps, call)
    starts = [float(ran[grid.experts.index(role)]) for role in roles[1:]]
    experts = {f"{name}_{k}": student.experts[role].plain_backbone().float().eval()
               for k, role in enumerate(roles[1:], 1)}
    fields.update(custom_pipeline="experts.py", pipeline_class=cls.__name__,
                  experts={"roles": list(roles), "components": [name, *experts], "expert_from": starts})
    return cls(**pipe.components, **experts, expert_from=starts)


def _scheduler_candidates(teacher_scheduler_config: dict, prediction: str, grid: StudentGrid, timesteps: list[int]):
    """Stock schedulers that may replay ``grid`` on the teacher's betas, most natural first, each with the pipeline
    call arguments it needs (``{}``: the scheduler config alone encodes the grid): the grid's transition knows them
    (``transitions.py``)."""
    cfg = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    cfg.update(set_alpha_to_one=True, clip_sample=False, thresholding=False,
               prediction_type=OURS_TO_DIFFUSERS[prediction])
    for scheduler, call in grid.transition.vp_schedulers(cfg, grid, timesteps):
        yield scheduler, {**call, **grid.transition.call_kwargs()}


def replay(scheduler, steps: int, call: dict) -> list[int]:
    """The timesteps ``scheduler`` runs when a pipeline is called with ``num_inference_steps=steps`` and ``call``."""
    if "timesteps" in call:
        scheduler.set_timesteps(timesteps=call["timesteps"])
    else:
        scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def student_scheduler(teacher_scheduler_config: dict, prediction: str, grid: StudentGrid, timesteps: list[int], *,
                      call_timesteps: bool = True) -> tuple[object, dict]:
    """The stock scheduler that reproduces the student grid exactly (checked, not assumed), and the call arguments it
    needs. ``call_timesteps``: whether the pipeline's call takes ``timesteps=`` (SD pipelines do, DDPMPipeline not)."""
    tried, uneven = [], None
    for scheduler, call in _scheduler_candidates(teacher_scheduler_config, prediction, grid, timesteps):
        if not call_timesteps:  # DDPMPipeline passes no step arguments: the step's own defaults must be ours
            call = {k: v for k, v in call.items() if _step_default(scheduler, k) != v}
        if call and not call_timesteps:
            tried.append(f"{type(scheduler).__name__} needs call arguments {sorted(call)}, which DDPMPipeline does "
                         "not take")
            continue
        ran = replay(scheduler, grid.steps, call)
        landed = _ddim_landings(scheduler, ran)
        if ran == timesteps and landed in (None, timesteps[1:] + [-1]):
            return scheduler, call
        note = ""
        if ran == timesteps and landed is not None:  # the right timesteps, stepped between unevenly
            uneven = scheduler.config.num_train_timesteps
            note = f", but it steps each t to t - {uneven // len(ran)}: {landed}"
        tried.append(f"{type(scheduler).__name__}: {ran}{note}")
    hint = "" if uneven is None else f"; choose a step count that divides {uneven}, or export.pipeline: false"
    raise ExportError(f"export: no stock scheduler reproduces the {grid.transition} student grid {timesteps} "
                      f"({'; '.join(tried)}){hint}")


def _step_default(scheduler, name: str):
    """The default of ``scheduler.step``'s argument ``name`` (``TCDScheduler``'s ``eta`` is 0.3), or ``None``."""
    param = inspect.signature(scheduler.step).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _ddim_landings(scheduler, timesteps: list[int]) -> list[int] | None:
    """Where ``DDIMScheduler.step`` lands from each timestep (-1: the clean end). It jumps to ``t - N // steps``, not
    to the next timestep it runs, so it replays only evenly spaced grids (``None`` for other schedulers)."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        return None
    jump = scheduler.config.num_train_timesteps // len(timesteps)
    return [max(t - jump, -1) for t in timesteps]


def grid_timesteps(schedule: VPDiscrete, grid: StudentGrid) -> list[int]:
    """The integer diffusers timesteps of a student grid."""
    return [int(round(float(v))) for v in schedule.model_time(torch.tensor(grid.times, dtype=torch.float64))]


def check_exportable(student: Denoiser, teacher) -> None:
    """Refuse, before training, a student that no stock pipeline can run, or whose pipeline would clip its data."""
    if teacher.mixture is not None:
        low, high = data_range(teacher.mixture)
        if float(low.min()) < -1 - 1e-9 or float(high.max()) > 1 + 1e-9:  # the fitted map lands on -+1 up to rounding
            raise ExportError(f"export: the mixture reaches [{float(low.min()):.3g}, {float(high.max()):.3g}] "
                              "(means -+ 4 stds), and DDPMPipeline clamps its output to [-1, 1]: set "
                              "teacher.gmm.normalize: auto (the default: the data mapped into [-1, 1] and the map "
                              "recorded) or export.pipeline: false")
    backbone = student.backbone
    if teacher.family is None and getattr(getattr(backbone, "config", None), "num_class_embeds", None) is not None:
        raise ExportError("export: DDPMPipeline cannot pass class labels, so a class-conditional UNet2DModel student "
                          "has no stock pipeline; set export.pipeline: false (the checkpoints hold the student)")


def check_grid_exportable(student: Denoiser, teacher, grid: StudentGrid) -> None:
    """Refuse, before training, a grid on a discrete VP teacher that the export cannot replay: no stock scheduler
    reproduces it, or its transition's own pipeline (``pipelines/``) does not fit the student."""
    schedule = teacher.denoiser.schedule
    experts = len(grid.roles())
    if experts > 1 and grid.transition.pipeline is not None:
        raise ExportError(f"export: a student of {experts} experts runs in pipelines/experts.py, which steps stock "
                          f"schedulers, not {grid.transition} jumps; set export.pipeline: false (the checkpoints "
                          "hold every expert) or method.experts: shared")
    if experts > EXPERTS_MAX:
        raise ExportError(f"export: pipelines/experts.py holds at most {EXPERTS_MAX} experts, not {experts}")
    if not isinstance(schedule, VPDiscrete):
        return
    timesteps = grid_timesteps(schedule, grid)
    if grid.transition.pipeline is None:
        student_scheduler(teacher.scheduler_config, student.prediction, grid, timesteps,
                          call_timesteps=teacher.family is not None)
    elif teacher.family is not None:
        raise ExportError(f"export: {grid.transition} grids run in pipelines/{grid.transition.pipeline}.py, written "
                          f"for UNet2DModel students, not {teacher.family.name}; set export.pipeline: false")
    else:
        _trailing_ddim(teacher.scheduler_config, student.prediction, grid.steps, timesteps)


def _ddpm_pipeline(student: Denoiser, teacher, grid: StudentGrid):
    """UNet2DModel students: ``DDPMPipeline`` on the teacher's betas, the grid in the scheduler config."""
    from diffusers import DDPMPipeline

    schedule = student.schedule
    if not isinstance(schedule, VPDiscrete) or student.backbone is None:
        raise ExportError("export: only UNet2DModel students on a discrete VP schedule export to DDPMPipeline")
    check_exportable(student, teacher)
    _check_renoise_prediction(student, grid)
    timesteps = grid_timesteps(schedule, grid)
    custom = grid.transition.pipeline
    if custom is None:
        scheduler, _ = student_scheduler(teacher.scheduler_config, student.prediction, grid, timesteps,
                                         call_timesteps=False)
        pipe = DDPMPipeline(unet=_first_expert(student).plain_backbone().float().eval(), scheduler=scheduler)
    else:  # its own pipeline runs the scheduler's timesteps: DDIM's trailing spacing is the teacher's trailing grid
        scheduler = _trailing_ddim(teacher.scheduler_config, student.prediction, grid.steps, timesteps)
        pipe = custom_pipeline_class(custom)(unet=student.plain_backbone().float().eval(), scheduler=scheduler)
    vector = len(teacher.sample_shape) == 1
    fields = {
        "prediction_type": OURS_TO_DIFFUSERS[student.prediction],
        "num_inference_steps": grid.steps,
        "guidance_scale": None,
        "timesteps": timesteps,
        "call": {"num_inference_steps": grid.steps},
        "sample_shape": list(teacher.sample_shape),
        "data": "vector" if vector else "image",
        "output": f"{type(pipe).__name__} returns (x / 2 + 0.5).clamp(0, 1); x = 2 * output - 1 recovers the sample"
                  + ("; vector samples come as [B, 1, 1, D] arrays" if vector else ""),
    }
    if custom is not None:
        fields.update(custom_pipeline=f"{custom}.py", pipeline_class=type(pipe).__name__)
    data_map = getattr(teacher, "data_map", None)
    if data_map is not None and not data_map.identity:  # teacher.gmm.normalize: the data's own coordinates back
        fields["data_map"] = data_map.config()
        fields["output"] += (f"; the model works in normalised coordinates: data = x * {data_map.scale!r} + shift "
                             f"(stepdistill.json data_map)")
    return pipe, fields


def _first_expert(student: Denoiser) -> Denoiser:
    """The student, or the first expert of a student of several (``sampling.Piecewise``)."""
    experts = getattr(student, "experts", None)
    return student if experts is None else experts[student.grid.experts[0]]


def _trailing_ddim(teacher_scheduler_config: dict, prediction: str, steps: int, timesteps: list[int]):
    """``DDIMScheduler`` on the teacher's betas whose ``set_timesteps(steps)`` gives ``timesteps`` (checked)."""
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config({
        **cfg, "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
        "prediction_type": OURS_TO_DIFFUSERS[prediction], "timestep_spacing": "trailing", "steps_offset": 1})
    ran = replay(scheduler, steps, {})
    if ran != timesteps:
        raise ExportError(f"export: DDIMScheduler's trailing spacing gives {ran}, not the student grid {timesteps}")
    return scheduler


def _check_renoise_prediction(student: Denoiser, grid: StudentGrid) -> None:
    if grid.transition != "ddim" and student.prediction not in ("x0", "eps", "v"):
        raise ExportError(f"export: LCMScheduler takes epsilon, v_prediction or sample outputs, not "
                          f"{student.prediction!r}")


def flow_scheduler(teacher_scheduler_config: dict, grid: StudentGrid, sigmas: list[float]):
    """``FlowMatchEulerDiscreteScheduler`` that replays ``sigmas`` literally (shift 1, no dynamic shifting: the
    pipelines' ``sigmas=`` would be shifted again otherwise, ECOSYSTEM.md §1.3). Its Euler step
    ``x + (sigma' - sigma) u`` is the DDIM jump on rectified flow; ``stochastic_sampling`` is "denoise, then re-noise
    with fresh noise" for re-noising grids."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {**cfg, "shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
         "stochastic_sampling": bool(grid.transition.flow)})
    scheduler.set_timesteps(sigmas=sigmas)
    got = scheduler.sigmas[:-1].tolist()
    if max(abs(a - b) for a, b in zip(got, sigmas)) > 1e-6 or scheduler.sigmas[-1] != 0:
        raise ExportError(f"export: FlowMatchEulerDiscreteScheduler does not replay the student sigmas {sigmas} "
                          f"(got {got})")
    return scheduler


def _family_sampling(student: Denoiser, teacher, grid: StudentGrid):
    """The stock scheduler that replays the grid of a diffusers-family student, the exact ``pipe(...)`` keyword
    arguments, and the grid as stored in ``stepdistill.json`` (``timesteps`` or, for SD3/FLUX, ``sigmas``)."""
    family = teacher.family
    schedule = student.schedule
    call = {"num_inference_steps": grid.steps}
    if family.flow:
        if grid.transition.flow is None:
            raise ExportError(f"export: FlowMatchEulerDiscreteScheduler has no {grid.transition!r} step; flow "
                              "students export with ddim or renoise grids")
        if student.prediction != "flow_match":
            raise ExportError(f"export: FlowMatchEuler pipelines need a flow_match student, not "
                              f"{student.prediction!r}")
        sigmas = [float(v) for v in schedule.sigma(torch.tensor(grid.times, dtype=torch.float64))]
        scheduler = flow_scheduler(teacher.scheduler_config, grid, sigmas)
        grid_meta = {"sigmas": sigmas}
        call["sigmas"] = sigmas
        call["max_sequence_length"] = teacher.encode_settings["max_sequence_length"]
    else:
        _check_renoise_prediction(student, grid)
        timesteps = grid_timesteps(schedule, grid)
        scheduler, extra = student_scheduler(teacher.scheduler_config, student.prediction, grid, timesteps)
        call.update(extra)
        grid_meta = {"timesteps": timesteps}
    # The student carries any guidance it was distilled with: no CFG at sampling time (guidance_scale <= 1 turns
    # it off). A student that takes the scale as an input (FLUX-dev's embedder, a w-conditioned SD UNet, for which
    # stock SD pipelines embed guidance_scale and skip CFG) gets the scale it samples with in training.
    if student.sampling_guidance is not None:
        call["guidance_scale"] = student.sampling_guidance
    elif not family.guidance_input:
        call["guidance_scale"] = 0.0
    res = teacher.meta["resolution"]
    call.update(height=res, width=res)
    fields = {"family": family.name, "pipeline_class": family.pipeline,
              "prediction_type": OURS_TO_DIFFUSERS[student.prediction], "num_inference_steps": grid.steps,
              "guidance_scale": call.get("guidance_scale"), **grid_meta, "call": call,
              "sample_shape": list(teacher.sample_shape), "data": "latent",
              "output": "images decoded by the VAE (PIL by default); output_type='latent' gives the student's latents"}
    return scheduler, fields


def _family_pipeline(student: Denoiser, teacher, grid: StudentGrid):
    """SD1.5 / SDXL / SD3 / FLUX students: the teacher's stock pipeline class with the student backbone (LoRA
    students merged) and a scheduler that replays the grid."""
    scheduler, fields = _family_sampling(student, teacher, grid)
    backbone = _first_expert(student).plain_backbone().float().eval()  # a copy already (LoRA: the merged one)
    pipe = teacher.load_pipeline(**{teacher.family.backbone: backbone, "scheduler": scheduler})
    if "timesteps" in fields:  # pipelines may rewrite scheduler settings at construction (SD's steps_offset)
        ran = replay(pipe.scheduler, grid.steps, fields["call"])
        if ran != fields["timesteps"]:
            raise ExportError(f"export: {type(pipe).__name__} changed the scheduler grid to {ran} (expected "
                              f"{fields['timesteps']})")
    return pipe, fields


def export_lora(student: Denoiser, teacher, grid: StudentGrid, recipe, out_dir: Path, *, kohya: bool = False) -> Path:
    """Write ``out_dir`` (atomically): the student's LoRA as ``pytorch_lora_weights.safetensors`` for
    ``pipe.load_lora_weights``, the scheduler that replays its grid, ``stepdistill.json``, a README, and with
    ``kohya`` a kohya/webui file.

    The file holds the raw PEFT state dict plus the adapter config as metadata: converting it to the legacy diffusers
    format makes ``load_lora_weights`` silently drop every attention layer when convs are adapted too, and without
    metadata ``lora_alpha != r`` reloads with the wrong scale (ECOSYSTEM.md §2.2).
    """
    import diffusers
    from peft.utils import get_peft_model_state_dict

    family, adapter = teacher.family, getattr(student, "adapter", None)
    if family is None:
        raise ExportError("export --lora: LoRA files load into SD1.5/SDXL/SD3/FLUX pipelines; DDPMPipeline has no "
                          "load_lora_weights; `stepdistill export RUN` (without --lora) writes the merged pipeline")
    if len(grid.roles()) > 1:
        raise ExportError(f"export --lora: a student of {len(grid.roles())} experts ({', '.join(grid.roles())}) needs "
                          "a pipeline that switches them by timestep; `stepdistill export RUN` (without --lora) "
                          "writes it, each expert's LoRA merged")
    if adapter is None:
        raise ExportError("export --lora: this run trained full weights (roles.mode: full); a LoRA file needs a run "
                          "with roles.mode: lora")
    if kohya and family.flow:
        raise ExportError(f"export --kohya: kohya/webui files are written for SD1.5 and SDXL; diffusers has no "
                          f"converter to the original {family.name} LoRA format")
    scheduler, fields = _family_sampling(student, teacher, grid)
    base = student.backbone
    dtype = getattr(torch, recipe.export.dtype)
    layers = {k: v.detach().to(dtype).cpu().contiguous()
              for k, v in get_peft_model_state_dict(base, adapter_name=adapter).items()}
    config = base.peft_config[adapter]
    with atomic_dir(out_dir) as tmp:
        name = family.backbone  # the keyword prefix of save_lora_weights: unet_lora_layers / transformer_lora_layers
        getattr(diffusers, family.pipeline).save_lora_weights(
            tmp, **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config.to_dict()})
        scheduler.save_pretrained(tmp / "scheduler")
        if kohya:
            write_kohya(layers, float(config.lora_alpha), tmp / "student_kohya.safetensors")
        meta = {**_meta(recipe, teacher, grid, scheduler, fields),
                "lora": {"rank": config.r, "alpha": config.lora_alpha, "layers": len(layers) // 2,
                         "kohya": "student_kohya.safetensors" if kohya else None}}
        (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(lora_card(meta))
    return Path(out_dir)


def _load_kwargs(ex) -> dict:
    """The ``from_pretrained`` keyword arguments an export needs (``dtype`` by name: ``getattr(torch, ...)``;
    diffusers 0.42 deprecates ``torch_dtype``)."""
    return {k: v for k, v in (("dtype", None if ex.dtype == "float32" else ex.dtype),
                              ("variant", ex.variant)) if v is not None}


def _meta(recipe, teacher, grid: StudentGrid, scheduler, fields: dict) -> dict:
    """``stepdistill.json``: what was distilled from what, how to load and call it, and the teacher's license."""
    return {"method": recipe.method.name, "teacher": recipe.to_dict()["teacher"], "teacher_source": teacher.source,
            "teacher_license": teacher_license(recipe), **fields, "transition": grid.transition.name,
            "transition_config": grid.transition.config(), "scheduler": type(scheduler).__name__,
            "dtype": recipe.export.dtype, "method_config": recipe.to_dict()["method"]}


def _guidance_lines(meta: dict) -> list[str]:
    """How the distilled CFG scale is used (METHODS.md §9.1: one convention, recorded): a baked-in scale, a scale the
    student takes as an input, or none."""
    g = (meta.get("method_config") or {}).get("guidance")
    if not g:
        return []
    lo, hi = (g, g) if isinstance(g, (int, float)) else g  # a scalar: the teacher's one scale (sCM)
    if lo == hi == 1:
        return []
    convention = "`p = p_u + w (p_c - p_u)`; the LCM paper's omega is w - 1"
    if lo == hi:
        return [f"- CFG scale w = {lo:g} ({convention}) is distilled in: call with `guidance_scale` <= 1 "
                "(no CFG pass)"]
    return [f"- the student takes the CFG scale as an input (its w-embedding), trained on w in [{lo:g}, {hi:g}] "
            f"({convention}): `guidance_scale` sets it, and the pipeline runs no CFG pass"]


def teacher_license(recipe) -> str | None:
    """The ``license`` of the teacher's own model card (a local folder's README.md, or a hub card in the cache),
    carried over to the student's; ``None`` when there is none to read (offline, tiny or analytic teachers)."""
    source = recipe.teacher.pretrained
    if source is None:
        return None
    from huggingface_hub import ModelCard

    card = Path(source) / "README.md"
    try:
        data = ModelCard.load(card if card.is_file() else source).data
    except Exception:  # noqa: BLE001 - no card, no network, a card without front matter: nothing to carry over
        return None
    return getattr(data, "license", None)


def card_header(meta: dict, *, adapter: bool) -> str:
    """The YAML front matter the Hub reads (``huggingface_hub.ModelCardData``): library, base model and relation,
    pipeline tag, tags, license."""
    from huggingface_hub import ModelCardData

    base = meta["teacher_source"].removeprefix("pretrained:") if meta["teacher_source"].startswith("pretrained:") \
        else None
    data = ModelCardData(
        library_name="diffusers", license=meta.get("teacher_license"), base_model=base,
        base_model_relation=("adapter" if adapter else "finetune") if base else None,
        pipeline_tag="text-to-image" if meta.get("family") else "unconditional-image-generation",
        tags=["stepdistill", "distillation", "few-step", meta["method"], f"{meta['num_inference_steps']}-step",
              *([meta["family"]] if meta.get("family") else []), *(["lora"] if adapter else [])])
    return f"---\n{data.to_yaml()}\n---\n\n"


def _load_line(meta: dict) -> str:
    kwargs = meta.get("load_kwargs") or {}
    extra = "".join(f", {k}=torch.{v}" if k == "dtype" else f", {k}={v!r}" for k, v in kwargs.items())
    return f'pipe = DiffusionPipeline.from_pretrained("PATH_TO_THIS_FOLDER"{extra})'



def write_kohya(layers: dict[str, torch.Tensor], alpha: float, path: Path) -> None:
    """The kohya / A1111 / ComfyUI key layout (``lora_unet_..._conv1.lora_down.weight`` + ``.alpha``).

    diffusers' converter writes ``alpha = rank``; the true ``lora_alpha`` is written instead so the scale survives.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in layers.items()})
    for key in converted:
        if key.endswith(".alpha"):
            converted[key] = torch.tensor(alpha)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(path))


def _base_id(meta: dict) -> str:
    """What ``from_pretrained`` takes for the teacher: its hub id or folder (test teachers have none)."""
    source = meta["teacher_source"]
    return source.removeprefix("pretrained:") if source.startswith("pretrained:") else "THE_BASE_MODEL"


def _timesteps_line(meta: dict) -> list[str]:
    """A grid passed as ``timesteps=``: the scheduler config alone (``num_inference_steps``) runs another one."""
    if "timesteps" not in meta["call"]:
        return []
    return [f"- pass `timesteps={meta['call']['timesteps']}` as above: with `num_inference_steps` alone "
            f"{meta['scheduler']} runs a grid of its own, not the student's"]


def lora_card(meta: dict) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in meta["call"].items())
    lines = [
        card_header(meta, adapter=True).rstrip("\n"),
        "",
        f"# {meta['num_inference_steps']}-step LoRA ({meta['method']}) for `{meta['teacher_source']}`",
        "",
        "```python",
        f"from diffusers import DiffusionPipeline, {meta['scheduler']}",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{_base_id(meta)}")  # the teacher this LoRA was distilled from',
        'pipe.load_lora_weights("PATH_TO_THIS_FOLDER", weight_name="pytorch_lora_weights.safetensors", '
        'adapter_name="student")',
        'pipe.set_adapters(["student"], adapter_weights=[1.0])  # the trained scale; below 1 blends the teacher back',
        f'pipe.scheduler = {meta["scheduler"]}.from_pretrained("PATH_TO_THIS_FOLDER", subfolder="scheduler")',
        f'images = pipe("a photo of a cat", {call}).images',
        "```",
        "",
        f"- rank {meta['lora']['rank']}, alpha {meta['lora']['alpha']}, {meta['lora']['layers']} LoRA layers; the "
        "file carries the adapter config as metadata, so alpha != rank reloads exactly",
        "- `pipe.fuse_lora()` merges it; `stepdistill export RUN --fuse` writes the merged pipeline directly",
        *_timesteps_line(meta),
        *_guidance_lines(meta),
    ]
    if meta["lora"]["kohya"]:
        lines.append(f"- `{meta['lora']['kohya']}`: the same LoRA in the kohya/webui layout (A1111, ComfyUI)")
    return "\n".join(lines) + "\n"


def export_pipeline(student: Denoiser, teacher, grid: StudentGrid, recipe, out_dir: Path) -> Path:
    """Write ``out_dir`` (atomically): the stock pipeline, ``stepdistill.json`` and a model card ``README.md``. The
    backbone is built in float32 (a LoRA student merged there) and cast to ``export.dtype`` last."""
    build = _family_pipeline if teacher.family is not None else _ddpm_pipeline
    pipe, fields = build(student, teacher, grid)
    pipe = _with_experts(pipe, student, grid, fields)
    ex = recipe.export
    dtype = getattr(torch, ex.dtype)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if any(p.dtype != dtype for m in modules for p in m.parameters() if p.is_floating_point()):
        pipe.to(dtype)  # only when something changes: diffusers warns on every dtype cast of a model
    fields["load_kwargs"] = _load_kwargs(ex)
    if "custom_pipeline" in fields:
        fields["load_kwargs"]["trust_remote_code"] = True
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, variant=ex.variant)
        if "custom_pipeline" in fields:
            _ship_pipeline_file(tmp, fields["custom_pipeline"], type(pipe).__name__)
        meta = _meta(recipe, teacher, grid, pipe.scheduler, fields)
        (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(meta))
    return Path(out_dir)


def _ship_pipeline_file(folder: Path, filename: str, class_name: str) -> None:
    """Copy ``pipelines/<filename>`` into the folder and name it in ``model_index.json`` as diffusers' loader wants
    (``_class_name: [module, class]``; ``save_pretrained`` writes the bare class name, which the loader would look up
    in diffusers itself, ECOSYSTEM.md §1.6)."""
    (folder / filename).write_text((PIPELINES / filename).read_text())
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [Path(filename).stem, class_name]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def model_card(meta: dict, metrics: dict | None = None, picture: str | None = None) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in meta["call"].items())
    lines = [
        card_header(meta, adapter=False).rstrip("\n"),
        "",
        f"# {meta['num_inference_steps']}-step student ({meta['method']})",
        "",
        f"Distilled with stepdistill from `{meta['teacher_source']}` by {meta['method']} distillation. The scheduler "
        "config" + (", with the `call` arguments below," if set(meta["call"]) & {"sigmas", "timesteps"} else "")
        + " encodes the student grid, so the " + (
            f"folder's own pipeline (`{meta['custom_pipeline']}`, `{meta['pipeline_class']}`: "
            f"{_WHY_CUSTOM.get(meta['custom_pipeline'], 'no stock pipeline runs this student')}; diffusers runs it "
            "with `trust_remote_code=True`)"
            if meta.get("custom_pipeline") else "stock pipeline") + " runs it as trained.",
        "",
        "```python",
        "import torch" if "dtype" in (meta.get("load_kwargs") or {}) else "",
        "from diffusers import DiffusionPipeline",
        "",
        _load_line(meta),
        f'images = pipe("a photo of a cat", {call}).images' if meta.get("family") else
        f'images = pipe(batch_size=16, {call}, output_type="np").images',
        "```",
        "",
        (f"- sigmas: `{meta['sigmas']}`" if "sigmas" in meta else f"- timesteps: `{meta['timesteps']}`")
        + f" ({meta.get('scheduler', 'DDIMScheduler')}: "
        + _MOVES.get(meta.get("transition", "ddim"), meta.get("transition")) + ")",
        ("- SD3/FLUX pipelines re-noise with torch's global RNG (they do not pass `generator` to the scheduler): "
         "call `torch.manual_seed(...)` first for a reproducible result" if "sigmas" in meta else
         "- the pipeline's `generator` also drives the re-noising, so a seeded call is reproducible")
        if _stochastic(meta) else "- deterministic given the initial noise",
        *_guidance_lines(meta),
        f"- prediction type: `{meta['prediction_type']}`",
        f"- output: {meta['output']}",
        *_data_map_lines(meta),
        *_timesteps_line(meta),
    ]
    if picture:  # `stepdistill eval`'s side-by-side picture, a file in the folder
        lines += ["", "## Teacher and student", "", "Same prompts and initial noise; columns: the teacher's default "
                  "call, the teacher at the student's number of steps, the student.", "",
                  f"![teacher and student side by side]({picture})"]
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _data_map_lines(meta: dict) -> list[str]:
    """The one line of numpy that takes a normalised vector student's pipeline output to data coordinates."""
    if "data_map" not in meta:
        return []
    m = meta["data_map"]
    return ["- the samples were trained in normalised coordinates (teacher.gmm.normalize); in the data's own:",
            "", "```python", "import numpy as np", "",
            f"data = (2 * images.reshape(len(images), -1) - 1) * {m['scale']!r} + np.array({m['shift']!r})",
            "```"]


#: why an export carries its own pipeline file, by file
_WHY_CUSTOM = {"flow_map.py": "no stock pipeline passes the second time this student takes",
               "experts.py": "a stock pipeline holds one network, and this student has one per phase of its grid"}

_MOVES = {"ddim": "deterministic jumps, no added noise", "renoise": "denoise, then re-noise with fresh noise",
          "cm": "denoise, then re-noise to the consistency model's noise level",
          "tcd": "TCD's strategic stochastic sampling, `eta` in the call",
          "flow_map": "flow-map jumps: the network is told each jump's end, no added noise"}


def _stochastic(meta: dict) -> bool:
    move = transition_of(meta.get("transition_config") or meta.get("transition", "ddim"))
    return not isinstance(move, DDIM) and getattr(move, "gamma", 1.0) > 0  # DDIM and flow-map jumps add no noise


def card_with_metrics(pipeline_dir: Path, metrics: dict, picture: Path | None = None) -> None:
    """Rewrite an exported pipeline's model card with ``metrics`` (``stepdistill eval``, the demo) added, and a
    picture (copied into the folder) embedded."""
    import shutil

    from .atomic import atomic_file

    meta = json.loads((Path(pipeline_dir) / "stepdistill.json").read_text())
    if picture is not None:
        with atomic_file(Path(pipeline_dir) / picture.name) as tmp:
            shutil.copyfile(picture, tmp)
    with atomic_file(Path(pipeline_dir) / "README.md") as tmp:
        tmp.write_text(model_card(meta, metrics, picture.name if picture is not None else None))


def load_exported_student(pipeline_dir: Path, teacher) -> tuple[Denoiser, StudentGrid, dict]:
    """Rebuild ``(student denoiser, grid, stepdistill.json)`` from an exported pipeline folder."""
    from diffusers import UNet2DModel

    from .denoisers import UNet2DDenoiser
    from .parameterization import DIFFUSERS_PREDICTION
    from .sampling import Piecewise

    meta = json.loads((Path(pipeline_dir) / "stepdistill.json").read_text())
    schedule, prediction = teacher.denoiser.schedule, DIFFUSERS_PREDICTION[meta["prediction_type"]]
    experts = meta.get("experts") or {"roles": ["student"], "components": ["unet"], "expert_from": []}
    nets = {role: UNet2DDenoiser(UNet2DModel.from_pretrained(Path(pipeline_dir) / folder).eval(), schedule,
                                 prediction) for role, folder in zip(experts["roles"], experts["components"])}
    times = tuple(float(v) for v in schedule.index_to_t(torch.tensor(meta["timesteps"], dtype=torch.float64)))
    transition = meta.get("transition_config") or meta.get("transition", "ddim")
    if len(nets) == 1:
        return next(iter(nets.values())), StudentGrid(times=times, transition=transition), meta
    owners = tuple(experts["roles"][sum(t <= b for b in experts["expert_from"])] for t in meta["timesteps"])
    grid = StudentGrid(times=times, transition=transition, experts=owners)
    return Piecewise(nets, grid), grid, meta
