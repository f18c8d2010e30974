"""Our DMD2 iteration side by side with DMD2's official SD code on the same teacher: wall time, CPU time, peak memory
and the UNet passes each iteration makes.

    python benchmarks/bench_dmd2_official.py --repo DMD2 [--size mid|tiny] [--iters 12] [--warmup 2] [--batch 2]
                                             [--guidance 1.75] [--mem-iters 2] [--threads 2] [--json out.json]
                                             [--their-adamw default|fused]

``--repo`` is tianweiy/DMD2: a folder holding its ``main/`` package (``git archive HEAD main | tar -x -C DIR``), or a
git repository of it (``main/`` is then exported to a temporary folder with ``git archive``). Its code (non-commercial
license) is imported from there at run time, never copied here; ``main/train_sd.py`` itself is not imported (it needs
wandb and an LMDB image set): its ``Trainer.train_one_step`` is replayed below without the logging.

The teacher is a random SD1.5-type pipeline saved to a temporary folder (``--size mid``:
``bench_family_speed.mid_pipeline("sd15")``, a 34M-parameter ``UNet2DConditionModel`` at 32x32x4 latents with the tiny
CLIP text encoder and 2x VAE of ``stepdistill/tiny.py``; ``tiny``: the test pipeline, 16x16 latents), eps-prediction,
DDIM scheduler of 1000 steps. Both sides load the same weights from that folder: their ``model_id`` points at it, so
their ``from_pretrained(args.model_id, subfolder=...)`` calls read it offline.

* Ours: a ``Trainer`` from ``recipes/dmd2/sd15.yaml`` with ``teacher.pretrained`` the folder, ``data.source:
  gaussian`` (prompts from ``recipes/prompts/smoke.txt``), ``roles.mode: full``, ``train.update_every: {student: 1}``,
  float32, no gradient checkpointing, no GAN. One iteration is ``Trainer.train``'s loop body without logging,
  sampling or checkpoints: ``update_schedule``, ``begin_step``, then each active phase (``_run_phase``: batch, loss,
  backward, clipping, optimizer and LR steps).
* Theirs: ``SDUniModel`` (``main/sd_unified_model.py``) with the flags of their SD1.5 stage-1 run (one-step generator
  at timestep 999, ``dfake_gen_update_ratio`` 1, no GAN (``cls_on_clean_image`` off), no gradient checkpointing, fp32),
  ``real_guidance_scale`` = ``--guidance`` (= our ``method.guidance_scale``), their two ``torch.optim.AdamW`` (betas
  0.9/0.999, weight decay 0.01) and ``constant_with_warmup`` schedules, and their prompt ``SDTextDataset`` in a
  shuffled ``DataLoader``. One iteration replays ``train_one_step`` with ``visual`` and ``log_loss`` off: the generator
  turn (``model(..., generator_turn=True)``: text encoding, generator forward, DM loss), its backward, clipping
  (``max_grad_norm`` 10) and step; the guidance turn on the generator turn's detached samples, its backward, clipping
  and step; the zero_grads, LR steps and the generated-image statistics the loop computes every step.

Measured: iterations interleaved in one process after ``--warmup`` iterations of each (the order alternates every
round: ours first in even rounds, theirs first in odd ones), median wall time (``perf_counter``) and process CPU time
(``time.process_time``, all threads) per iteration and the ratios ours / theirs, with the range of the per-round
ratios; inside each iteration, the wall time of the UNet forwards (forward hooks) and of the optimizer steps (optimizer
step hooks). The UNet (and text encoder / VAE) calls of every warm-up iteration are counted by a global module
forward hook: network, grad or no-grad, batch rows. Peak memory: each side alone in a fresh process (``--mem-iters``
iterations after one warm-up): the peak of live tensors (the tensors alive after the warm-up, found by a ``gc`` walk
with storages counted once, plus the peak of the steps' allocations from the profiler's CPU memory events, as
``bench_memory.py`` counts), the peak resident set during the steps (``VmHWM`` after a reset through
``/proc/self/clear_refs``) minus the resident set after the imports, and the whole process's peak resident set
(``VmHWM`` before that reset and after the steps; setup included). ``ru_maxrss`` is kept in the JSON but not compared:
on Linux a child started by ``subprocess`` inherits its parent's high-water mark at the fork, so it reads the parent's
size whenever that is larger (the memory runs start first, while the parent is small, for that reason).

Run-time shims for their code (``load_official`` and ``Theirs``): ``imageio`` is stubbed when missing
(``main/utils.py`` imports it for a plotting helper the loop never calls); matplotlib is put on its Agg backend; their
``Accelerator`` arguments (``log_with="wandb"``, ``dispatch_batches``, which accelerate 1.x no longer takes) are
replaced by ``Accelerator(cpu=True, mixed_precision="no")``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_family_speed import PROMPTS, build, resolution  # noqa: E402
from bench_memory import rss_mib, vm_hwm_mib  # noqa: E402


RECIPE = ROOT / "recipes" / "dmd2" / "sd15.yaml"


# ---------------------------------------------------------------------------------------------------- the teacher
def save_teacher(size: str, folder: Path) -> Path:
    """The random SD1.5-type pipeline of ``size`` (eps prediction, DDIM, 1000 steps) saved as its stock folder."""
    build("sd15", size).save_pretrained(folder)
    return folder


def latent_size(folder: Path, px: int) -> int:
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    return px // 2 ** (len(cfg["block_out_channels"]) - 1)


def unet_parameters(folder: Path) -> int:
    from diffusers import UNet2DConditionModel

    return sum(p.numel() for p in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").parameters())


# ---------------------------------------------------------------------------------------------------- ours
class Ours:
    """A real ``Trainer`` on the DMD2 SD1.5 recipe; ``iteration()`` is ``Trainer.train``'s loop body minus logging,
    samples and checkpoints."""

    name = "ours"

    def __init__(self, teacher: Path, work: Path, batch: int, guidance: float, px: int):
        from stepdistill.config import load_recipe
        from stepdistill.train import Trainer

        overrides = [f"teacher.pretrained={teacher}", f"teacher.resolution={px}", "data.source=gaussian",
                     "data.path=null", f"data.prompts={PROMPTS}", f"data.batch_size={batch}", "roles.mode=full",
                     f"method.guidance_scale={guidance}", "method.gan_weight=0", "train.update_every={student: 1}",
                     "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.max_steps=100000",
                     "train.log_every=100000", "train.sample_every=0", "train.checkpoint_every=0",
                     "train.num_sample_images=1"]
        self.trainer = Trainer(load_recipe(RECIPE, overrides), work / "ours", show_progress=False).setup()
        self.step = 0
        nets = self.trainer.nets
        self.unets = {role: net.backbone for role, net in nets.roles().items() if net.backbone is not None}
        self.optimizers = dict(self.trainer.optimizers)
        self.trained = {"generator": self.unets["student"], "fake_score": self.unets["fake_score"]}

    def iteration(self) -> None:
        t, step = self.trainer, self.step
        t.step = step
        t.method.update_schedule(step, t.nets)
        for role in t.method.begin_step(step, t.nets):
            t.optimizers[role].state.clear()
        for phase in t.method.active_phases(step, t.recipe.train.update_every):
            _logs, updated = t._run_phase(phase)
            if updated:
                owners = t._owners(phase)
                t._follow_emas(owners)
                t.method.after_update(phase, owners)
        self.step = t.step = step + 1


# ---------------------------------------------------------------------------------------------------- theirs
def official_root(repo: Path, scratch: Path) -> Path:
    """The folder holding DMD2's ``main/`` package: ``repo`` itself, or its ``main/`` exported by ``git archive``
    (read-only on the repository) into ``scratch``."""
    if (repo / "main" / "sd_unified_model.py").is_file():
        return repo
    scratch.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "main"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"bench_dmd2_official: {repo} has no main/sd_unified_model.py and is not a git repository "
                         f"of tianweiy/DMD2 ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)
    return scratch


def load_official(root: Path):
    """Import DMD2's ``main.sd_unified_model`` and ``main.utils`` from ``root``, with the shims (module docstring)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import diffusers  # noqa: F401  (before the stub below: diffusers probes for imageio with find_spec when imported)

    try:
        import imageio  # noqa: F401
    except ImportError:  # main/utils.py imports imageio.v2 for draw_valued_array, which the loop never calls
        stub = types.ModuleType("imageio")
        stub.v2 = types.ModuleType("imageio.v2")
        sys.modules.setdefault("imageio", stub)
        sys.modules.setdefault("imageio.v2", stub.v2)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import main.sd_unified_model as unified
    import main.utils as utils

    return unified, utils


