"""Checkpoints of a run (DESIGN.md §6-7): save, resume, read for export, and start a new run from another's weights.

A ``Trainer`` mixin: it reads the trainer's roles, optimizers, generators and step. Each checkpoint is a folder
``checkpoints/step-N`` holding every checkpointed role as safetensors (per-rank shards for sharded roles), each
optimizer and LR schedule (``torch.load(weights_only=True)`` on the way back), every rank's RNG streams and
``state.json``, written last, which marks the folder complete. It is staged as ``.step-N.tmp``, flushed to disk and
renamed in, so a crash or a power cut leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .atomic import sync_dir, sync_tree
from .config import Recipe
from .methods import METHODS
from .sharding import consolidate, is_sharded, load_local, local, optimizer_state_local, reshard_optimizer_state


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says what and how to fix it."""


def config_fingerprint(recipe: Recipe) -> dict:
    """What a checkpoint must agree on to be resumed by this recipe."""
    return {"method": recipe.method.name, "teacher": recipe.to_dict()["teacher"], "roles": recipe.roles.mode}


class Checkpoints:
    """Checkpoint methods of ``Trainer`` (``train.py``)."""

    def _checkpointed_roles(self) -> list[str]:
        specs = self.method.roles()
        roles = [k for k, s in specs.items() if s.trainable or s.checkpointed]
        return roles + (["student_ema"] if "student_ema" in self.nets.extra else [])

    def save_checkpoint(self) -> Path:
        """Atomic: everything goes into ``.step-N.tmp`` and is renamed to ``step-N`` only when complete."""
        acc = self.accelerator
        root = self.dir / "checkpoints"
        tmp, final = root / f".step-{self.step}.tmp", root / f"step-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Every rank saves its own RNG streams.
        save_file({"data": self.generator.get_state(), "shared": self.shared_generator.get_state(),
                   "torch": torch.get_rng_state()},
                  str(tmp / f"rng-rank{acc.process_index}.safetensors"))
        rank = acc.process_index
        for role in self._checkpointed_roles():
            sharded = role in self._sharded_roles()
            if sharded or acc.is_main_process:  # sharded roles: every rank writes its own shard
                weights = self.nets[role].role_state_dict()
                keys = sorted(k for k, v in weights.items() if is_sharded(v))
                state = {k: local(v).detach().cpu().contiguous() for k, v in weights.items()}
                name = f"{role}-rank{rank}.safetensors" if sharded else f"{role}.safetensors"
                save_file(state, str(tmp / name), metadata={"sharded": json.dumps(keys)} if sharded else None)
        for role, opt in self.optimizers.items():
            sharded = role in self._sharded_roles()
            if sharded or acc.is_main_process:
                blob = {"optimizer": optimizer_state_local(opt.state_dict()),
                        "lr_scheduler": self.lr_schedulers[role].state_dict()}
                torch.save(blob, tmp / (f"optim-{role}-rank{rank}.pt" if sharded else f"optim-{role}.pt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak, "nonfinite_total":
                     self.nonfinite_total, "logs": {k: float(v) for k, v in self.logs.items()},
                     "world_size": acc.num_processes, "fingerprint": config_fingerprint(self.recipe),
                     "method": self.recipe.to_dict()["method"],
                     "sharded_roles": self._sharded_roles()}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            sync_tree(tmp)  # on disk before the name says "complete" (pruning then deletes the older checkpoint)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            sync_dir(root)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _sharded_roles(self) -> list[str]:
        ema = ["student_ema"] if "student_ema" in self.nets.extra else []
        return sorted([*self.trainable, *ema]) if self.sharded else []

    def _read_role(self, path: Path, role: str) -> dict[str, torch.Tensor]:
        """A role's whole weights from a checkpoint, consolidating per-rank shards when it was written sharded."""
        if (path / f"{role}.safetensors").exists():
            return load_file(str(path / f"{role}.safetensors"))
        from safetensors import safe_open

        world = json.loads((path / "state.json").read_text())["world_size"]
        files = [path / f"{role}-rank{r}.safetensors" for r in range(world)]
        with safe_open(str(files[0]), "pt") as f:
            keys = json.loads(f.metadata()["sharded"])
        return consolidate([load_file(str(f)) for f in files], keys)

    def _prune_checkpoints(self) -> None:
        keep = self.recipe.train.keep_checkpoints
        done = _complete_checkpoints(self.dir / "checkpoints")
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    @property
    def _reading(self) -> str:
        """How checkpoint errors name what the user asked for: resuming, or reading a run (export, sample)."""
        return "checkpoint" if self.readonly else "--resume"

    def latest_checkpoint(self) -> Path:
        done = _complete_checkpoints(self.dir / "checkpoints")
        if not done:
            raise RunError(f"{self._reading}: no complete checkpoint under {self.dir / 'checkpoints'}")
        return done[-1]

    def load_checkpoint(self, path: Path) -> None:
        """Restore every role, optimizer, LR schedule, RNG stream and the step; refuse incompatible checkpoints."""
        acc = self.accelerator
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{self._reading}: corrupt checkpoint {path}: state.json unreadable ({err})") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise RunError(f"{self._reading}: corrupt checkpoint {path}: state.json holds no step")
        if state.get("fingerprint") != config_fingerprint(self.recipe):
            raise RunError(f"{self._reading}: checkpoint {path} was written by a different method/teacher "
                           f"({state.get('fingerprint')}); it cannot be resumed by this recipe")
        saved, now = state.get("method"), json.loads(json.dumps(self.recipe.to_dict()["method"]))
        if saved is not None and saved != now:  # the stage schedule, grids and losses hang on them
            key = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))[0]
            raise RunError(f"{self._reading}: method.{key} is {now.get(key)!r} here but the run was trained with "
                           f"{saved.get(key)!r}; a resumed run keeps its method settings")
        if self.readonly:  # export / sample: the weights only, consolidated from shards if need be
            try:
                for role in self._checkpointed_roles():
                    self.nets[role].load_role_state_dict(self._read_role(path, role))
            except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same problem
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise RunError(f"corrupt or incompatible checkpoint {path}: {first}") from None
            self.step = int(state["step"])
            return
        if state.get("world_size") != acc.num_processes:
            raise RunError(f"{self._reading}: checkpoint {path} was written by {state.get('world_size')} process(es); "
                           f"exact resume needs the same number, got {acc.num_processes}")
        if state.get("sharded_roles", []) != self._sharded_roles():
            raise RunError(f"{self._reading}: checkpoint {path} has sharded roles {state.get('sharded_roles', [])}, "
                           f"this run shards {self._sharded_roles()}; resume with the same train.fsdp / launch config")
        rank, sharded = acc.process_index, self._sharded_roles()
        try:
            for role in self._checkpointed_roles():
                if role in sharded:
                    load_local(self.nets[role].role_state_dict(),
                               load_file(str(path / f"{role}-rank{rank}.safetensors")))
                else:
                    self.nets[role].load_role_state_dict(load_file(str(path / f"{role}.safetensors")))
            for role, opt in self.optimizers.items():
                name = f"optim-{role}-rank{rank}.pt" if role in sharded else f"optim-{role}.pt"
                blob = torch.load(path / name, weights_only=True, map_location="cpu")
                opt.load_state_dict(blob["optimizer"])
                reshard_optimizer_state(opt)
                self.lr_schedulers[role].load_state_dict(blob["lr_scheduler"])
            rng = load_file(str(path / f"rng-rank{acc.process_index}.safetensors"))
        except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same user-facing problem
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RunError(f"{self._reading}: corrupt or incompatible checkpoint {path}: {first}") from None
        self.generator.set_state(rng["data"])
        if "shared" in rng:  # checkpoints written before Batch.shared existed lack it
            self.shared_generator.set_state(rng["shared"])
        torch.set_rng_state(rng["torch"])
        self.step = int(state["step"])
        streak = state.get("nonfinite_streak", {})
        self.nonfinite_streak = dict(streak) if isinstance(streak, dict) else {}  # older checkpoints: one int
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.logs = dict(state.get("logs", {}))

    def _init_from(self, src: Path) -> None:
        """``train.init_from``: load the trainable roles and the student EMA that ``src`` holds (a run: its latest
        checkpoint). Roles it lacks start as usual (a GAN head added in DMD2's stage 2); roles derived from the student
        (progressive distillation's stage teacher, an EMA the checkpoint lacks) are derived from the loaded student.
        Method settings may differ from the source run's; method name, teacher and roles mode may not."""
        done = _complete_checkpoints(src / "checkpoints")
        path = src if (src / "state.json").is_file() else (done[-1] if done else None)
        if path is None:
            raise RunError(f"train.init_from: {src} is neither a run with a complete checkpoint nor a checkpoint")
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"train.init_from: corrupt checkpoint {path}: state.json unreadable ({err})") from None
        if not isinstance(state, dict) or state.get("fingerprint") != config_fingerprint(self.recipe):
            got = state.get("fingerprint") if isinstance(state, dict) else None
            raise RunError(f"train.init_from: checkpoint {path} was written for {got}; this recipe needs "
                           f"{config_fingerprint(self.recipe)} (same method, teacher and roles.mode)")
        specs, loaded = self.method.roles(), []
        saved = state.get("method")
        try:  # the source run's roles under its own method settings: a role must keep its parameterisation
            before = METHODS[saved["name"]](**{k: v for k, v in saved.items() if k != "name"}).roles()
        except Exception:  # noqa: BLE001 - checkpoints written before state.json recorded the method
            before = {}
        for role, spec in specs.items():
            if role in before and before[role].prediction != spec.prediction:
                raise RunError(f"train.init_from: role {role!r} predicts {before[role].prediction!r} in {path} but "
                               f"{spec.prediction!r} under this recipe's method settings")
        roles = [k for k, s in specs.items() if s.trainable] + (["student_ema"] if "student_ema" in self.nets.extra
                                                                 else [])
        try:
            for role in roles:
                if (path / f"{role}.safetensors").is_file() or (path / f"{role}-rank0.safetensors").is_file():
                    self.nets[role].load_role_state_dict(self._read_role(path, role))
                    loaded.append(role)
        except Exception as err:  # noqa: BLE001 - any unreadable/mismatched file is the same problem
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RunError(f"train.init_from: corrupt or incompatible checkpoint {path}: {first}") from None
        if "student" not in loaded:
            raise RunError(f"train.init_from: checkpoint {path} holds no student weights")
        derived = [k for k, s in specs.items() if s.init == "student" and k not in loaded]
        derived += [k for k in ("student_ema",) if k in roles and k not in loaded]
        for role in derived:
            self.nets[role].load_role_state_dict(self.nets.student.role_state_dict())
        if self.accelerator.is_main_process:
            fresh = sorted(set(specs) - set(loaded) - set(derived) - {"teacher"})
            tqdm.write(f"init_from {path}: loaded {', '.join(loaded)}" + (f"; from the student: {', '.join(derived)}"
                       if derived else "") + (f"; fresh: {', '.join(fresh)}" if fresh else ""))


def _complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` whose ``state.json`` was written (the last file, so: complete), oldest
    step first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))
