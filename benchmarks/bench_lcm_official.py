"""Our LCM-LoRA iteration side by side with diffusers' example script
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` on the same teacher and batch: wall time and
CPU time per iteration, the network passes each iteration makes and the time they take inside it.

    python benchmarks/bench_lcm_official.py [--script PATH] [--size mid|tiny] [--iters 8] [--warmup 2] [--batch 2]
                                            [--threads 2] [--precision fp32|bf16] [--their-autocast off|as-written]
                                            [--their-adamw default|fused] [--json out.json]

``--script`` is huggingface/diffusers' script (Apache-2.0), default ``$LCM_SCRIPT`` or
``/work/lcm_official/train_lcm_distill_lora_sd_wds.py`` (``git -C DIFFUSERS_CHECKOUT show
HEAD:examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py > PATH``). It is loaded from there at run time
(``importlib``, as a module of its own) and its ``main()`` runs unchanged in this process; nothing of it is copied
here. Its data loader needs ``webdataset`` and ``braceexpand`` (``pip install webdataset braceexpand``).

The teacher is a random SD1.5-type pipeline saved to a temporary folder (``--size mid``:
``bench_family_speed.mid_pipeline("sd15")``, the 34M-parameter ``UNet2DConditionModel`` at 32x32x4 latents (64 px)
with the tiny CLIP text encoder and 2x VAE of ``stepdistill/tiny.py``; ``tiny``: the test pipeline, 16x16 latents),
eps-prediction, 1000 steps. The data are 16 random captioned images at the model's resolution
(``bench_family_speed.random_images``): an image folder for ours, the same files in one webdataset tar shard
(``NAME.png`` + ``NAME.txt``) for theirs. Both load every network from the folder in float32 and, by default
(``--precision fp32``), train in float32. ``--precision bf16`` runs each side in bf16 mixed precision as its recipe or
README does: ours with ``train.mixed_precision: bf16`` and the shared base stored in bf16 (``roles.teacher_dtype:
bfloat16``, the recipe's), theirs with ``--mixed_precision bf16 --cast_teacher_unet`` and its autocast as written.

* Ours: a ``Trainer`` from ``recipes/lcm_lora/sd15.yaml`` (rank-64 LoRA student on the frozen base, w = 11 baked in,
  50 DDIM teacher steps, huber c = 0.001, the target from the student under no grad, grad clip 1, lr 1e-4, no weight
  decay) with ``teacher.pretrained`` the folder, ``data.path`` the image folder (its latents and caption embeddings
  encoded once at setup and cached, as every stepdistill run does), ``roles.teacher_dtype: float32``,
  ``train.mixed_precision: no``, no gradient checkpointing. One iteration is ``Trainer.train``'s loop body without
  logging, samples or checkpoints (``bench_dmd2_official.Ours.iteration``).
* Theirs: the script's ``main()`` with the recipe's settings as its flags (``their_flags`` in the JSON):
  ``--lora_rank 64 --lora_alpha 64 --num_ddim_timesteps 50 --w_min 5 --w_max 15 --loss_type huber --huber_c 0.001
  --learning_rate 1e-4 --adam_weight_decay 0 --lr_scheduler constant --lr_warmup_steps 0 --max_grad_norm 1
  --mixed_precision no``; no gradient checkpointing, xformers, validation, checkpoints (both every 10^9 steps) or hub
  push; ``--dataloader_num_workers 1`` (the script builds its ``WebLoader`` with ``persistent_workers=True``, which
  torch refuses with 0 workers). Their omega ~ U[5, 15] is our w = omega + 1 in [6, 16]; the recipe fixes w = 11, its
  middle (the scale changes no cost). One of their iterations is their loop body: the next batch from their loader,
  the caption encoding (their slow tokenizer, then the text encoder), the VAE encode of the images, the student
  forward, the two teacher forwards (conditional, unconditional: batch B each), the target forward, the loss, backward,
  clipping, optimizer and LR steps, ``zero_grad``, their progress bar and ``accelerator.log`` (a no-op without a
  tracker; where tensorboard is installed accelerate logs to it: ``trackers`` in the JSON).

What differs between the two iterations, by design of each: ours runs the CFG teacher as one pass at batch 2B, theirs
as two passes at batch B; theirs encodes its images (VAE) and captions (tokenizer + text encoder) every iteration, ours
reads them from tables made once at setup; theirs holds the teacher and the student as two UNet copies (memory, not
time), ours one base with the student as its adapter; their AdamW is torch's default on CPU (a per-tensor loop), ours
takes the fused kernel.

Measured, in one process, iterations strictly alternating: a hook on every optimizer step (torch's global step
post-hook; it acts only on the step their ``main()`` makes, found by its frame on the stack) closes their iteration,
runs one of ours, and opens their next one, so their time per iteration is the time from one of their optimizer steps
to the next with ours taken out. The first ``--warmup`` + 1 iterations of each side are not timed; then ``--iters``
rounds (one of theirs, then one of ours): median wall time (``perf_counter``) and process CPU time
(``time.process_time``; their loader's worker process is not in it) per iteration, the ratio ours / theirs of the
medians and the spread of the per-round ratios, and the same ratio with their VAE encode and text-encoder forwards
taken out of each of their iterations: ours reads cached latents and caption embeddings instead, so the second ratio
compares the work both do. Inside each iteration (forward and optimizer step hooks, ``bench_dmd2_official.Pieces``):
the UNet forwards, the optimizer step, and for theirs the text encoder and the VAE encoder (``vae.encoder`` and
``vae.quant_conv``: all of ``vae.encode`` but the posterior sample). A global module forward hook counts the passes of
one iteration of each side (ours: its first; theirs: its second, the first with a known start): role (ours by the
base's active adapter), grad or no-grad, batch rows. The bar (the issue's): ours at most theirs per iteration, on the
same model and batch. On a machine whose cores are shared, ``--threads 1`` gives steadier figures: with 2 threads on
oversubscribed cores each thread spins while it waits for the other, and single iterations of either side took 3-5x
their usual wall and CPU time alike.

Run-time shims for their script (``load_script``), each applied to their module, never to a library:

* ``torchvision`` is not installed here (its PyPI wheels do not load against this CPU torch): while their module is
  imported, ``sys.modules`` holds ``torchvision_shim()``, a stand-in for what their data path uses on PIL images
  (``TF.resize``, ``TF.crop``, ``TF.to_tensor``, ``TF.normalize``, ``transforms.RandomCrop.get_params``,
  ``transforms.InterpolationMode``), removed again right after; since ``diffusers.training_utils.
  resolve_interpolation_mode`` refuses to run without torchvision, their module's name for it maps the mode's name to
  the shim's ``InterpolationMode``. A real torchvision, where one imports, is used instead.
* Newer webdataset (1.0.2 here) ends every shard with an empty end-of-shard sample (``tar_file_expander``'s
  ``eof_value={}``), which the script's own ``group_by_keys_nothrow`` (written for older versions) indexes for
  ``"fname"``: ``KeyError`` at the end of the first shard. Their module's ``tar_file_expander`` is given
  ``eof_value=None`` (no marker, as older versions had none) where the installed webdataset has that parameter.
* Their ``torch.autocast(device)`` around the teacher and target passes means bfloat16 autocast on CPU even with
  ``--mixed_precision no`` (float16 on CUDA): by default their module's ``torch`` is the real one with ``autocast``
  disabled, so both sides run float32 (``--their-autocast as-written`` keeps it).
* ``--their-adamw fused``: their ``torch.optim.AdamW`` built with ``fused=True`` (ours' kernel; the default is theirs
  as they build it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import os
import shlex
import statistics
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_dmd2_official import Ours as _LoopBody  # noqa: E402
from bench_dmd2_official import Pieces, fingerprints, latent_size, save_teacher, unet_parameters  # noqa: E402
from bench_family_speed import random_images, resolution  # noqa: E402


RECIPE = ROOT / "recipes" / "lcm_lora" / "sd15.yaml"
#: ``--precision``: ours' overrides and their flags. bf16 is each as its recipe or README runs it: ours under bf16
#: autocast with the shared base stored in bf16 (the recipe's ``teacher_dtype``), theirs with ``--mixed_precision
#: bf16`` (the student under accelerate's autocast, the text encoder cast) and ``--cast_teacher_unet``
PRECISION = {"fp32": {"ours": ["roles.teacher_dtype=float32", "train.mixed_precision=no"],
                      "theirs": ["--mixed_precision", "no"]},
             "bf16": {"ours": ["roles.teacher_dtype=bfloat16", "train.mixed_precision=bf16"],
                      "theirs": ["--mixed_precision", "bf16", "--cast_teacher_unet"]}}
DEFAULT_SCRIPT = Path("/work/lcm_official/train_lcm_distill_lora_sd_wds.py")
IMAGES = 16


def default_script() -> Path:
    return Path(os.environ.get("LCM_SCRIPT") or DEFAULT_SCRIPT)


def missing_packages() -> list[str]:
    """What the script imports that this environment may lack (torchvision is shimmed)."""
    return [name for name in ("webdataset", "braceexpand") if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------------- data
def make_data(folder: Path, px: int) -> tuple[Path, Path, Path]:
    """``IMAGES`` random captioned images: the image folder (ours), a prompt file of their captions (ours' prompt
    table) and one webdataset shard of the same files (theirs)."""
    images = random_images(folder / "images", px, IMAGES)
    names = sorted(images.glob("*.png"), key=lambda p: int(p.stem))
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(p.with_suffix(".txt").read_text().strip() + "\n" for p in names))
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in names:
            for f in (p, p.with_suffix(".txt")):
                tar.add(f, arcname=f"{int(p.stem):06d}{f.suffix}")
    return images, prompts, shard


# ---------------------------------------------------------------------------------------------------- ours
class Ours(_LoopBody):
    """A real ``Trainer`` on the LCM-LoRA SD1.5 recipe; ``iteration()`` is ``Trainer.train``'s loop body minus
    logging, samples and checkpoints (inherited)."""

    name = "ours"

    def __init__(self, teacher: Path, work: Path, images: Path, prompts: Path, batch: int, px: int,
                 precision: str = "fp32"):
        from stepdistill.config import load_recipe
        from stepdistill.train import Trainer

        overrides = [f"teacher.pretrained={teacher}", f"teacher.resolution={px}", "data.source=image_folder",
                     f"data.path={images}", f"data.prompts={prompts}", f"data.batch_size={batch}",
                     *PRECISION[precision]["ours"], "train.gradient_checkpointing=false",
                     "train.max_steps=100000", "train.log_every=100000", "train.sample_every=0",
                     "train.checkpoint_every=0", "train.num_sample_images=1"]
        self.recipe = load_recipe(RECIPE, overrides)
        self.trainer = Trainer(self.recipe, work / "ours", show_progress=False).setup()
        self.step = 0
        base = self.trainer.nets.student.backbone
        self.unets = {"base": base}
        self.optimizers = dict(self.trainer.optimizers)
        self.trained = {"student": base}


# ---------------------------------------------------------------------------------------------------- their shims
def torchvision_shim() -> types.ModuleType:
    """``torchvision`` for the script's data path only, on PIL images: ``transforms.InterpolationMode``,
    ``transforms.RandomCrop.get_params`` and ``transforms.functional.{resize, crop, to_tensor, normalize}`` with
    torchvision's semantics for those inputs (resize: an int is the shorter side)."""
    import enum

    import numpy as np
    from PIL import Image

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    pil = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.NEAREST_EXACT: Image.NEAREST,
           InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
           InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING,
           InterpolationMode.LANCZOS: Image.LANCZOS}

    def resize(img, size, interpolation=InterpolationMode.BILINEAR):
        w, h = img.size
        if isinstance(size, int) or len(size) == 1:
            short = size if isinstance(size, int) else size[0]
            new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:
            new = (size[1], size[0])
        return img if new == (w, h) else img.resize(new, pil[interpolation])

    def crop(img, top, left, height, width):
        return img.crop((left, top, left + width, top + height))

    def to_tensor(img):
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        x = x[:, :, None] if x.ndim == 2 else x
        return x.permute(2, 0, 1).float().div(255)

    def normalize(x, mean, std):
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)

    class RandomCrop:
        @staticmethod
        def get_params(img, output_size):
            w, h = img.size
            th, tw = output_size
            if (h, w) == (th, tw):
                return 0, 0, h, w
            return (int(torch.randint(0, h - th + 1, (1,))), int(torch.randint(0, w - tw + 1, (1,))), th, tw)

    root, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                   "torchvision.transforms.functional"))
    fn.resize, fn.crop, fn.to_tensor, fn.normalize, fn.InterpolationMode = (resize, crop, to_tensor, normalize,
                                                                            InterpolationMode)
    tr.functional, tr.InterpolationMode, tr.RandomCrop = fn, InterpolationMode, RandomCrop
    root.transforms = tr
    for m in (root, tr, fn):
        m.__stepdistill_shim__ = True
    return root