def official_args(teacher: Path, batch: int, guidance: float, latents: int) -> SimpleNamespace:
    """``train_sd.py``'s arguments as their SD1.5 stage-1 script sets them, without GAN or fp16."""
    return SimpleNamespace(
        model_id=str(teacher), seed=10, batch_size=batch, resolution=latents * 8, latent_resolution=latents,
        latent_channel=4, num_train_timesteps=1000, min_step_percent=0.02, max_step_percent=0.98,
        real_guidance_scale=guidance, fake_guidance_scale=1.0, generator_lr=1e-5, guidance_lr=1e-5,
        max_grad_norm=10.0, warmup_step=500, train_iters=100000, dfake_gen_update_ratio=1, dm_loss_weight=1.0,
        use_fp16=False, gradient_checkpointing=False, gan_alone=False, cls_on_clean_image=False, gen_cls_loss=False,
        gen_cls_loss_weight=0.0, guidance_cls_loss_weight=0.0, diffusion_gan=False, diffusion_gan_max_timestep=0,
        sdxl=False, fsdp=False, initialie_generator=True, generator_lora=False, lora_rank=64, lora_alpha=8,
        lora_dropout=0.0, tiny_vae=False, conditioning_timestep=999, backward_simulation=False, denoising=False,
        denoising_timestep=1000, num_denoising_step=1, denoising_loss_weight=1.0, grid_size=1, wandb_iters=10**9,
        log_loss=False, revision=None)


