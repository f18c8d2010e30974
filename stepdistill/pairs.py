"""Teacher ODE pairs ``(noise, teacher sample)`` for DMD's regression loss (Yin et al., CVPR 2024, §3.3), and for
the methods that need teacher samples instead of data (consistency distillation without a data set, LADD).

DMD (v1) keeps the one-step generator anchored to the teacher's deterministic map with a regression loss on pairs
``(z, y = ODE_teacher(z))`` made once before training. Making them costs ``num_pairs x steps`` teacher passes, so they
are cached on disk (safetensors) under a key that fingerprints the teacher's weights and every setting that changes
the pairs. A cache whose recorded fingerprint does not match the run is refused, never silently reused.

Text-conditioned teachers: pair ``i`` is sampled with the prompt in row ``rows[i]`` of the run's prompt table (drawn
with the pairs' seed) and CFG scale ``guidance``; the rows are stored with the pairs and the table's fingerprint with
the spec, so a changed prompt file makes new pairs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_file
from .denoisers import Denoiser, TextConditioned
from .sampling import TEACHER_SAMPLERS, prior_noise


def weights_fingerprint(denoiser: Denoiser) -> str:
    """A short hash of a denoiser's schedule, output kind and weights (for analytic denoisers: defining tensors).

    Not the adapter class: a LoRA-roles teacher view (``lora.AdapterDenoiser``) is the same teacher."""
    h = hashlib.sha256(json.dumps(denoiser.schedule.config(), sort_keys=True).encode())
    h.update(denoiser.prediction.encode())
    module = denoiser.backbone if denoiser.backbone is not None else denoiser
    # The base weights only: with LoRA roles the teacher's backbone carries (disabled) adapters, which must not
    # change the teacher's identity (``lora.py``).
    tensors = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    if not tensors and hasattr(denoiser, "mixture"):  # the exact GMM denoiser: hash the mixture itself
        tensors = {k: v for k, v in vars(denoiser.mixture).items() if torch.is_tensor(v)}
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def table_fingerprint(conditions: dict[str, torch.Tensor] | None) -> str | None:
    """A short hash of a prompt table (``None`` for unconditional teachers)."""
    if conditions is None:
        return None
    h = hashlib.sha256()
    for key in sorted(conditions):
        h.update(key.encode())
        h.update(conditions[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def pair_spec(teacher: Denoiser, *, sample_shape, num_pairs: int, sampler: str, steps: int, seed: int,
              conditions: dict[str, torch.Tensor] | None = None, guidance: float = 1.0) -> dict:
    """Everything the pairs depend on; stored in the cache file and compared on load. ``conditions``: the prompt table
    of a text-conditioned teacher, whose pairs are sampled with CFG scale ``guidance``."""
    spec = {"teacher": weights_fingerprint(teacher), "sample_shape": list(sample_shape), "num_pairs": num_pairs,
            "sampler": sampler, "steps": steps, "seed": seed}
    if conditions is not None:  # unconditional specs keep their old form, so existing caches stay valid
        spec.update(prompts=table_fingerprint(conditions), guidance=guidance)
    return spec


@torch.no_grad()
def make_pairs(teacher: Denoiser, spec: dict, *, device, batch: int = 256,
               conditions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Sample ``spec["num_pairs"]`` noises (and prompt rows) and run the teacher's deterministic sampler on each."""
    fn = TEACHER_SAMPLERS[spec["sampler"]]
    g = torch.Generator().manual_seed(spec["seed"])
    noise = torch.randn(spec["num_pairs"], *spec["sample_shape"], generator=g)
    times = teacher.schedule.grid(spec["steps"]).to(device)
    rows = None
    if conditions is not None:
        rows = torch.randint(0, next(iter(conditions.values())).shape[0], (spec["num_pairs"],), generator=g)
    out = []
    for start in range(0, noise.shape[0], batch):
        z = noise[start:start + batch].to(device)
        cond = None if rows is None else {k: v[rows[start:start + batch]].to(device) for k, v in conditions.items()}
        out.append(fn(teacher, prior_noise(teacher.schedule, z), times, cond=cond, w=spec.get("guidance", 1.0)).cpu())
    pairs = {"noise": noise, "target": torch.cat(out)}
    return pairs if rows is None else {**pairs, "rows": rows}


