"""Training-loop overhead: one iteration against the sum of the network passes it needs, measured in one run.

    python benchmarks/bench_overhead.py [--methods progressive dmd2 lcm scm scm-fd sid sid-seq] [--iters 6] [--batch 2]
                                        [--size mid|full] [--roles full|lora] [--gan-weight 0.003]

On a mid-size random SD1.5-type teacher (``bench_family_speed.mid_pipeline``, 34M-parameter UNet, 32x32 latents) a
real ``Trainer`` runs a few iterations of each method while forward hooks on every backbone count the passes an
iteration makes and record their inputs (grad-enabled passes are trained through, so they count a forward and a
backward). Each recorded pass is then timed bare: the same backbone on the same inputs, outside the loop. The ratio
``iteration time / sum of bare passes`` is the loop's overhead (the bar is <= 1.15): time spent in prompt-table
lookups, noise sampling, float64 conversions, CFG batching, clipping, optimizer steps, logging and bookkeeping.
``--size full`` runs SD1.5's own architecture with random weights (``bench_family_speed.full_pipeline``, 860M-parameter
UNet at 512x512 pixels) instead: on a GPU the mid-size model is bound by kernel launches, where any host-side work
shows at full cost; at full size the GPU is busy and host work overlaps it, as in real training.

Each pass is re-run in the state it was recorded in: the active LoRA adapter (``--roles lora``: every role is an
adapter on one base, the teacher that base with adapters off), the parameters' ``requires_grad`` flags (a GAN pass
through a frozen fake score computes input gradients only) and the inputs' (the student's sample carries its graph),
and, for DMD2's GAN passes (``--gan-weight``), the stop at the bottleneck (``Denoiser.features``). sCM's forward-mode
JVP (``scm``: ``method.jvp: exact``) is recorded from inside ``torch.func.jvp`` and timed bare as a JVP of the backbone
(``torch.func.jvp`` on the math attention kernel, as ``denoisers.jvp`` runs it), so its bar compares the iteration with
forward + JVP + backward; ``scm-fd`` takes the central difference instead (three forwards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_family_speed import PROMPTS, build, random_images, resolution  # noqa: E402


def recipe(method: str, teacher_dir: Path, batch: int, px: int, roles: str = "full", gan: float = 0.0,
           images: Path | None = None) -> dict:
    data = {"source": "image_folder", "path": str(images)} if gan > 0 else {"source": "gaussian"}
    common = {"teacher": {"pretrained": str(teacher_dir), "resolution": px},
              "data": {**data, "prompts": str(PROMPTS), "batch_size": batch},
              "roles": {"mode": roles, **({"rank": 16, "alpha": 16} if roles == "lora" else {})},
              "train": {"max_steps": 1000, "log_every": 1000, "num_sample_images": 1, "max_grad_norm": 1.0}}
    if method == "progressive":
        return {**common, "method": {"name": "progressive", "teacher_steps": 8, "final_steps": 4,
                                     "steps_per_stage": 1000, "guidance": [3.0, 3.0]}}
    if method in ("scm", "scm-fd"):  # CFG teacher velocity, student JVP (exact or central difference), fwd + bwd
        return {**common, "method": {"name": "scm", "guidance": 3.0, "tangent_warmup": 0, "x0_source": "teacher",
                                     "num_pairs": 8, "pair_steps": 2,
                                     "jvp": "exact" if method == "scm" else "finite_difference"}}
    if method in ("sid", "sid-seq"):  # SiD-LSG's step: the critic's update, then the generator's through both scores
        return {**common, "method": {"name": "sid", "alpha": 1.0, "guidance_real": 3.0, "guidance_fake": 3.0,
                                     "guidance_fake_train": 3.0,
                                     "backward": "sequential" if method == "sid-seq" else "joint"}}
    if method == "lcm":  # LCM-LoRA's step (recipes/lcm_lora): CFG teacher DDIM step, target = the student, no grad
        return {**common, "method": {"name": "lcm", "teacher_steps": 50, "guidance": [3.0, 3.0], "target_ema": 0.0,
                                     "distance": "huber", "x0_source": "teacher", "num_pairs": 8, "pair_steps": 2}}
    return {**common, "method": {"name": "dmd2", "student_steps": 1, "guidance_scale": 3.0, "gan_weight": gan}}


def save_teacher(size: str, folder: Path) -> Path:
    """The random SD1.5-type teacher of ``size``, saved as its stock pipeline, predicting v: PD's students predict v
    and start from the teacher's weights (an eps teacher needs PD's regression stage, whose passes differ from a
    halving stage's); a pass costs the same either way."""
    pipe = build("sd15", size)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(folder)
    return folder


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Stop(Exception):
    pass