class Theirs:
    """DMD2's ``SDUniModel`` and optimizers as ``train_sd.py`` builds them; ``iteration()`` replays
    ``Trainer.train_one_step`` with ``visual`` and ``log_loss`` off."""

    name = "theirs"

    def __init__(self, root: Path, teacher: Path, batch: int, guidance: float, latents: int, adamw: str = "default"):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTokenizer

        unified, utils = load_official(root)
        self.args = args = official_args(teacher, batch, guidance, latents)
        self.accelerator = acc = Accelerator(cpu=True, mixed_precision="no")  # shim: no wandb, no dispatch_batches
        set_seed(args.seed + acc.process_index)
        self.model = unified.SDUniModel(args, acc)
        tokenizer = CLIPTokenizer.from_pretrained(args.model_id, subfolder="tokenizer")
        uncond_ids = tokenizer([""], max_length=tokenizer.model_max_length, return_tensors="pt",
                               padding="max_length", truncation=True).input_ids.to(acc.device)
        dataset = utils.SDTextDataset(str(PROMPTS), tokenizer, is_sdxl=False)
        self.uncond_embedding = self.model.text_encoder(uncond_ids)[0]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
        self.dataloader = utils.cycle(acc.prepare(loader))
        model = self.model
        fused = {"fused": True} if adamw == "fused" else {}  # --their-adamw fused: ours' kernel, not theirs
        opt_g = torch.optim.AdamW([p for p in model.feedforward_model.parameters() if p.requires_grad],
                                  lr=args.generator_lr, betas=(0.9, 0.999), weight_decay=0.01, **fused)
        opt_d = torch.optim.AdamW([p for p in model.guidance_model.parameters() if p.requires_grad],
                                  lr=args.guidance_lr, betas=(0.9, 0.999), weight_decay=0.01, **fused)
        sch_g = get_scheduler("constant_with_warmup", optimizer=opt_g, num_warmup_steps=args.warmup_step,
                              num_training_steps=args.train_iters)
        sch_d = get_scheduler("constant_with_warmup", optimizer=opt_d, num_warmup_steps=args.warmup_step,
                              num_training_steps=args.train_iters)
        (model.feedforward_model, model.guidance_model, self.optimizer_generator, self.optimizer_guidance,
         self.scheduler_generator, self.scheduler_guidance) = acc.prepare(
            model.feedforward_model, model.guidance_model, opt_g, opt_d, sch_g, sch_d)
        self.step = 0
        self.unets = {"generator": model.feedforward_model, "real_unet": model.guidance_model.real_unet,
                      "fake_unet": model.guidance_model.fake_unet}
        self.optimizers = {"generator": opt_g, "guidance": opt_d}
        self.trained = {"generator": self.unets["generator"], "fake_score": self.unets["fake_unet"]}

    def iteration(self) -> None:
        """``train_one_step`` (``main/train_sd.py``) without its wandb logging; ``visual`` is off."""
        args, acc, model = self.args, self.accelerator, self.model
        model.train()
        noise = torch.randn(args.batch_size, args.latent_channel, args.latent_resolution, args.latent_resolution,
                            device=acc.device)
        compute_generator_gradient = self.step % args.dfake_gen_update_ratio == 0
        text_embedding = next(self.dataloader)["text_input_ids_one"].squeeze(1)
        uncond_embedding = self.uncond_embedding.repeat(len(text_embedding), 1, 1)
        gen_loss_dict, gen_log_dict = model(
            noise, text_embedding, uncond_embedding, visual=False, denoising_dict=None,
            compute_generator_gradient=compute_generator_gradient, real_train_dict=None, generator_turn=True,
            guidance_turn=False)
        if compute_generator_gradient:
            generator_loss = gen_loss_dict["loss_dm"] * args.dm_loss_weight
            acc.backward(generator_loss)
            acc.clip_grad_norm_(model.feedforward_model.parameters(), args.max_grad_norm)
            self.optimizer_generator.step()
            self.optimizer_generator.zero_grad()
            self.optimizer_guidance.zero_grad()
        self.scheduler_generator.step()
        guidance_loss_dict, guidance_log_dict = model(
            noise, text_embedding, uncond_embedding, visual=False, denoising_dict=None, real_train_dict=None,
            compute_generator_gradient=compute_generator_gradient, generator_turn=False, guidance_turn=True,
            guidance_data_dict=gen_log_dict["guidance_data_dict"])
        acc.backward(guidance_loss_dict["loss_fake_mean"])
        acc.clip_grad_norm_(model.guidance_model.parameters(), args.max_grad_norm)
        self.optimizer_guidance.step()
        self.optimizer_guidance.zero_grad()
        self.optimizer_generator.zero_grad()
        self.scheduler_guidance.step()
        # the statistics train_one_step computes every step (gathered; logged only when log_loss is on)
        log_dict = {**gen_log_dict, **guidance_log_dict}
        acc.gather(log_dict["guidance_data_dict"]["image"].mean()).mean()
        acc.gather(log_dict["guidance_data_dict"]["image"].std()).mean()
        if compute_generator_gradient:
            for key in ("dmtrain_pred_real_image", "dmtrain_pred_fake_image"):
                acc.gather(log_dict[key].mean()).mean()
                acc.gather(log_dict[key].std()).mean()
        acc.wait_for_everyone()
        acc.wait_for_everyone()  # train()'s, after the step
        self.step += 1


