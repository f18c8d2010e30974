"""Checkpoint storage (DESIGN.md §6-7): the files of one run's checkpoints, and nothing about training.

Each checkpoint is a folder ``checkpoints/step-N`` holding every checkpointed role as safetensors (per-rank shards for
sharded roles), each optimizer and LR schedule (read back with ``torch.load(weights_only=True)``), every rank's RNG
streams and ``state.json``, written last, which marks the folder complete. It is staged as ``.step-N.tmp``, flushed to
disk and renamed in, so a crash or a power cut leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import sync_dir, sync_tree
from .sharding import consolidate, is_sharded, local, optimizer_state_local


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says what and how to fix it."""


def config_fingerprint(recipe) -> dict:
    """What a checkpoint must agree on to be resumed by (or read under) this recipe. ``teacher.gmm.normalize`` is left
    out: the data map it makes is recorded and checked on its own, so that a run made before the option is told how to
    continue (``run.check_compatible``)."""
    teacher = recipe.to_dict()["teacher"]
    if isinstance(teacher.get("gmm"), dict):
        teacher = {**teacher, "gmm": {k: v for k, v in teacher["gmm"].items() if k != "normalize"}}
    return {"method": recipe.method.name, "teacher": teacher, "roles": recipe.roles.mode}


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class CheckpointStore:
    """The checkpoints under ``root`` (``RUN/checkpoints``).

    Args:
        root: the folder holding ``step-N`` checkpoints.
        keep: complete checkpoints kept after a save (0: all).
    """

    def __init__(self, root: str | Path, *, keep: int = 0):
        self.root, self.keep = Path(root), keep

    # ------------------------------------------------------------------------------------------------ finding
    def complete(self) -> list[Path]:
        """The checkpoint folders whose ``state.json`` was written (the last file, so: complete), oldest step first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir()
                if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest(self, what: str = "--resume") -> Path:
        done = self.complete()
        if not done:
            raise RunError(f"{what}: no complete checkpoint under {self.root}")
        return done[-1]

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, step: int, *, roles: dict[str, dict[str, torch.Tensor]], sharded: list[str],
             optimizers: dict[str, dict], rng: dict[str, torch.Tensor], state: dict, rank: int,
             is_main_process: bool, barrier: Callable[[], None],
             any_rank: Callable[[bool], bool] = lambda failed: failed) -> Path:
        """Write checkpoint ``step`` atomically. Every rank calls it: sharded roles and their optimizers are written
        by every rank (its own shard), the rest by the main process, which writes ``state.json`` last and renames the
        staged folder in. ``roles`` maps a role to its state dict (sharded tensors as DTensors), ``optimizers`` a role
        to ``{"optimizer": state_dict, "lr_scheduler": state_dict}``. A write that fails on any rank (a full disk)
        fails on all of them together (``any_rank`` ORs a flag over the ranks), so none is left waiting."""
        tmp, final = self.root / f".step-{step}.tmp", self.root / f"step-{step}"

        def stage(write) -> None:
            error = None
            try:
                write()
            except (OSError, SafetensorError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
                error = err
            if any_rank(error is not None):
                barrier()
                if is_main_process:
                    shutil.rmtree(tmp, ignore_errors=True)
                why = first_line(error) if error is not None else "another process could not write its part"
                raise RunError(f"checkpoint step-{step} could not be written under {self.root} ({why}; a full "
                               "disk?); the earlier checkpoints are untouched: free space and --resume")

        def begin():
            if is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def parts():
            save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"))
            for role, weights in roles.items():
                if role in sharded or is_main_process:
                    keys = sorted(k for k, v in weights.items() if is_sharded(v))
                    tensors = {k: local(v).detach().cpu().contiguous() for k, v in weights.items()}
                    name = f"{role}-rank{rank}.safetensors" if role in sharded else f"{role}.safetensors"
                    meta = {"sharded": json.dumps(keys)} if role in sharded else None
                    save_file(tensors, str(tmp / name), metadata=meta)
            for role, blob in optimizers.items():
                if role in sharded or is_main_process:
                    blob = {**blob, "optimizer": optimizer_state_local(blob["optimizer"])}
                    name = f"optim-{role}-rank{rank}.pt" if role in sharded else f"optim-{role}.pt"
                    torch.save(blob, tmp / name)

        def complete():
            if is_main_process:
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
                sync_tree(tmp)  # on disk before the name says "complete" (pruning then deletes the older one)

        stage(begin)
        barrier()
        stage(parts)
        stage(complete)
        if is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            sync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ reading
    @staticmethod
    def read_state(path: Path, what: str = "--resume") -> dict:
        """``state.json`` of a checkpoint, refused in one line when unreadable or without a step."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{what}: corrupt checkpoint {path}: state.json unreadable ({err})") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise RunError(f"{what}: corrupt checkpoint {path}: state.json holds no step")
        return state

    @staticmethod
    def has_role(path: Path, role: str) -> bool:
        return (path / f"{role}.safetensors").is_file() or (path / f"{role}-rank0.safetensors").is_file()

    @staticmethod
    def read_role(path: Path, role: str) -> dict[str, torch.Tensor]:
        """A role's whole weights, consolidating per-rank shards when it was written sharded (any process count)."""
        if (path / f"{role}.safetensors").exists():
            return load_file(str(path / f"{role}.safetensors"))
        from safetensors import safe_open

        world = json.loads((path / "state.json").read_text())["world_size"]
        files = [path / f"{role}-rank{r}.safetensors" for r in range(world)]
        with safe_open(str(files[0]), "pt") as f:
            keys = json.loads(f.metadata()["sharded"])
        return consolidate([load_file(str(f)) for f in files], keys)

    @staticmethod
    def read_local_role(path: Path, role: str, rank: int, sharded: bool) -> dict[str, torch.Tensor]:
        """This rank's part of a role as written: its shard, or the whole weights."""
        return load_file(str(path / (f"{role}-rank{rank}.safetensors" if sharded else f"{role}.safetensors")))

    @staticmethod
    def read_optimizer(path: Path, role: str, rank: int, sharded: bool) -> dict:
        name = f"optim-{role}-rank{rank}.pt" if sharded else f"optim-{role}.pt"
        return torch.load(path / name, weights_only=True, map_location="cpu")

    @staticmethod
    def read_rng(path: Path, rank: int) -> dict[str, torch.Tensor]:
        return load_file(str(path / f"rng-rank{rank}.safetensors"))
