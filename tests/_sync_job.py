"""Run with 2 gloo processes: ``roles.sync_gradients`` with a parameter only rank 1's loss reaches, in buckets of
5 elements; each rank writes its gradients to OUT/rank{r}.json."""

import json
import sys

import torch
import torch.distributed as dist

import stepdistill.roles as roles


roles.BUCKET = 5  # several buckets, and a tensor larger than one
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
loss = a(torch.full((1, 3), float(rank + 1))).sum() + (b(torch.ones(1, 2)).sum() if rank == 1 else 0)
loss.backward()
params = [*a.parameters(), *b.parameters()]
roles.sync_gradients(params, 2)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump([None if p.grad is None else p.grad.flatten().tolist() for p in params], f)
dist.destroy_process_group()