@contextlib.contextmanager
def as_recorded(backbone, adapter, flags, whole: bool):
    """Re-enter a recorded pass's state: its adapter, its parameters' ``requires_grad`` and, for a GAN feature pass
    (``Denoiser.features``), the stop at the bottleneck (``mid_block``)."""
    from stepdistill.lora import active

    params = list(backbone.parameters())
    before = [p.requires_grad for p in params]
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)

    def stop(_module, _inputs, out):
        raise _Stop(out[0] if isinstance(out, tuple) else out)

    handle = None if whole else backbone.mid_block.register_forward_hook(stop)
    try:
        with active(backbone, adapter) if adapter != _PLAIN else contextlib.nullcontext():
            yield
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _unwrapped(a):
    """A tensor recorded inside ``torch.func.jvp`` without its functorch wrappers (a plain tensor as is)."""
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(a):
        a = _functorch.get_unwrapped(a)
    return a


def _kept(a, jvp: bool):
    """A recorded input, detached, keeping whether it needed a gradient (inside ``torch.func.jvp`` no tensor may be
    given one, and none needs it: the derivative runs without a graph)."""
    if not torch.is_tensor(a):
        return a
    return a.detach().clone() if jvp else a.detach().requires_grad_(a.requires_grad)


def _bare_jvp(backbone, args, kwargs):
    """One JVP of the backbone along its sample and timestep, as ``denoisers.jvp`` runs it."""
    from types import SimpleNamespace

    from stepdistill.denoisers import forward_ad_friendly

    x, t, *rest = args

    def f(x_, t_):
        out = backbone(x_, t_, *rest, **kwargs)
        return out.sample if hasattr(out, "sample") else out[0]

    with torch.no_grad(), forward_ad_friendly(SimpleNamespace(backbone=backbone)):
        return torch.func.jvp(f, (x, t), (torch.randn_like(x), torch.ones_like(t)))[1]


