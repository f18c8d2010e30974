"""Run under `accelerate launch` with 2 processes: two steps of every registered method with its default settings on
the exact 2-D mixture; each rank records a hash of every trained role's weights and of the logged losses.

    python tests/_contract_job.py OUT
"""

import hashlib
import json
import sys

import torch

from stepdistill.config import build_recipe
from stepdistill.methods import METHODS
from stepdistill.train import Trainer
from tests._contract import contract_recipe


out = sys.argv[1]
report = {}
for name in sorted(METHODS):
    trainer = Trainer(build_recipe(contract_recipe(name)), f"{out}/{name}", show_progress=False).setup()
    last = trainer.train()
    roles = sorted(trainer.optimizers)
    weights = torch.cat([trainer.nets[r].role_state_dict()[k].detach().flatten().double()
                         for r in roles for k in sorted(trainer.nets[r].role_state_dict())])
    report[name] = {"weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(), "roles": roles,
                    "losses": {k: v for k, v in last.items() if k.startswith("loss")},
                    "world": trainer.accelerator.num_processes}
with open(f"{out}/rank{trainer.accelerator.process_index}.json", "w") as f:
    json.dump(report, f)
trainer.close()
