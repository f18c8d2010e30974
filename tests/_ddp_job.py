"""Run under `accelerate launch` with 2 processes: distil small recipes and record each rank's view.

    python tests/_ddp_job.py OUT KIND[,KIND...] [resume]

The runs go one after another in the same two processes (the launch, the imports and the process group are paid once
per group, not per run), each into OUT/KIND with its cache beside it in OUT/KIND-cache.
KIND: pd | pd-ema | dmd2 | dmd2-lora | sd15 | sd15-dmd2-lora | sd3 | rcm | phased-lora | ladd-lora | lightning | sid,
each also as KIND-fsdp.
pd-ema: progressive distillation with a student EMA, which becomes the stage teacher and the next student at the
stage boundary (step 3).
dmd2: three networks, two optimizers, the GAN term through the fake score and a student EMA; dmd2-lora: the same
(no EMA) with student and fake score as adapters of one DDP-wrapped base, and two accumulated micro-batches per
update. sd15*: a tiny Stable Diffusion teacher with a prompt file (the main process encodes the prompts into the
cache while the other rank waits for it). sd3: a backbone with buffers (DDP broadcasts them in forward). *-fsdp: the
trainable roles sharded with FSDP2 (``train.fsdp``), sharded checkpoints, and the export rebuilt from them.
rcm: sCM's JVP through the student, its log-variance role (a built module), and DMD's critic from step 2 (the
student every 2nd step). phased-lora: phased DMD's two LoRA experts and two LoRA critics on one base, the phases
alternating. ladd-lora: LADD with the student and the discriminator's encoder (SDXL-Lightning's source) as LoRA
adapters of one base, the generator's adversarial loss through the encoder, the teacher's samples as reals. ``resume``
continues each run from its latest checkpoint. lightning: an MSE stage then an adversarial one (the stage hand-over at
step 2, the discriminator's encoder a trained role from then on). sid: the critic phase first (a no-grad student
sample while the student is frozen), then the generator loss through the teacher's and the fake score's inputs.
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch

from stepdistill.config import build_recipe
from stepdistill.train import Trainer
from tests._recipes import dmd_recipe, family_dmd_recipe, family_recipe, gmm_recipe


RECIPES = {
    "pd": gmm_recipe,
    "pd-ema": lambda **o: gmm_recipe(**{"train.ema_decay": 0.5, **o}),
    "dmd2": lambda **o: dmd_recipe(**{"train.ema_decay": 0.5, **o}),
    "dmd2-lora": lambda **o: dmd_recipe(**{"roles.mode": "lora", "roles.rank": 4, "train.grad_accum": 2, **o}),
    "sd15": lambda **o: family_recipe("sd15", **o),
    "sd3": lambda **o: family_recipe("sd3", **o),
    "sd15-dmd2-lora": lambda **o: family_dmd_recipe("sd15", **o),
    "phased-lora": lambda **o: dmd_recipe(**{"method": {"name": "phased_dmd", "student_steps": 4, "num_phases": 2},
                                             "roles.mode": "lora", "roles.rank": 4, **o}),
    "ladd-lora": lambda **o: dmd_recipe(**{"method": {"name": "ladd", "source": "encoder", "student_steps": 2,
                                                      "gan_weight": 1.0, "num_pairs": 16, "pair_steps": 4},
                                           "optim": {"student": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}},
                                           "roles.mode": "lora", "roles.rank": 4, **o}),
    "lightning": lambda **o: gmm_recipe(**{"method": {"name": "lightning", "teacher_steps": 8, "stages": [4, 2],
                                                      "steps_per_stage": 2},
                                           "optim": {"student": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}}, **o}),
    "sid": lambda **o: dmd_recipe(**{"method": {"name": "sid"}, **o}),
    "rcm": lambda **o: gmm_recipe(**{"method": {"name": "rcm", "tangent_warmup": 2},
                                     "train.update_every": {"student": 2}, "data.batch_size": 16, **o}),
}


def run(out: str, kind: str, resume: bool) -> Trainer:
    """One run of ``kind`` into ``out``: each rank's weights (``weights-rank{i}.npy``) and view (``rank{i}.json``)."""
    fsdp = kind.endswith("-fsdp")
    os.environ["STEPDISTILL_CACHE"] = f"{out}-cache"  # beside the run directory, which must start empty
    overrides = {"train.max_steps": 4, "train.checkpoint_every": 2, **({"train.fsdp": True} if fsdp else {})}
    trainer = Trainer(build_recipe(RECIPES[kind.removesuffix("-fsdp")](**overrides)), out, show_progress=False,
                      resume=resume).setup()
    acc = trainer.accelerator
    first = trainer.data.next(torch.Generator().manual_seed(trainer.generator.initial_seed())).x0
    last = trainer.train()
    # every optimised role: each rank's own weights in memory; under FSDP (each rank holds a shard) read back from
    # the last checkpoint, consolidated from the shards (no collective needed)
    ckpt = trainer.latest_checkpoint()
    roles = sorted(trainer.optimizers) + (["student_ema"] if "student_ema" in trainer.nets.extra else [])
    states = [trainer.store.read_role(ckpt, role) if fsdp else trainer.nets[role].role_state_dict() for role in roles]
    weights = torch.cat([s[k].detach().flatten() for s in states for k in sorted(s)]).double().numpy()
    np.save(f"{out}/weights-rank{acc.process_index}.npy", weights)
    if fsdp:
        trainer.export()
        if trainer.writes_lora():
            trainer.export_lora()
    with open(f"{out}/rank{acc.process_index}.json", "w") as f:
        json.dump({"world": acc.num_processes, "distributed": str(acc.distributed_type),
                   "weights": hashlib.sha256(weights.tobytes()).hexdigest(), "first_batch_sum": float(first.sum()),
                   "roles": sorted(trainer.optimizers), "sharded": trainer._sharded_roles(),
                   "losses": {k: v for k, v in last.items() if k.startswith("loss")}}, f)
    return trainer


if __name__ == "__main__":
    root, kinds = sys.argv[1], sys.argv[2].split(",")
    for kind in kinds:
        trainer = run(f"{root}/{kind}", kind, resume=len(sys.argv) > 3 and sys.argv[3] == "resume")
    trainer.close()  # the process group, once every run is done