class TheirTorch(types.ModuleType):
    """The ``torch`` their module sees: the real one, with ``autocast`` disabled (``autocast=False``) and
    ``optim.AdamW`` fused (``fused=True``) where asked."""

    def __init__(self, autocast: bool, fused: bool):
        super().__init__("torch")
        if not autocast:
            self.autocast = functools.partial(torch.autocast, enabled=False)
        if fused:
            optim = types.ModuleType("torch.optim")
            optim.__getattr__ = lambda name: getattr(torch.optim, name)
            optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
            self.optim = optim

    def __getattr__(self, name):
        return getattr(torch, name)


def load_script(path: Path, autocast: bool = False, fused: bool = False) -> types.ModuleType:
    """Their script as a module (its ``if __name__ == "__main__"`` block does not run), with the shims (module
    docstring)."""
    import diffusers.training_utils  # noqa: F401  (imported before the stub: it probes torchvision at import)

    try:
        import torchvision  # noqa: F401

        stub = None
    except Exception:  # noqa: BLE001 - not installed, or a wheel built for another torch
        stub = torchvision_shim()
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    saved = {n: sys.modules.get(n) for n in names}
    if stub is not None:
        sys.modules.update(zip(names, (stub, stub.transforms, stub.transforms.functional)))
    spec = importlib.util.spec_from_file_location("lcm_official_script", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    if stub is not None:  # diffusers' resolve_interpolation_mode refuses to run without a real torchvision
        modes = stub.transforms.InterpolationMode
        module.resolve_interpolation_mode = lambda kind: modes[kind.upper()]
    if "eof_value" in inspect.signature(module.tar_file_expander).parameters:  # webdataset's end-of-shard marker
        module.tar_file_expander = functools.partial(module.tar_file_expander, eof_value=None)
    module.torch = TheirTorch(autocast, fused)
    return module


def their_argv(teacher: Path, shard: Path, out: Path, batch: int, px: int, steps: int,
               precision: str = "fp32") -> list[str]:
    """Their flags for the settings of ``recipes/lcm_lora/sd15.yaml`` (module docstring)."""
    never = str(10**9)
    return ["--pretrained_teacher_model", str(teacher), "--output_dir", str(out), "--train_shards_path_or_url",
            str(shard), "--resolution", str(px), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--max_train_samples", str(batch * (steps + 8)), "--dataloader_num_workers", "1", "--seed", "0",
            "--learning_rate", "1e-4", "--adam_weight_decay", "0", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--loss_type", "huber", "--huber_c", "0.001",
            "--num_ddim_timesteps", "50", "--w_min", "5", "--w_max", "15", "--lora_rank", "64", "--lora_alpha", "64",
            *PRECISION[precision]["theirs"], "--checkpointing_steps", never, "--validation_steps", never,
            "--report_to", "tensorboard"]


@contextlib.contextmanager
def their_process_settings(argv: list[str]):
    """``sys.argv`` for their ``parse_args()``; the logging levels their ``main()`` sets, put back afterwards."""
    import logging

    import diffusers
    import transformers

    before = (sys.argv, logging.getLogger().level, diffusers.utils.logging.get_verbosity(),
              transformers.utils.logging.get_verbosity())
    sys.argv = ["train_lcm_distill_lora_sd_wds.py", *argv]
    try:
        yield
    finally:
        sys.argv = before[0]
        logging.getLogger().setLevel(before[1])
        diffusers.utils.logging.set_verbosity(before[2])
        transformers.utils.logging.set_verbosity(before[3])


# ---------------------------------------------------------------------------------------------------- measuring
def _rows(x) -> int | None:
    return int(x.shape[0]) if torch.is_tensor(x) else None


class Alternation:
    """Run by a global optimizer step post-hook: at each optimizer step of their ``main()`` (the frame of their
    ``main`` on the stack; our steps, made inside the hook, are skipped) it closes their iteration, runs one of ours,
    and opens their next one; it counts the passes of the first counted iteration of each side and times the rest."""

    def __init__(self, module, ours: Ours, iters: int, warmup: int):
        if warmup < 1:
            raise ValueError("--warmup must be at least 1 (their first iteration has no known start)")
        self.code, self.ours, self.iters, self.warmup = module.main.__code__, ours, iters, warmup
        self.i, self.busy, self.start = 0, False, None
        self.counting = None  # the side whose module calls the global forward hook records now
        self.calls = {"ours": [], "theirs": []}
        self.rows = {"ours": [], "theirs": []}
        self.theirs = None  # their modules and optimizer, read off their main()'s frame at the first step
        self.pieces = {}
        self.before = self.after = None
        self.forward_hook = None  # the global forward hook that counts (``_count``), removed once both are counted

    @property
    def steps(self) -> int:
        """Their ``--max_train_steps``: one iteration with no known start, ``warmup`` untimed, ``iters`` timed."""
        return 1 + self.warmup + self.iters

    # ---- counting
    def _role(self, module) -> str | None:
        from diffusers import UNet2DConditionModel
        from diffusers.models.autoencoders.vae import Decoder, Encoder
        from transformers import CLIPTextModel

        if isinstance(module, UNet2DConditionModel):
            if self.counting == "ours":
                adapter = module.__dict__.get("_stepdistill_adapter")
                return "teacher (base, adapters off)" if adapter is None else f"{adapter} (adapter)"
            return "student (LoRA)" if module is self.theirs["student"] else "teacher"
        kinds = ((CLIPTextModel, "text_encoder"), (Encoder, "vae_encoder"), (Decoder, "vae_decoder"))
        return next((name for cls, name in kinds if isinstance(module, cls)), None)

    def _count(self, module, args):
        if self.counting is None:
            return
        role = self._role(module)
        if role is None:
            return
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        self.calls[self.counting].append((role, "fwd+graph" if grad else "fwd", _rows(args[0] if args else None)))

    # ---- their modules
    def _find_theirs(self) -> dict:
        frame = sys._getframe()
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        if frame is None:
            return None
        loc = frame.f_locals
        unet = getattr(loc["unet"], "module", loc["unet"])
        vae = loc["vae"]
        opt = getattr(loc["optimizer"], "optimizer", loc["optimizer"])
        return {"student": unet.get_base_model(), "peft": unet, "teacher": loc["teacher_unet"], "vae": vae,
                "text_encoder": loc["text_encoder"], "optimizer": opt}

    def _install_pieces(self):
        t = self.theirs
        vae = [m for m in (t["vae"].encoder, getattr(t["vae"], "quant_conv", None)) if m is not None]
        self.pieces = {
            "ours": {"unet": Pieces(self.ours)},
            "theirs": {"unet": Pieces(SimpleNamespace(unets={"teacher": t["teacher"], "student": t["student"]},
                                                      optimizers={"adamw": t["optimizer"]})),
                       "text": Pieces(SimpleNamespace(unets={"text": t["text_encoder"]}, optimizers={})),
                       "vae": Pieces(SimpleNamespace(unets=dict(enumerate(vae)), optimizers={}))}}

    def _take(self, side: str) -> dict:
        row = {}
        for what, p in self.pieces[side].items():
            fwd, opt = p.take()
            if what == "unet":
                row["unet_forward"], row["optimizer"] = fwd, opt
            else:
                row["text_encoder" if what == "text" else "vae_encode"] = fwd
        return row

    def _fingerprints(self):
        return {"ours": fingerprints(self.ours), "theirs": fingerprints(SimpleNamespace(
            trained={"student": self.theirs["peft"]}))}

    # ---- the hook
    def __call__(self, optimizer, _args, _kwargs):
        if self.busy:
            return
        end_wall, end_cpu = time.perf_counter(), time.process_time()
        if self.theirs is None:
            self.theirs = self._find_theirs()
        if self.theirs is None or optimizer is not self.theirs["optimizer"]:
            return
        self.busy = True
        try:
            self._after_their_step(self.i, end_wall, end_cpu)
        finally:
            self.busy = False
        self.i += 1
        gc.collect()
        self.start = (time.perf_counter(), time.process_time())

    def _after_their_step(self, i: int, end_wall: float, end_cpu: float):
        timed = self.warmup < i <= self.warmup + self.iters
        if i == 1:  # both sides counted (ours in hook 0, theirs in iteration 1)
            self.counting = None
            if self.forward_hook is not None:
                self.forward_hook.remove()
        if timed:
            row = {"wall": end_wall - self.start[0], "cpu": end_cpu - self.start[1], **self._take("theirs")}
            self.rows["theirs"].append(row)
        if i == self.warmup:  # the timed rounds start: hooks on the timed modules and optimizers
            self.before = self._fingerprints()
            self._install_pieces()
        # one of ours
        if i == 0:
            self.counting = "ours"
        if timed:
            self._take("ours")
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        self.ours.iteration()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if timed:
            self.rows["ours"].append({"wall": wall, "cpu": cpu, **self._take("ours")})
        self.counting = "theirs" if i == 0 else None
        if i == self.warmup + self.iters:
            self.after = self._fingerprints()
            for p in (p for side in self.pieces.values() for p in side.values()):
                p.remove()


def _per_iteration(calls: list[tuple]) -> dict[str, int]:
    counts = {}
    for role, kind, rows in calls:
        key = f"{role} {kind} x{rows}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(statistics.median(values), 4), round(max(values), 4)]


def summarize(alt: Alternation) -> dict:
    rows = alt.rows
    if len(rows["ours"]) != alt.iters or len(rows["theirs"]) != alt.iters:
        raise RuntimeError(f"timed {len(rows['theirs'])} of their and {len(rows['ours'])} of our iterations, not "
                           f"{alt.iters} each: their main() stopped early")
    med = {s: {k: statistics.median(r[k] for r in rows[s]) for k in rows[s][0]} for s in rows}
    rest = [t["wall"] - t["text_encoder"] - t["vae_encode"] for t in rows["theirs"]]
    paired = {"wall": [o["wall"] / t["wall"] for o, t in zip(rows["ours"], rows["theirs"])],
              "cpu": [o["cpu"] / t["cpu"] for o, t in zip(rows["ours"], rows["theirs"])],
              "wall_without": [o["wall"] / r for o, r in zip(rows["ours"], rest)]}
    calls = {s: _per_iteration(alt.calls[s]) for s in ("ours", "theirs")}
    unet = {s: sum(v for k, v in calls[s].items() if k.startswith(("student", "teacher", "target")))
            for s in calls}
    updated = {s: {r: bool(alt.after[s][r] != alt.before[s][r]) for r in alt.before[s]} for s in alt.before}
    return {
        "iters": alt.iters, "warmup": alt.warmup,
        "median_s": {s: {k: round(v, 4) for k, v in med[s].items()} for s in med},
        "their_wall_without_vae_text_median_s": round(statistics.median(rest), 4),
        "wall_ratio": round(med["ours"]["wall"] / med["theirs"]["wall"], 4),
        "wall_ratio_without_vae_text": round(med["ours"]["wall"] / statistics.median(rest), 4),
        "cpu_ratio": round(med["ours"]["cpu"] / med["theirs"]["cpu"], 4),
        "wall_ratio_per_round": _spread(paired["wall"]),
        "wall_ratio_without_vae_text_per_round": _spread(paired["wall_without"]),
        "cpu_ratio_per_round": _spread(paired["cpu"]),
        "bar_met": med["ours"]["wall"] <= med["theirs"]["wall"],
        "updated": updated,
        "calls_per_iter": calls,
        "unet_forwards_per_iter": unet,
        "raw_s": {s: [{k: round(v, 4) for k, v in row.items()} for row in rows[s]] for s in rows},
    }


def run(args) -> dict:
    missing = missing_packages()
    if missing:
        raise SystemExit(f"bench_lcm_official: their script needs {' and '.join(missing)} "
                         f"(pip install {' '.join(missing)})")
    script = Path(args.script)
    if not script.is_file():
        raise SystemExit(f"bench_lcm_official: no script at {script} (diffusers' examples/consistency_distillation/"
                         "train_lcm_distill_lora_sd_wds.py; --script or $LCM_SCRIPT)")
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    their_autocast = args.their_autocast or ("as-written" if args.precision == "bf16" else "off")
    from accelerate.tracking import get_available_trackers
    from torch.optim.optimizer import register_optimizer_step_post_hook

    with tempfile.TemporaryDirectory(prefix="bench-lcm-official-") as tmp:
        tmp = Path(tmp)
        teacher = save_teacher(args.size, tmp / "teacher")
        px = resolution("sd15", args.size)
        images, prompts, shard = make_data(tmp / "data", px)
        result = {"size": args.size, "unet_params_m": round(unet_parameters(teacher) / 1e6, 2),
                  "latents": latent_size(teacher, px), "px": px, "batch": args.batch,
                  "threads": torch.get_num_threads(), "script": str(script),
                  "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest()[:16],
                  "precision": args.precision, "their_autocast": their_autocast, "their_adamw": args.their_adamw,
                  "trackers": [str(t) for t in get_available_trackers()], "loadavg_before": os.getloadavg()}
        module = load_script(script, autocast=their_autocast == "as-written", fused=args.their_adamw == "fused")
        result["torchvision"] = "shim" if getattr(module.TF, "__stepdistill_shim__", False) else "installed"
        ours = Ours(teacher, tmp, images, prompts, args.batch, px, args.precision)
        alt = Alternation(module, ours, args.iters, args.warmup)
        argv = their_argv(teacher, shard, tmp / "theirs", args.batch, px, alt.steps, args.precision)
        result["their_flags"] = shlex.join(argv).replace(str(tmp), "TMP")
        step_hook = register_optimizer_step_post_hook(alt)
        alt.forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(alt._count)
        try:
            with their_process_settings(argv):
                module.main(module.parse_args())
        finally:
            step_hook.remove()
            alt.forward_hook.remove()
        result.update(summarize(alt))
        result["loadavg_after"] = os.getloadavg()
    return result


def table(result: dict) -> str:
    med = result["median_s"]
    o, t = med["ours"], med["theirs"]
    rest = result["their_wall_without_vae_text_median_s"]
    lines = ["| | ours | theirs | ours / theirs |", "|---|---|---|---|"]
    lines.append(f"| wall time / iteration (median) | {o['wall']:.3f} s | {t['wall']:.3f} s | "
                 f"**{result['wall_ratio']:.3f}** (per round {result['wall_ratio_per_round'][0]:.3f}-"
                 f"{result['wall_ratio_per_round'][2]:.3f}) |")
    lines.append(f"| the same, their VAE encode and text encoder taken out | {o['wall']:.3f} s | {rest:.3f} s | "
                 f"**{result['wall_ratio_without_vae_text']:.3f}** (per round "
                 f"{result['wall_ratio_without_vae_text_per_round'][0]:.3f}-"
                 f"{result['wall_ratio_without_vae_text_per_round'][2]:.3f}) |")
    lines.append(f"| CPU time / iteration (median; not their loader worker) | {o['cpu']:.3f} s | {t['cpu']:.3f} s | "
                 f"{result['cpu_ratio']:.3f} |")
    for key, what in (("unet_forward", "UNet forwards inside it"), ("optimizer", "optimizer step inside it")):
        lines.append(f"| {what} | {o[key]:.3f} s | {t[key]:.3f} s | {o[key] / t[key]:.3f} |")
    lines.append(f"| VAE encode / text encoder inside it | cached | {t['vae_encode']:.3f} s / "
                 f"{t['text_encoder']:.3f} s | |")
    u = result["unet_forwards_per_iter"]
    lines.append(f"| UNet forward calls / iteration | {u['ours']:g} | {u['theirs']:g} | |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", type=Path, default=default_script(),
                   help="diffusers' train_lcm_distill_lora_sd_wds.py (default $LCM_SCRIPT or %(default)s)")
    p.add_argument("--size", choices=["mid", "tiny"], default="mid")
    p.add_argument("--iters", type=int, default=8, help="timed rounds (one iteration of theirs, then one of ours)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first (at least 1)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 on both sides (default), or bf16 mixed precision on both as each recipe runs it")
    p.add_argument("--their-autocast", choices=["off", "as-written"], default=None,
                   help="their teacher and target passes under torch.autocast(device) as the script writes it "
                        "(bfloat16 on CPU), or not (default: off with --precision fp32, as written with bf16)")
    p.add_argument("--their-adamw", choices=["default", "fused"], default="default",
                   help="their AdamW as they build it (torch's per-tensor loop on CPU) or with ours' fused kernel")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "raw_s"}, indent=1), flush=True)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
