"""Building a run (DESIGN.md §3-5): the teacher, its prompt table, the method and its roles; its data source; a start
from another run's weights; and reading a trained run back for sampling, evaluation and export, which needs no
accelerator, optimizer or data.

Everything here that can fail on bad input fails with one line, before a run directory is touched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoints import CheckpointStore, RunError, config_fingerprint, first_line
from .conditioning import load_or_encode, read_prompts
from .config import ConfigError, Recipe, load_recipe
from .data import DataSource, image_captions, latent_table
from .denoisers import Denoiser
from .methods import METHODS
from .methods.base import Method
from .mixture import GaussianMixture, data_range
from .roles import build_nets, effective_student_init, with_recipe_roles
from .sampling import StudentGrid, sampling_denoiser
from .teachers import Teacher, TeacherError, cache_root, load_teacher
from .types import Nets, RoleSpec


def method_error(err: Exception) -> ConfigError:
    """A method's refusal as one line: its message names the recipe key (``method.<key>: ...``, ``export: ...``),
    or is put under ``method:``."""
    message = str(err)
    return ConfigError(message if message.startswith(("method.", "method:", "export:")) else f"method: {message}")


@dataclass
class Run:
    """The pieces of one run that training, sampling and export share.

    Attributes:
        recipe: the validated recipe.
        teacher: the loaded teacher (``teacher.denoiser`` is the frozen teacher role).
        method: the method object.
        specs: every role's ``RoleSpec`` (the method's, plus ``student_ema`` from ``train.ema_decay``).
        nets: the built roles.
        conditions: the prompt table of text-conditioned teachers, else ``None``.
        student_init: how the student started: ``teacher``, ``new`` or ``checkpoint`` (``train.init_from``).
        step: the step of the checkpoint the weights were read from (0 for a new run).
    """

    recipe: Recipe
    teacher: Teacher
    method: Method
    specs: dict[str, RoleSpec]
    nets: Nets
    conditions: dict[str, torch.Tensor] | None
    student_init: str
    step: int = 0

    @property
    def grid(self) -> StudentGrid:
        return self.method.student_grid()

    def sampling_student(self) -> Denoiser:
        """The student that samples and exports (each step's expert, ``sampling.sampling_denoiser``): its EMA
        (``student_ema``) when there is one and ``export.use_ema``."""
        return sampling_denoiser(self.nets, self.grid, use_ema=self.recipe.export.use_ema)

    def writes_lora(self) -> bool:
        """Whether the student is a LoRA that stock pipelines can load (``roles.mode: lora`` on a family; one network,
        not a student of several experts, which a stock pipeline cannot switch between)."""
        return (self.recipe.roles.mode == "lora" and self.teacher.family is not None
                and len(self.method.sampling_roles()) == 1)


def load_dtype(recipe: Recipe) -> str:
    """What a pretrained backbone is loaded in: a LoRA base stays in ``roles.teacher_dtype`` throughout, while full
    copies start from the teacher's float32 weights."""
    return recipe.roles.teacher_dtype if recipe.roles.mode == "lora" else "float32"


def build_run(recipe: Recipe, *, is_main_process: bool = True, wait_for_everyone=lambda: None,
              sampling_only: bool = False) -> Run:
    """Load the teacher, encode the prompts (cached), make the method and build its roles.

    ``sampling_only``: build only the roles that sample (``Method.sampling_roles``) and their EMAs.
    """
    if recipe.export.pipeline:
        _refuse_clipped_mixture(recipe)  # before a teacher is fitted: nothing is written for a refused run
    try:
        teacher = load_teacher(recipe.teacher, dtype=load_dtype(recipe))
    except TeacherError as err:
        raise RunError(str(err)) from None
    conditions = _encode_prompts(recipe, teacher, is_main_process, wait_for_everyone)  # before the roles: they copy
    try:                                                                                  # the null condition
        method = METHODS[recipe.method.name](**recipe.method.params)
    except (TypeError, ValueError) as err:
        raise method_error(err) from None
    try:
        specs = with_recipe_roles(method.roles(), recipe.train.ema_decay, recipe.roles.ema, method.sampling_roles())
        keep = method.sampling_roles() if sampling_only else tuple(specs)
        built = {k: s for k, s in specs.items() if k in keep or s.ema_of in keep}
        student_init = effective_student_init(teacher, recipe.student.init)
        nets = build_nets(teacher, built, student_init=student_init, roles=recipe.roles)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    set_attention_backend(nets, recipe.train.attention_backend)
    return Run(recipe, teacher, method, specs, nets, conditions, student_init)


def _refuse_clipped_mixture(recipe: Recipe) -> None:
    """``teacher.gmm.normalize: off`` with data outside [-1, 1] and a pipeline to export: refused up front (the same
    check ``export.check_exportable`` makes of the built teacher)."""
    gmm = recipe.teacher.gmm
    if not isinstance(gmm, dict) or gmm.get("normalize", "auto") != "off":
        return
    try:
        mixture = GaussianMixture(gmm.get("means"), gmm.get("std") if gmm.get("stds") is None else gmm["stds"],
                                  gmm.get("weights"))
    except (TypeError, ValueError, RuntimeError):
        return  # load_teacher names what is wrong with it
    low, high = data_range(mixture)
    if float(low.min()) < -1 or float(high.max()) > 1:
        raise ConfigError(f"teacher.gmm.normalize: off, but the mixture reaches [{float(low.min()):.3g}, "
                          f"{float(high.max()):.3g}] (means -+ 4 stds), and DDPMPipeline clamps its output to "
                          "[-1, 1]: set teacher.gmm.normalize: auto (the default) or export.pipeline: false")


def load_run(path: str | Path, *, checkpoint: str | None = None, all_roles: bool = False) -> Run:
    """A trained run read back for sampling, evaluation or export: its recipe, the sampling roles (student and its
    EMA; every checkpointed role with ``all_roles``) with the weights of the latest complete checkpoint (or of
    ``checkpoint``, e.g. ``step-3000``), consolidated when it was written sharded, in any number of processes, and the
    method's curriculum brought to that checkpoint (bookkeeping only)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml)")
    recipe = load_recipe(path / "config.yaml")
    run = build_run(recipe, sampling_only=not all_roles)
    store = CheckpointStore(path / "checkpoints")
    ckpt = store.latest("checkpoint") if checkpoint is None else store.root / checkpoint
    if not (ckpt / "state.json").is_file():
        raise RunError(f"checkpoint: {ckpt} is not a complete checkpoint")
    state = store.read_state(ckpt, "checkpoint")
    check_compatible(state, recipe, ckpt, "checkpoint", run.teacher)
    try:
        for role in run.nets.roles():
            spec = run.specs.get(role)
            if spec is not None and (spec.trainable or spec.checkpointed or spec.init == "ema"):
                run.nets[role].load_role_state_dict(store.read_role(ckpt, role))
    except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same problem
        raise RunError(f"corrupt or incompatible checkpoint {ckpt}: {first_line(err)}") from None
    run.step = state["step"]
    # The checkpoint holds the student after step - 1: that step's grid (a stage boundary at `step` is not crossed).
    run.method.update_schedule(max(min(run.step, recipe.train.max_steps) - 1, 0), run.nets)
    for net in run.nets.roles().values():
        net.eval()
    return run


def data_map_config(teacher: Teacher) -> dict | None:
    """The data map of a ``teacher.gmm`` (``None`` for other teachers), as checkpoints record it."""
    return None if teacher.data_map is None else teacher.data_map.config()


def check_compatible(state: dict, recipe: Recipe, path: Path, what: str, teacher: Teacher | None = None) -> None:
    """Refuse a checkpoint of another method, teacher or roles mode, one trained under other method settings, or one
    whose mixture was trained in other coordinates (``teacher.gmm.normalize``)."""
    if state.get("fingerprint") != config_fingerprint(recipe):
        raise RunError(f"{what}: checkpoint {path} was written by a different method/teacher "
                       f"({state.get('fingerprint')}); it cannot be resumed by this recipe")
    saved, now = state.get("method"), json.loads(json.dumps(recipe.to_dict()["method"]))
    if saved is not None and saved != now:  # the stage schedule, grids and losses hang on them
        key = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))[0]
        raise RunError(f"{what}: method.{key} is {now.get(key)!r} here but the run was trained with "
                       f"{saved.get(key)!r}; a resumed run keeps its method settings")
    if teacher is not None and teacher.data_map is not None:
        identity = {"scale": 1.0, "shift": [0.0] * teacher.mixture.dim}
        saved = state.get("data_map") or identity  # checkpoints before the option: the data's own coordinates
        if saved != data_map_config(teacher):
            raise RunError(f"{what}: checkpoint {path} was trained with the data map {saved}, this recipe makes "
                           f"{data_map_config(teacher)}; a run made before teacher.gmm.normalize continues with "
                           "teacher.gmm.normalize: off")


def set_attention_backend(nets: Nets, name: str) -> None:
    """``train.attention_backend``: ``sdpa`` (torch's fused attention, diffusers' default), ``xformers`` (CUDA, when
    installed), or a backend of diffusers' attention dispatcher (``flash``, ``_native_math``, ``sage``, ...:
    ``ModelMixin.set_attention_backend``), which SD3's and FLUX's attention use but the SD UNets' processors do not.
    ``denoisers.jvp`` switches to ``_native_math`` for its own calls and back."""
    if name == "sdpa":
        return
    backbones = {id(n.backbone): n.backbone for n in nets.roles().values() if n.backbone is not None}
    if name == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ConfigError("train.attention_backend: xformers is not installed (it needs CUDA: pip install "
                              "xformers); use sdpa, torch's fused attention, which is the default")
        for backbone in backbones.values():
            if not hasattr(backbone, "enable_xformers_memory_efficient_attention"):
                raise ConfigError(f"train.attention_backend: {type(backbone).__name__} has no xformers switch")
            backbone.enable_xformers_memory_efficient_attention()
        return
    for backbone in backbones.values():
        takers = [m for m in backbone.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
        if not takers:
            raise ConfigError(f"train.attention_backend: {name} is a backend of diffusers' attention dispatcher, "
                              f"which {type(backbone).__name__}'s attention does not use; use sdpa or xformers")
        try:
            backbone.set_attention_backend(name)
        except (ValueError, RuntimeError, ImportError) as err:
            raise ConfigError(f"train.attention_backend: {first_line(err)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Prompts and data.


def _encode_prompts(recipe: Recipe, teacher: Teacher, is_main_process: bool, wait_for_everyone):
    """Text-conditioned teachers: the prompt table (cached, ``conditioning.py``) and the teacher's null condition.

    The text encoders are loaded only on a cache miss, on the main process, and dropped right after encoding.
    """
    if teacher.family is None:
        if recipe.data.prompts:
            raise ConfigError(f"data.prompts: the teacher ({teacher.source}) is not text-conditioned; remove the key")
        return None
    if not recipe.data.prompts:
        raise ConfigError(f"data.prompts: a text-conditioned teacher ({teacher.family.name}) needs a prompt file, one "
                          "prompt per line")
    try:
        table, null = encode_texts(teacher, read_prompts(recipe.data.prompts), is_main_process, wait_for_everyone)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    teacher.denoiser.set_null_condition(null)
    return table


def encode_texts(teacher: Teacher, texts: list[str], is_main_process: bool = True, wait_for_everyone=lambda: None):
    """``(table, null condition)`` of ``texts`` from the prompt cache (``conditioning.load_or_encode``)."""
    return load_or_encode(
        lambda: teacher.load_pipeline(**{teacher.family.backbone: teacher.backbone, "vae": teacher.vae}),
        teacher.family.name, texts, teacher_id=teacher.cache_id, cache_dir=cache_root(),
        settings=teacher.encode_settings, is_main_process=is_main_process, wait_for_everyone=wait_for_everyone)


def make_data(run: Run, *, is_main_process: bool = True, wait_for_everyone=lambda: None) -> DataSource:
    """The run's training data: the recipe's source, or one derived from the teacher."""
    r, t, m = run.recipe, run.teacher, run.method
    needs_real = m.needs_real_data  # why the loss needs data samples, or None
    source = r.data.source
    if source is None:  # derive one from the teacher; "gaussian" is a stand-in, never real data
        derived = {"gmm": "gmm", "embedded": "digits", "tiny": "gaussian"}.get(r.teacher.source())
        if not m.reads_data or m.makes_samples:
            derived = derived or "gaussian"  # data-free, or teacher samples stand in: the batch gives size and shape
        if derived is None and needs_real is None:
            raise ConfigError("data.source: a pretrained teacher needs a data source (image_folder with data.path)")
        source = derived
    if needs_real is not None and source in (None, "gaussian"):
        raise ConfigError(f"data.source: {needs_real} needs a real-data source; set data.source to image_folder "
                          f"(with data.path), digits or gmm (got {source or 'none'})")
    try:
        latents = captions = None
        if source == "image_folder" and t.family is not None:
            if not r.data.path:
                raise ValueError("data.source image_folder needs data.path")
            latents = latent_table(r.data.path, t, cache_root())
            captions = _encode_captions(t, r.data.path, needs_real, is_main_process, wait_for_everyone)
        return DataSource(source, batch_size=r.data.batch_size, sample_shape=t.sample_shape, mixture=t.mixture,
                          path=r.data.path, labels=r.data.labels, conditions=run.conditions, latents=latents,
                          captions=captions)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _encode_captions(teacher: Teacher, path: str, needs_real: str | None, is_main_process, wait_for_everyone):
    """A text teacher's image captions as a table aligned with the images (the prompt cache encodes them), or ``None``
    for uncaptioned images, which a loss that pairs real images with their text cannot use."""
    captions = image_captions(path)
    if captions is None:
        if needs_real is not None:
            raise ValueError(f"data.path: {needs_real} pairs each real image with its caption, and the images under "
                             f"{path!r} have none: put name.txt beside each name.png")
        return None
    table, _ = encode_texts(teacher, captions, is_main_process, wait_for_everyone)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Starting from another run.


def init_from(run: Run, src: Path, *, is_main_process: bool = True) -> None:
    """``train.init_from``: load the trainable roles and EMAs that ``src`` holds (a run: its latest checkpoint). Roles
    it lacks start as usual (a GAN head added in DMD2's stage 2); roles derived from the student (progressive
    distillation's stage teacher) and EMAs the checkpoint lacks follow the loaded source. Method settings may differ
    from the source run's; method name, teacher and roles mode may not."""
    store = CheckpointStore(src / "checkpoints")
    done = store.complete()
    path = src if (src / "state.json").is_file() else (done[-1] if done else None)
    if path is None:
        raise RunError(f"train.init_from: {src} is neither a run with a complete checkpoint nor a checkpoint")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"train.init_from: corrupt checkpoint {path}: state.json unreadable ({err})") from None
    recipe = run.recipe
    if not isinstance(state, dict) or state.get("fingerprint") != config_fingerprint(recipe):
        got = state.get("fingerprint") if isinstance(state, dict) else None
        raise RunError(f"train.init_from: checkpoint {path} was written for {got}; this recipe needs "
                       f"{config_fingerprint(recipe)} (same method, teacher and roles.mode)")
    specs, saved = run.specs, state.get("method")
    try:  # the source run's roles under its own method settings: a role must keep its parameterisation
        before = METHODS[saved["name"]](**{k: v for k, v in saved.items() if k != "name"}).roles()
    except Exception:  # noqa: BLE001 - checkpoints written before state.json recorded the method
        before = {}
    for role, spec in specs.items():
        if role in before and before[role].prediction != spec.prediction:
            raise RunError(f"train.init_from: role {role!r} predicts {before[role].prediction!r} in {path} but "
                           f"{spec.prediction!r} under this recipe's method settings")
    wanted = [k for k, s in specs.items() if s.trainable or s.init == "ema"]
    loaded = []
    try:
        for role in wanted:
            if store.has_role(path, role):
                run.nets[role].load_role_state_dict(store.read_role(path, role))
                loaded.append(role)
    except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same problem
        raise RunError(f"train.init_from: corrupt or incompatible checkpoint {path}: {first_line(err)}") from None
    if "student" not in loaded:
        raise RunError(f"train.init_from: checkpoint {path} holds no student weights")
    derived = []
    for role, spec in specs.items():
        source = "student" if spec.init == "student" else spec.ema_of
        if source in loaded and role not in loaded:
            run.nets[role].load_role_state_dict(run.nets[source].role_state_dict())
            derived.append(role)
    run.student_init = "checkpoint"
    if is_main_process:
        fresh = sorted(set(specs) - set(loaded) - set(derived))
        tqdm.write(f"init_from {path}: loaded {', '.join(loaded)}" + (f"; followed the loaded roles: "
                   f"{', '.join(derived)}" if derived else "") + (f"; fresh: {', '.join(fresh)}" if fresh else ""))


def probe_grid(run: Run) -> StudentGrid:
    """The grid the run will end on (on a copy of the method, so nothing of the run changes)."""
    probe = copy.deepcopy(run.method)
    probe.update_schedule(run.recipe.train.max_steps - 1, run.nets)
    return probe.student_grid()
