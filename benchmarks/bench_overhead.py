"""Training-loop overhead: one iteration against the sum of the network passes it needs, measured in one run.

    python benchmarks/bench_overhead.py [--methods progressive dmd2] [--iters 6] [--batch 2] [--size mid|full]

On a mid-size random SD1.5-type teacher (``bench_family_speed.mid_pipeline``, 34M-parameter UNet, 32x32 latents) a
real ``Trainer`` runs a few iterations of each method while forward hooks on every backbone count the passes an
iteration makes and record their inputs (grad-enabled passes are trained through, so they count a forward and a
backward). Each recorded pass is then timed bare: the same backbone on the same inputs, outside the loop. The ratio
``iteration time / sum of bare passes`` is the loop's overhead (the bar is <= 1.15): time spent in prompt-table
lookups, noise sampling, float64 conversions, CFG batching, clipping, optimizer steps, logging and bookkeeping.
``--size full`` runs SD1.5's own architecture with random weights (``bench_family_speed.full_pipeline``, 860M-parameter
UNet at 512x512 pixels) instead: on a GPU the mid-size model is bound by kernel launches, where any host-side work
shows at full cost; at full size the GPU is busy and host work overlaps it, as in real training.
"""

from __future__ import annotations

import argparse
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

from bench_family_speed import PROMPTS, build, resolution  # noqa: E402


def recipe(method: str, teacher_dir: Path, batch: int, px: int) -> dict:
    common = {"teacher": {"pretrained": str(teacher_dir), "resolution": px},
              "data": {"source": "gaussian", "prompts": str(PROMPTS), "batch_size": batch},
              "train": {"max_steps": 1000, "log_every": 1000, "num_sample_images": 1, "max_grad_norm": 1.0}}
    if method == "progressive":
        return {**common, "method": {"name": "progressive", "teacher_steps": 8, "final_steps": 4,
                                     "steps_per_stage": 1000, "guidance": [3.0, 3.0]}}
    return {**common, "method": {"name": "dmd2", "student_steps": 1, "guidance_scale": 3.0}}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_time(backbone, args, kwargs, grad: bool, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        if grad:
            out = backbone(*args, **kwargs)
            out = out.sample if hasattr(out, "sample") else out[0]
            out.float().square().mean().backward()
            backbone.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                backbone(*args, **kwargs)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(method: str, teacher_dir: Path, work: Path, iters: int, batch: int, px: int) -> dict:
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    trainer = Trainer(build_recipe(recipe(method, teacher_dir, batch, px)), work / method,
                      show_progress=False).setup()
    backbones = {}
    for role, net in trainer.nets.roles().items():
        if net.backbone is not None:
            backbones.setdefault(id(net.backbone), (role, net.backbone))
    calls, inputs = Counter(), {}

    def hook(name):
        def record(module, args, kwargs):
            key = (name, torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))
            calls[key] += 1
            inputs.setdefault(key, ([a.detach() if torch.is_tensor(a) else a for a in args],
                                    {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))
        return record

    handles = [bb.register_forward_pre_hook(hook(role), with_kwargs=True) for role, bb in backbones.values()]

    def iteration(step):
        trainer.method.update_schedule(step, trainer.nets)
        for phase in trainer.method.phases:
            if step % trainer.recipe.train.update_every.get(phase, 1) == 0:
                trainer._run_phase(phase)

    iteration(0)  # warm-up (allocations, first-call costs); records the passes and their inputs
    for h in handles:
        h.remove()
    per_iter = dict(calls)
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
            bare_runs[k].append(bare_time(by_role[k[0]], *inputs[k], grad=k[1], repeats=1))
    bare = {k: statistics.median(v) for k, v in bare_runs.items()}
    passes = sum(per_iter[k] * bare[k] for k in per_iter)
    iteration_s = statistics.median(times)
    return {"method": method, "batch": batch, "iteration_s": round(iteration_s, 4), "passes_s": round(passes, 4),
            "ratio": round(iteration_s / passes, 3),
            "passes": {f"{role}{' fwd+bwd' if grad else ' fwd'}": {"per_iter": per_iter[(role, grad)],
                                                                 "bare_s": round(bare[(role, grad)], 4)}
                       for role, grad in per_iter}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["progressive", "dmd2"])
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", choices=["mid", "full"], default="mid")
    args = p.parse_args()
    os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="sd-bench-cache-"))
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        build("sd15", args.size).save_pretrained(teacher_dir)
        for method in args.methods:
            row = measure(method, teacher_dir, Path(tmp), args.iters, args.batch, resolution("sd15", args.size))
            print(json.dumps({"size": args.size, **row}), flush=True)


if __name__ == "__main__":
    main()