def bare_time(backbone, key, args, kwargs, repeats: int = 1) -> float:
    _role, adapter, grad, whole, _trains, flags, jvp = key
    times = []
    for _ in range(repeats):
        args_ = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
        kwargs_ = {k: (v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
                   for k, v in kwargs.items()}
        with as_recorded(backbone, adapter, flags, whole), torch.set_grad_enabled(grad):
            _sync()
            start = time.perf_counter()
            if jvp:
                _bare_jvp(backbone, args_, kwargs_)
            else:
                try:
                    out = backbone(*args_, **kwargs_)
                    out = out.sample if hasattr(out, "sample") else out[0]
                except _Stop as caught:
                    out = caught.args[0]
                if grad:
                    out.float().square().mean().backward()
            _sync()
            times.append(time.perf_counter() - start)
            backbone.zero_grad(set_to_none=True)
    return statistics.median(times)


_PLAIN = "-"  # a backbone without LoRA roles


def _label(key) -> str:
    role, adapter, grad, whole, trains, _flags, jvp = key
    who = role if adapter == _PLAIN else f"base[{adapter or 'adapters off'}]"
    part = "" if whole else " to bottleneck"
    if jvp:
        return f"{who} jvp"
    if not grad:
        return f"{who}{part} fwd"
    return f"{who}{part} fwd+bwd" + ("" if trains else " (input grad only)")


def measure(method: str, teacher_dir: Path, work: Path, iters: int, batch: int, px: int, roles: str = "full",
            gan: float = 0.0) -> dict:
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    gan = gan if method == "dmd2" else 0.0  # only DMD2 has a GAN term (and only then needs an image folder)
    images = random_images(work / "images", px, 8) if gan > 0 else None
    trainer = Trainer(build_recipe(recipe(method, teacher_dir, batch, px, roles, gan, images)),
                      work / f"{method}-{roles}", show_progress=False).setup()
    backbones = {}
    for role, net in trainer.nets.roles().items():
        if getattr(net, "backbone", None) is not None and hasattr(net.backbone, "mid_block"):
            backbones.setdefault(id(net.backbone), (role, net.backbone))
    # Every backbone call of the warm-up iteration, in order; a post-hook marks the calls that ran to the end (a
    # GAN feature pass stops at the bottleneck by raising, so its post-hook never fires).
    calls = []

    def pre(name):
        def record(module, args, kwargs):
            jvp = torch._C._functorch.maybe_current_level() is not None  # inside torch.func.jvp (sCM's derivative)
            if jvp:
                args = [_unwrapped(a) if torch.is_tensor(a) else a for a in args]
                kwargs = {k: _unwrapped(v) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            flags = tuple(p.requires_grad for p in module.parameters())
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            grad = torch.is_grad_enabled() and (any(flags) or any(a.requires_grad for a in tensors))
            adapter = module.__dict__.get("_stepdistill_adapter", _PLAIN)
            trains = any(p.requires_grad for n, p in module.named_parameters()
                         if adapter == _PLAIN or f".{adapter}." in n)  # does this pass train the weights it uses?
            calls.append({"key": [name, adapter, grad, False, trains, flags, jvp],
                          "inputs": ([_kept(a, jvp) for a in args], {k: _kept(v, jvp) for k, v in kwargs.items()})})
        return record

    def post(_module, _args, _kwargs, _out):
        calls[-1]["key"][3] = True

    handles = [h for role, bb in backbones.values()
               for h in (bb.register_forward_pre_hook(pre(role), with_kwargs=True),
                         bb.register_forward_hook(post, with_kwargs=True))]

    def iteration(step):
        trainer.method.update_schedule(step, trainer.nets)
        for phase in trainer.method.active_phases(step, trainer.recipe.train.update_every):
            trainer._run_phase(phase)

    iteration(0)  # warm-up (allocations, first-call costs); records the passes and their inputs
    for h in handles:
        h.remove()
    per_iter, inputs = Counter(), {}
    for c in calls:
        key = tuple(c["key"])
        per_iter[key] += 1
        inputs.setdefault(key, c["inputs"])
    by_role = {role: bb for role, bb in backbones.values()}
    # Interleave: one iteration, then one bare run of every recorded pass, repeated; machine drift hits both alike.
    times, bare_runs = [], {k: [] for k in per_iter}
    for step in range(1, iters + 1):
        _sync()
        start = time.perf_counter()
        iteration(step)
        _sync()
        times.append(time.perf_counter() - start)
        for k in per_iter:
            bare_runs[k].append(bare_time(by_role[k[0]], k, *inputs[k]))
    bare = {k: statistics.median(v) for k, v in bare_runs.items()}
    passes = sum(per_iter[k] * bare[k] for k in per_iter)
    iteration_s = statistics.median(times)
    return {"method": method, "roles": roles, "gan_weight": gan, "batch": batch, "iteration_s": round(iteration_s, 4),
            "passes_s": round(passes, 4), "ratio": round(iteration_s / passes, 3),
            "passes": [{"pass": _label(k), "per_iter": per_iter[k], "bare_s": round(bare[k], 4)} for k in per_iter]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["progressive", "dmd2"])
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", choices=["mid", "full"], default="mid")
    p.add_argument("--roles", choices=["full", "lora"], default="full", help="roles.mode of every method")
    p.add_argument("--gan-weight", type=float, default=0.0,
                   help="DMD2's GAN term (> 0 adds the head, its bottleneck passes and an image folder)")
    args = p.parse_args()
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = save_teacher(args.size, Path(tmp) / "teacher")
        for method in args.methods:
            row = measure(method, teacher_dir, Path(tmp), args.iters, args.batch, resolution("sd15", args.size),
                          args.roles, args.gan_weight)
            print(json.dumps({"size": args.size, **row}), flush=True)


if __name__ == "__main__":
    main()
