"""FSDP2 sharding of the trainable roles, and sharded checkpoints (DESIGN.md §4, issue: multi-GPU).

With ``train.fsdp: true`` (or an accelerate FSDP config) every trainable role's backbone is sharded with torch's
``fully_shard`` (FSDP2): each repeated block (``BasicTransformerBlock``, ``ResnetBlock2D``, the SD3/FLUX transformer
blocks) is one unit, then the root. Parameters become ``DTensor``s sharded along dim 0, so the student, fake score
and GAN head of DMD2 each cost ``1/world`` of a copy per rank, with their gradients and Adam states. The frozen
teacher is not sharded (it has no gradients or optimizer state).

The loop calls ``fully_shard`` itself rather than ``accelerator.prepare_model``, so the same code path runs under an
accelerate FSDP config on GPUs and under a plain multi-process launch on CPU (gloo), where accelerate does not offer
FSDP; that is how the tests exercise it.

Checkpoints are sharded: each rank saves the local shard of every sharded tensor (``to_local``). FSDP2 splits dim 0
like ``torch.chunk``, so concatenating the ranks' shards in rank order rebuilds the full tensor
(``consolidate``): export and sampling read a sharded checkpoint in any number of processes; exact resume needs the
world size it was written with.
"""

from __future__ import annotations

import torch
from torch import nn


#: the repeated blocks that become FSDP units, by class name (UNet2D/UNet2DCondition resnets and attention blocks,
#: SD3's joint blocks, FLUX's double- and single-stream blocks)
BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "JointTransformerBlock", "FluxTransformerBlock",
          "FluxSingleTransformerBlock")


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for sharded ones: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` in the layout of ``like``: its local shard when ``like`` is sharded (a collective
    when ``t`` is not sharded alike: every rank must call it), the whole tensor otherwise."""
    if not is_sharded(like):
        return full(t)
    if is_sharded(t) and t.placements == like.placements and t.device_mesh == like.device_mesh:
        return t.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full(t), like.device_mesh, like.placements).to_local()


def shard_backbone(backbone: nn.Module, blocks: tuple[str, ...] = BLOCKS) -> nn.Module:
    """``fully_shard`` every block of the named classes, then the root; in place (returns ``backbone``)."""
    from torch.distributed.fsdp import fully_shard

    for module in backbone.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(backbone)
    return backbone


def load_local(target: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy saved shards (or whole tensors) into ``target``'s tensors in place, shard for shard."""
    if target.keys() != saved.keys():
        missing, extra = sorted(target.keys() - saved.keys()), sorted(saved.keys() - target.keys())
        raise KeyError(f"missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, value in target.items():
            dest = local(value)
            if dest.shape != saved[key].shape:
                raise ValueError(f"{key}: shard shape {tuple(saved[key].shape)} != {tuple(dest.shape)}")
            dest.copy_(saved[key])


def optimizer_state_local(state: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor replaced by this rank's shard."""
    return {**state, "state": {i: {k: local(v) if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of local shards: turn the state tensors of sharded parameters back into DTensors
    laid out like their parameter (Adam's moments are elementwise, so they share the parameter's sharding)."""
    DTensor = _dtensor()
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape \
                    and value.dim() > 0:
                state[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                shape=param.shape, stride=param.stride())


def consolidate(shards: list[dict[str, torch.Tensor]], sharded_keys: list[str]) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank shards (rank order): ``sharded_keys`` are concatenated along dim 0, the rest
    (buffers, kept whole on every rank) are taken from rank 0."""
    out = dict(shards[0])
    for key in sharded_keys:
        out[key] = torch.cat([s[key] for s in shards], dim=0)
    return out
