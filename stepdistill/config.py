"""Recipes: YAML into typed dataclasses, dotted ``key=value`` overrides, validation that names the key.

A recipe has the sections ``teacher``, ``method``, ``data``, ``optim``, ``train``, ``eval``, ``export``, ``roles``
plus ``seed`` and ``output_dir``. Unknown keys and wrong-typed values are rejected with the dotted key and what is
allowed. ``method`` is ``{name: <registered method>, ...keyword arguments of that method's constructor}``, checked
against the constructor's signature.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe problem; the message starts with the dotted key."""


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """Exactly one of ``pretrained``, ``tiny``, ``gmm``, ``embedded``."""

    pretrained: str | None = None
    subfolder: str | None = None
    variant: str | None = None
    revision: str | None = None
    tiny: str | None = None
    gmm: dict | None = None
    embedded: str | None = None
    #: diffusers families (SD1.5, SDXL, SD3, FLUX): the family the recipe expects (checked against the teacher),
    #: the image size in pixels, the T5 prompt length, and FLUX.1-dev's embedded guidance scale
    family: str | None = None
    resolution: int | None = None
    max_sequence_length: int | None = None
    guidance: float | None = None

    def source(self) -> str:
        given = [k for k in ("pretrained", "tiny", "gmm", "embedded") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"teacher: give exactly one of pretrained, tiny, gmm, embedded (got {given or 'none'})")
        return given[0]


@dataclass
class StudentConfig:
    """``init``: ``teacher`` copies the teacher's weights; ``new`` starts from scratch (needed for oracle teachers)."""

    init: str = "teacher"


@dataclass
class DataConfig:
    source: str | None = None  # default: derived from the teacher (gmm -> gmm, embedded digits -> digits, ...)
    path: str | None = None
    batch_size: int = 64
    labels: bool = False
    prompts: str | None = None  # text-conditioned teachers: a file with one prompt per line


@dataclass
class OptimizerConfig:
    """An optimizer (``adamw | radam | adamw8bit``, ``optim.py``) and a learning-rate schedule (``constant | linear |
    cosine``) with warmup. ``linear``/``cosine`` anneal to 0 over the role's optimizer steps in the run, or restart
    every ``period`` optimizer steps when that is set (progressive distillation anneals within each stage)."""

    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "constant"
    warmup: int = 0
    period: int | None = None


@dataclass
class TrainConfig:
    max_steps: int = 1000
    update_every: dict[str, int] = field(default_factory=dict)
    grad_accum: int = 1
    mixed_precision: str = "no"
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.0  # > 0: a student EMA, updated after each student update
    log_every: int = 10
    sample_every: int = 0
    num_sample_images: int = 64
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite: int = 5
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    gradient_checkpointing: bool = False
    #: another run (its latest checkpoint) or one of its checkpoints to start from: its role weights, with fresh
    #: optimizers and step 0, under this recipe's method settings (DMD2's SD1.5 stage 2: add the GAN, lower lr)
    init_from: str | None = None
    #: ``sdpa`` (torch's scaled_dot_product_attention, diffusers' default), ``xformers`` (CUDA, when installed) or
    #: a backend of diffusers' attention dispatcher for SD3/FLUX (``flash``, ``_native_math``, ``sage``, ...)
    attention_backend: str = "sdpa"
    #: shard every trainable role with FSDP2 across the launched processes (``sharding.py``); an accelerate FSDP
    #: config (recipes/accelerate/fsdp.yaml) turns it on too
    fsdp: bool = False


@dataclass
class EvalConfig:
    num_samples: int = 1000
    teacher_sampler: str = "ddim"
    teacher_full_steps: int = 64
    seed: int = 1234


@dataclass
class ExportConfig:
    pipeline: bool = True
    use_ema: bool = True
    kohya: bool = False  # LoRA-role runs on SD1.5/SDXL: also write lora/student_kohya.safetensors
    #: the weights' dtype on disk (a LoRA student is merged in float32 first, then cast); ``variant`` names the files
    #: as diffusers' ``variant="fp16"`` does, loaded with ``from_pretrained(..., variant=..., torch_dtype=...)``
    dtype: str = "float32"
    variant: str | None = None


@dataclass
class RolesConfig:
    """``full``: a copy of the network per role. ``lora``: student and fake score are LoRA adapters of rank
    ``rank`` (scale ``alpha / rank``) on one frozen base, the teacher being that base with adapters disabled."""

    mode: str = "full"
    rank: int = 16
    alpha: float = 16.0
    #: storage dtype of the frozen teacher weights (in ``lora`` mode the shared base; adapters stay float32)
    teacher_dtype: str = "float32"
    #: further EMA roles, ``{name: {of: role, decay: d}}`` or ``{of: role, halflife: h, rampup: r}`` (half-life in
    #: updates of the source, EDM's ramp-up): followed after each update of ``of``, checkpointed; one named
    #: ``<role>_ema`` is what samples and export use (``train.ema_decay`` is ``student_ema`` with a decay)
    ema: dict[str, dict] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "progressive"
    params: dict = field(default_factory=dict)