# ---------------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def counting_calls(sides):
    """Every forward call of a UNet, text encoder or VAE while the block runs (a global module hook), attributed to
    the side and role that own the module: ``(side, role, grad|no-grad, rows)``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    names = {}
    for side in sides:
        for role, unet in side.unets.items():
            names[id(unet)] = (side.name, role)
    calls = []

    def hook(module, args):
        if not isinstance(module, (UNet2DConditionModel, CLIPTextModel, AutoencoderKL)):
            return
        side, role = names.get(id(module), ("?", type(module).__name__))
        x = args[0] if args else None
        rows = int(x.shape[0]) if torch.is_tensor(x) else None
        grad = torch.is_grad_enabled() and (any(p.requires_grad for p in module.parameters())
                                            or (torch.is_tensor(x) and x.requires_grad))
        calls.append((side, role, "fwd+graph" if grad else "fwd", rows))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class Pieces:
    """Wall time inside one iteration of the UNet forwards (pre/post forward hooks) and the optimizer steps
    (optimizer step hooks)."""

    def __init__(self, side):
        self.forward = self.optim = 0.0
        self._start = {}
        self.handles = []
        for unet in side.unets.values():
            self.handles.append(unet.register_forward_pre_hook(self._pre("forward")))
            self.handles.append(unet.register_forward_hook(self._post("forward")))
        for opt in side.optimizers.values():
            self.handles.append(opt.register_step_pre_hook(self._pre("optim")))
            self.handles.append(opt.register_step_post_hook(self._post("optim")))

    def _pre(self, what):
        def hook(*_):
            self._start[what] = time.perf_counter()
        return hook

    def _post(self, what):
        def hook(*_):
            setattr(self, what, getattr(self, what) + time.perf_counter() - self._start.pop(what))
        return hook

    def take(self) -> tuple[float, float]:
        out = (self.forward, self.optim)
        self.forward = self.optim = 0.0
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def fingerprints(side) -> dict[str, float]:
    """A number per trained network that changes when it is updated (the sum of its weights, in float64)."""
    with torch.no_grad():
        return {role: float(sum(p.double().sum() for p in net.parameters())) for role, net in side.trained.items()}


def _summary(calls, side: str, iters: int) -> dict:
    """Calls per iteration of one side, by (role, kind, rows)."""
    counts = {}
    for s, role, kind, rows in calls:
        if s == side or (s == "?" and side == "unattributed"):
            key = f"{role} {kind} x{rows}"
            counts[key] = counts.get(key, 0) + 1
    return {k: v / iters for k, v in sorted(counts.items())}


def time_interleaved(ours, theirs, iters: int, warmup: int) -> dict:
    """Warm up each side (counting its network calls), then ``iters`` rounds of one iteration per side, the order
    alternating per round."""
    sides = (ours, theirs)
    before = {side.name: fingerprints(side) for side in sides}
    per_side_calls = {}
    for side in sides:
        with counting_calls(sides) as calls:
            for _ in range(warmup):
                side.iteration()
        per_side_calls[side.name] = _summary(calls, side.name, warmup)
        per_side_calls[side.name + "_unattributed"] = _summary(calls, "unattributed", warmup)
    pieces = {side.name: Pieces(side) for side in sides}
    rows = {side.name: [] for side in sides}
    try:
        for r in range(iters):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                pieces[side.name].take()
                gc.collect()
                wall0, cpu0 = time.perf_counter(), time.process_time()
                side.iteration()
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                fwd, opt = pieces[side.name].take()
                rows[side.name].append({"wall": wall, "cpu": cpu, "unet_forward": fwd, "optimizer": opt})
    finally:
        for p in pieces.values():
            p.remove()
    after = {side.name: fingerprints(side) for side in sides}
    updated = {s: {role: bool(after[s][role] != before[s][role]) for role in before[s]} for s in before}
    med = {s: {k: statistics.median(row[k] for row in rows[s]) for k in rows[s][0]} for s in rows}
    paired = {k: [o[k] / t[k] for o, t in zip(rows["ours"], rows["theirs"])] for k in ("wall", "cpu")}
    unet_calls = {s: sum(v for k, v in per_side_calls[s].items() if "CLIPTextModel" not in k
                         and "AutoencoderKL" not in k) for s in ("ours", "theirs")}
    return {
        "iters": iters, "warmup": warmup,
        "median_s": {s: {k: round(v, 4) for k, v in med[s].items()} for s in med},
        "wall_ratio": round(med["ours"]["wall"] / med["theirs"]["wall"], 4),
        "cpu_ratio": round(med["ours"]["cpu"] / med["theirs"]["cpu"], 4),
        "wall_ratio_per_round": [round(min(paired["wall"]), 4), round(statistics.median(paired["wall"]), 4),
                                 round(max(paired["wall"]), 4)],
        "cpu_ratio_per_round": [round(min(paired["cpu"]), 4), round(statistics.median(paired["cpu"]), 4),
                                round(max(paired["cpu"]), 4)],
        "updated": updated,
        "calls_per_iter": per_side_calls,
        "unet_forwards_per_iter": unet_calls,
        "raw_s": {s: [{k: round(v, 4) for k, v in row.items()} for row in rows[s]] for s in rows},
    }


def live_tensor_mib() -> float:
    """Bytes of every tensor a Python object still holds (parameters, buffers, optimizer states, caches), each
    storage once."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
    return sum(storages.values()) / 2**20