def load_or_make_pairs(teacher: Denoiser, spec: dict, path: Path, *, device, is_main_process: bool = True,
                       wait_for_everyone=lambda: None,
                       conditions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Read the pairs at ``path`` if they match ``spec``; otherwise make them (main process) and save atomically.
    Returns ``{"noise", "target"}`` plus ``"rows"`` (the prompt-table row of each pair) for text teachers.

    Raises:
        ValueError: ``path`` holds pairs made for another teacher or other settings.
    """
    path = Path(path)
    if is_main_process and not path.exists():
        pairs = make_pairs(teacher, spec, device=device, conditions=conditions)
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in pairs.items()}, str(tmp),
                      metadata={"spec": json.dumps(spec, sort_keys=True)})
    wait_for_everyone()
    try:
        with safe_open(str(path), framework="pt") as f:
            found = json.loads((f.metadata() or {}).get("spec", "null"))
            pairs = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise ValueError(f"pair_cache: {path} is not a readable pair cache ({str(err).splitlines()[0]}); "
                         "delete it or point method.pair_cache elsewhere") from None
    if found != spec:
        diff = sorted(k for k in spec if (found or {}).get(k) != spec[k])
        raise ValueError(f"pair_cache: {path} was made for a different teacher or recipe (differs in {diff}); "
                         "delete it or point method.pair_cache elsewhere")
    return pairs


def teacher_pairs(teacher: Denoiser, *, key: str, sample_shape, device, cache_dir: Path, num_pairs: int,
                  sampler: str, steps: int, guidance: float = 1.0, conditions: dict[str, torch.Tensor] | None = None,
                  cache: str | None = None, is_main_process: bool = True, wait_for_everyone=lambda: None):
    """A run's teacher ODE pairs: ``(pairs, condition table on device or None)``. ``conditions``: the run's prompt
    table; a text-conditioned teacher's pairs are prompted from it and sampled with CFG scale ``guidance``. ``cache``:
    the file; ``None`` keys one under ``cache_dir/ode_pairs`` by the teacher's weights and these settings. ``key``: the
    recipe key a refusal names (class-conditional teachers have no pairs yet)."""
    if getattr(teacher, "num_classes", None):
        raise ValueError(f"{key}: teacher ODE pairs of class-conditional teachers are not made yet")
    if not isinstance(getattr(teacher, "inner", teacher), TextConditioned):  # a LoRA base wraps the teacher's own
        conditions = None
    spec = pair_spec(teacher, sample_shape=sample_shape, num_pairs=num_pairs, sampler=sampler, steps=steps, seed=0,
                     conditions=conditions, guidance=guidance)
    name = f"{spec['teacher']}-{sampler}{steps}-n{num_pairs}" + \
        (f"-p{spec['prompts']}-w{guidance:g}" if conditions is not None else "")
    path = Path(cache) if cache else Path(cache_dir) / "ode_pairs" / f"{name}.safetensors"
    pairs = load_or_make_pairs(teacher, spec, path, device=device, is_main_process=is_main_process,
                               wait_for_everyone=wait_for_everyone, conditions=conditions)
    table = None if conditions is None else {k: v.to(device) for k, v in conditions.items()}
    return pairs, table


#: where a loss that noises clean samples takes them from (``CleanSamples``)
X0_SOURCES = ("auto", "data", "teacher")


class CleanSamples:
    """The clean samples ``x0`` of losses that noise them to ``x_t`` (consistency distillation, sCM, MeanFlow): the
    run's data, or the teacher's ODE samples, made once before training and cached as DMD's pairs are
    (``teacher_pairs``), when the run has no data. ``prepare`` says in the log which it is.

    Args:
        source: ``data`` (the run's data source: a real one is required), ``teacher`` (teacher samples) or ``auto``
            (data when the run has a data source, else teacher samples).
        num, sampler, steps, cache: the teacher samples: how many, the sampler and its steps, the cache file.
    """

    def __init__(self, source: str = "auto", *, num: int = 4096, sampler: str = "heun", steps: int = 32,
                 cache: str | None = None):
        if source not in X0_SOURCES:
            raise ValueError(f"method.x0_source must be one of {X0_SOURCES}, got {source!r}")
        if num < 1 or steps < 1:
            raise ValueError("method.num_pairs and method.pair_steps must be positive")
        self.source, self.num, self.sampler, self.steps, self.cache = source, num, sampler, steps, cache
        self.pairs: dict[str, torch.Tensor] | None = None  # teacher samples when they stand in for data
        self.cond: dict[str, torch.Tensor] | None = None  # their prompt table (text teachers)

    def needs_real_data(self, what: str) -> str | None:
        """``Method.needs_real_data``'s answer: ``what`` needs real data when ``source`` is ``data``."""
        return f"{what} with method.x0_source: data" if self.source == "data" else None

    @property
    def reads_data(self) -> bool:
        return self.source != "teacher"

    def prepare(self, teacher: Denoiser, ctx, *, who: str, guidance: float = 1.0,
                key: str = "method.x0_source") -> None:
        """Makes (or loads) the teacher samples when they stand in for data, sampled with CFG scale ``guidance`` on
        text teachers. ``who`` names the method in the log line, ``key`` the recipe setting in refusals."""
        use_teacher = self.source == "teacher" or (self.source == "auto" and ctx.data_source in (None, "gaussian"))
        if use_teacher:  # a class-conditional teacher is refused there: give it a data source with labels instead
            self.pairs, self.cond = teacher_pairs(
                teacher, key=key, sample_shape=ctx.sample_shape, device=ctx.device,
                cache_dir=ctx.cache_dir, num_pairs=self.num, sampler=self.sampler, steps=self.steps,
                guidance=guidance, conditions=ctx.conditions, cache=self.cache, is_main_process=ctx.is_main_process,
                wait_for_everyone=ctx.wait_for_everyone)
        if ctx.is_main_process:
            where = (f"{self.num} teacher samples ({self.sampler}, {self.steps} steps)" if use_teacher
                     else f"the data source ({ctx.data_source})")
            print(f"{who}: x_t is noised from {where}", file=sys.stderr)

    def draw(self, batch) -> tuple[torch.Tensor, dict | None]:
        """A batch's clean samples and their conditions: its data (with their own labels or captions where it has
        them) or cached teacher samples (with their prompts), drawn with the batch's generator."""
        if self.pairs is None:
            return batch.x0, batch.x0_cond if batch.x0_cond is not None else batch.cond
        idx = torch.randint(0, self.pairs["target"].shape[0], (batch.size,), generator=batch.generator)
        x0 = self.pairs["target"][idx].to(batch.x0.device)
        cond = None if self.cond is None else {k: v[self.pairs["rows"][idx]] for k, v in self.cond.items()}
        return x0, cond