@dataclass
class Recipe:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: dict[str, OptimizerConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    seed: int = 0
    output_dir: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = {"name": self.method.name, **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in self.method.params.items()}}
        return d


# ----------------------------------------------------------------------------------------------------------------
# Typed construction.

_CHOICES = {
    "train.mixed_precision": ("no", "bf16"),
    "roles.mode": ("full", "lora"),
    "roles.teacher_dtype": ("float32", "bfloat16"),
    "student.init": ("teacher", "new"),
    "eval.teacher_sampler": ("ddim", "euler", "heun", "dpmpp_2m"),
    "export.dtype": ("float32", "float16", "bfloat16"),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        kt, vt = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the float the user meant.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str and value is False:
        value = "no"  # YAML 1.1 reads an unquoted `no` as false (train.mixed_precision=no): the word was meant
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key; allowed: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def build_recipe(data: dict) -> Recipe:
    """Validate a recipe mapping into a ``Recipe`` (method keyword arguments are checked too)."""
    from .methods import METHODS, method_parameters

    data = dict(data or {})
    method = dict(data.pop("method", None) or {})
    name = method.pop("name", "progressive")
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    params = method_parameters(name)
    for k in method:
        if k not in params:
            raise ConfigError(f"method.{k}: unknown key for method {name!r}; allowed: {', '.join(params)}")
        method[k] = _coerce(method[k], params[k][0], f"method.{k}")
    optim = data.pop("optim", None) or {}
    if not isinstance(optim, dict):
        raise ConfigError(f"optim: expected a mapping of role -> optimizer settings, got {optim!r}")
    recipe = _build(Recipe, data, "")
    recipe.method = MethodConfig(name=name, params=method)
    recipe.optim = {role: _build(OptimizerConfig, cfg or {}, f"optim.{role}") for role, cfg in optim.items()}
    _check_choices(recipe)
    return recipe


def _check_choices(recipe: Recipe) -> None:
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
    from .optim import OPTIMIZERS, SCHEDULES

    ex = recipe.export
    if ex.variant is not None and (ex.dtype == "float32" or not ex.variant.replace("_", "").isalnum()):
        raise ConfigError(f"export.variant: {ex.variant!r} names the files of a lower-precision copy (e.g. fp16 with "
                          "export.dtype: float16); set export.dtype to float16 or bfloat16, and a variant of letters "
                          "and digits")
    backend = recipe.train.attention_backend
    if backend not in ("sdpa", "xformers"):
        from diffusers.models.attention_dispatch import AttentionBackendName

        allowed = ["sdpa", "xformers", *sorted(b.value for b in AttentionBackendName if b.value != "xformers")]
        if backend not in allowed:
            raise ConfigError(f"train.attention_backend: {backend!r} is not allowed; choose one of "
                              f"{', '.join(allowed)}")
    for role, opt in recipe.optim.items():
        if opt.name not in OPTIMIZERS:
            raise ConfigError(f"optim.{role}.name: {opt.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if opt.schedule not in SCHEDULES:
            raise ConfigError(f"optim.{role}.schedule: {opt.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(opt.lr) and opt.lr > 0):
            raise ConfigError(f"optim.{role}.lr: must be a positive number, got {opt.lr}")
        if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
            raise ConfigError(f"optim.{role}.betas: two values in [0, 1) expected, got {opt.betas}")
        ranges = {"eps": (opt.eps > 0, "> 0"), "weight_decay": (opt.weight_decay >= 0, ">= 0"),
                  "warmup": (opt.warmup >= 0, ">= 0"),
                  "period": (opt.period is None or opt.period >= 1, ">= 1 or null")}
        for key, (ok, allowed) in ranges.items():
            if not ok:
                raise ConfigError(f"optim.{role}.{key}: must be {allowed}, got {getattr(opt, key)}")
    for phase, every in recipe.train.update_every.items():
        if every < 1:
            raise ConfigError(f"train.update_every.{phase}: update ratio must be >= 1, got {every}")
    tr = recipe.train
    positive = {"train.max_steps": tr.max_steps, "train.grad_accum": tr.grad_accum, "train.log_every": tr.log_every,
                "train.max_nonfinite": tr.max_nonfinite,
                "data.batch_size": recipe.data.batch_size, "eval.num_samples": recipe.eval.num_samples,
                "roles.rank": recipe.roles.rank}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, (value, zero) in {"train.sample_every": (tr.sample_every, "never"),
                               "train.checkpoint_every": (tr.checkpoint_every, "never"),
                               "train.keep_checkpoints": (tr.keep_checkpoints, "keep all"),
                               "train.num_sample_images": (tr.num_sample_images, "no grids")}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0 (0: {zero}), got {value}")
    if not 0.0 <= tr.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0: no EMA), got {tr.ema_decay}")
    if tr.max_grad_norm is not None and tr.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: must be positive (or null: no clipping), got {tr.max_grad_norm}")
    recipe.teacher.source()


# ----------------------------------------------------------------------------------------------------------------
# Files and overrides.


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply torchtune-style ``a.b.c=value`` overrides; each value is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse value {raw!r}") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return build_recipe(apply_overrides(data, overrides or []))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
