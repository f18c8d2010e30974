"""Run under `accelerate launch` with 2 processes: distil a small GMM recipe and record each rank's view.

    python tests/_ddp_job.py OUT [pd|dmd2|dmd2-lora|sd15|sd15-dmd2-lora]

dmd2: three networks, two optimizers, and the GAN term through the fake score; dmd2-lora: the same with student
and fake score as adapters of one DDP-wrapped base. sd15*: a tiny Stable Diffusion teacher with a prompt file (the
main process encodes the prompts into the cache while the other rank waits for it).
"""

import hashlib
import json
import sys

import torch

from stepdistill.config import build_recipe
from stepdistill.train import Trainer
from tests._recipes import dmd_recipe, family_dmd_recipe, family_recipe, gmm_recipe


out, kind = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "pd")
make = {"pd": gmm_recipe, "dmd2": dmd_recipe,
        "dmd2-lora": lambda **o: dmd_recipe(**{"roles.mode": "lora", "roles.rank": 4, **o}),
        "sd15": lambda **o: family_recipe("sd15", **o),
        "sd15-dmd2-lora": lambda **o: family_dmd_recipe("sd15", **o)}[kind]
trainer = Trainer(build_recipe(make(**{"train.max_steps": 4, "train.checkpoint_every": 2})), out,
                  show_progress=False).setup()
acc = trainer.accelerator
first = trainer.data.next(torch.Generator().manual_seed(trainer.generator.initial_seed())).x0
trainer.train()
trainable = [trainer.nets[role] for role in sorted(trainer.optimizers)]  # every optimised role
weights = torch.cat([p.detach().flatten() for m in trainable for p in m.trainable_parameters()])
weights = weights.double().numpy().tobytes()
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump({"world": acc.num_processes, "distributed": str(acc.distributed_type),
               "weights": hashlib.sha256(weights).hexdigest(), "first_batch_sum": float(first.sum()),
               "roles": sorted(trainer.optimizers)}, f)
