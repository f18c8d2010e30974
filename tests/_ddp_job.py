"""Run under `accelerate launch` with 2 processes: distil the small GMM recipe and record each rank's view."""

import hashlib
import json
import sys

import torch

from stepdistill.config import build_recipe
from stepdistill.train import Trainer
from tests._recipes import gmm_recipe


out = sys.argv[1]
trainer = Trainer(build_recipe(gmm_recipe(**{"train.max_steps": 4, "train.checkpoint_every": 2})), out,
                  show_progress=False).setup()
acc = trainer.accelerator
first = trainer.data.next(torch.Generator().manual_seed(trainer.generator.initial_seed())).x0
trainer.train()
weights = torch.cat([p.detach().flatten() for p in trainer.nets.student.parameters()]).double().numpy().tobytes()
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump({"world": acc.num_processes, "distributed": str(acc.distributed_type),
               "weights": hashlib.sha256(weights).hexdigest(), "first_batch_sum": float(first.sum())}, f)