def peak_memory(make_side, iters: int) -> dict:
    """One side alone in this process: RSS after imports, build, one warm-up iteration, then ``iters`` iterations for
    the peak resident set and ``iters`` under the profiler for the peak of live tensors."""
    from torch.profiler import ProfilerActivity, profile

    base = rss_mib()
    side = make_side()
    side.iteration()
    resident = live_tensor_mib()
    setup_hwm = vm_hwm_mib()  # this process's peak so far: imports, building, the warm-up iteration
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current resident set
    except OSError:
        reset = False
    for _ in range(iters):
        side.iteration()
    hwm = vm_hwm_mib()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(iters):
            side.iteration()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return {"side": side.name, "rss_after_imports_mib": round(base, 1), "resident_tensors_mib": round(resident, 1),
            "peak_live_tensors_mib": round(resident + peak / 2**20, 1),
            "peak_rss_steps_mib": round(hwm, 1), "peak_rss_steps_over_imports_mib": round(hwm - base, 1),
            "hwm_reset": reset, "peak_rss_process_mib": round(max(setup_hwm, hwm), 1),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


#: the peak-memory figures compared (``peak_memory``)
MEMORY_KEYS = ("peak_live_tensors_mib", "peak_rss_steps_over_imports_mib", "peak_rss_process_mib")


def make_side(which: str, root: Path, teacher: Path, work: Path, batch: int, guidance: float, px: int,
              their_adamw: str = "default"):
    if which == "ours":
        return Ours(teacher, work, batch, guidance, px)
    return Theirs(root, teacher, batch, guidance, latent_size(teacher, px), their_adamw)


def _import_everything(root: Path) -> None:
    """What both sides import, before the RSS baseline (so the baseline holds the libraries, not the models)."""
    import stepdistill.train  # noqa: F401

    load_official(root)


def memory_in_subprocess(which: str, args, root: Path, teacher: Path, work: Path, px: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-side", which, "--repo", str(root),
           "--teacher", str(teacher), "--work", str(work / f"mem-{which}"), "--batch", str(args.batch),
           "--guidance", str(args.guidance), "--px", str(px), "--mem-iters", str(args.mem_iters)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    with tempfile.TemporaryDirectory(prefix="bench-dmd2-official-") as tmp:
        tmp = Path(tmp)
        root = official_root(args.repo, tmp / "official")
        teacher = save_teacher(args.size, tmp / "teacher")
        px = resolution("sd15", args.size)
        result = {"size": args.size, "unet_params_m": round(unet_parameters(teacher) / 1e6, 2),
                  "latents": latent_size(teacher, px), "batch": args.batch, "guidance": args.guidance,
                  "their_adamw": args.their_adamw, "threads": torch.get_num_threads(),
                  "repo_commit": _commit(args.repo), "loadavg_before": os.getloadavg()}
        if args.mem_iters > 0:  # first, while this process is small (a child's ru_maxrss starts from it)
            mem = {w: memory_in_subprocess(w, args, root, teacher, tmp, px) for w in ("ours", "theirs")}
            result["memory"] = mem
            result["memory_ratio"] = {k: round(mem["ours"][k] / mem["theirs"][k], 4) for k in MEMORY_KEYS}
        ours = make_side("ours", root, teacher, tmp, args.batch, args.guidance, px)
        theirs = make_side("theirs", root, teacher, tmp, args.batch, args.guidance, px, args.their_adamw)
        result.update(time_interleaved(ours, theirs, args.iters, args.warmup))
        result["loadavg_after"] = os.getloadavg()
    return result


def _commit(repo: Path) -> str | None:
    """The commit of ``repo`` when it is a git repository itself (a checkout or a bare mirror), else None."""
    if not ((repo / ".git").exists() or ((repo / "HEAD").is_file() and (repo / "objects").is_dir())):
        return None
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def table(result: dict) -> str:
    med = result["median_s"]
    lines = ["| | ours | theirs | ours / theirs |", "|---|---|---|---|"]
    lines.append(f"| wall time / iteration (median) | {med['ours']['wall']:.3f} s | {med['theirs']['wall']:.3f} s | "
                 f"**{result['wall_ratio']:.3f}** (per round {result['wall_ratio_per_round'][0]:.3f}-"
                 f"{result['wall_ratio_per_round'][2]:.3f}) |")
    lines.append(f"| CPU time / iteration (median) | {med['ours']['cpu']:.3f} s | {med['theirs']['cpu']:.3f} s | "
                 f"**{result['cpu_ratio']:.3f}** (per round {result['cpu_ratio_per_round'][0]:.3f}-"
                 f"{result['cpu_ratio_per_round'][2]:.3f}) |")
    for key, what in (("unet_forward", "UNet forwards inside it"), ("optimizer", "optimizer steps inside it")):
        lines.append(f"| {what} | {med['ours'][key]:.3f} s | {med['theirs'][key]:.3f} s | "
                     f"{med['ours'][key] / med['theirs'][key]:.3f} |")
    if "memory" in result:
        mem, ratio = result["memory"], result["memory_ratio"]
        for key, what in (("peak_live_tensors_mib", "peak live tensors"),
                          ("peak_rss_steps_over_imports_mib", "peak RSS during steps - RSS after imports"),
                          ("peak_rss_process_mib", "peak RSS of the whole process (VmHWM)")):
            lines.append(f"| {what} | {mem['ours'][key]:.0f} MiB | {mem['theirs'][key]:.0f} MiB | "
                         f"**{ratio[key]:.3f}** |")
    u = result["unet_forwards_per_iter"]
    lines.append(f"| UNet forward calls / iteration | {u['ours']:g} | {u['theirs']:g} | |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True,
                   help="tianweiy/DMD2: a folder holding main/, or a git repository of it")
    p.add_argument("--size", choices=["mid", "tiny"], default="mid")
    p.add_argument("--iters", type=int, default=12, help="timed rounds (one iteration per side each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first (calls counted there)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--guidance", type=float, default=1.75, help="CFG scale of the real score on both sides")
    p.add_argument("--mem-iters", type=int, default=2, help="iterations per peak-memory run; 0 skips them")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--their-adamw", choices=["default", "fused"], default="default",
                   help="their optimizers as their code builds them (default: torch's per-tensor loop on CPU) or with "
                        "the fused kernel ours takes, to compare the rest of the iteration on an equal optimizer")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    # internal: one side's peak-memory run in a fresh process
    p.add_argument("--memory-side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--px", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_side:
        _import_everything(args.repo)
        args.work.mkdir(parents=True, exist_ok=True)
        row = peak_memory(lambda: make_side(args.memory_side, args.repo, args.teacher, args.work, args.batch,
                                            args.guidance, args.px), args.mem_iters)
        print(json.dumps(row), flush=True)
        return
    if not args.repo.exists():
        sys.exit(f"bench_dmd2_official: {args.repo} does not exist (a checkout of tianweiy/DMD2)")
    result = run(args)
    summary = {k: v for k, v in result.items() if k != "raw_s"}
    print(json.dumps(summary, indent=1), flush=True)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
