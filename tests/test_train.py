"""The training loop: exact resume, atomic checkpoints, the NaN/inf policy, run-directory protection, logs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import build_recipe
from stepdistill.methods import METHODS
from stepdistill.methods.base import LossOutput
from stepdistill.run import load_run
from stepdistill.train import SHARED_OFFSET, RunError, Trainer, lr_factor, rank_seed

from ._recipes import dmd_recipe, gmm_recipe


def _run(out, resume=False, **overrides):
    trainer = Trainer(build_recipe(gmm_recipe(**overrides)), out, resume=resume, show_progress=False).setup()
    trainer.train()
    return trainer


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/student"] for r in rows}


@pytest.mark.parametrize("ema", [{}, {"train.ema_decay": 0.5}], ids=["plain", "ema"])
def test_resume_equals_uninterrupted_run(tmp_path, ema):
    full = _run(tmp_path / "full", **ema)
    # Interrupted at step 3 (a stage boundary follows: with an EMA it becomes the student), then resumed to the end.
    _run(tmp_path / "part", **{"train.max_steps": 3, **ema})
    resumed = _run(tmp_path / "part", resume=True, **ema)
    assert resumed.step == full.step == 6
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        assert a[step] == b[step], f"loss differs at step {step}"
    for role in ("student", "stage_teacher", *(["student_ema"] if ema else [])):
        wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        wb = load_file(str(tmp_path / "part" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_holds_every_piece_and_incomplete_ones_are_ignored(tmp_path):
    trainer = _run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-6"
    names = {p.name for p in ckpt.iterdir()}
    assert {"student.safetensors", "stage_teacher.safetensors", "optim-student.pt", "rng-rank0.safetensors",
            "state.json"} <= names
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6
    # A crash mid-save leaves a .tmp folder (or a folder without state.json): never picked for resume.
    (tmp_path / "run" / "checkpoints" / ".step-9.tmp").mkdir()
    (tmp_path / "run" / "checkpoints" / "step-12").mkdir()
    assert trainer.latest_checkpoint() == ckpt


def test_run_directory_is_protected(tmp_path):
    _run(tmp_path / "run")
    before = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(RunError, match="already holds files"):
        _run(tmp_path / "run")
    assert (tmp_path / "run" / "log.jsonl").read_text() == before
    trainer = Trainer(build_recipe(gmm_recipe()), tmp_path / "run", overwrite=True, show_progress=False).setup()
    assert not (tmp_path / "run" / "log.jsonl").exists()  # replaced only when asked
    assert trainer.step == 0


def test_corrupt_and_incompatible_checkpoints_are_refused(tmp_path):
    _run(tmp_path / "run")
    with pytest.raises(RunError, match="different method/teacher"):
        _run(tmp_path / "run", resume=True, **{"teacher.gmm.std": 0.2, "train.max_steps": 8})
    (tmp_path / "run" / "checkpoints" / "step-6" / "student.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="corrupt or incompatible checkpoint"):
        _run(tmp_path / "run", resume=True, **{"train.max_steps": 8})


class _NaNAfter:
    """Wraps a method so that its loss turns NaN for the steps in ``bad``."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.calls = inner, set(bad), 0
        self.phases = inner.phases

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, phase, nets, batch):
        out = self.inner(phase, nets, batch)
        self.calls += 1
        if self.calls in self.bad:
            return LossOutput(out.loss * float("nan"), out.logs)
        return out


def test_nonfinite_losses_are_counted_skipped_and_abort(tmp_path, monkeypatch):
    recipe = build_recipe(gmm_recipe(**{"train.max_nonfinite": 3, "train.checkpoint_every": 0}))
    trainer = Trainer(recipe, tmp_path / "a", show_progress=False).setup()
    trainer.run.method = _NaNAfter(trainer.method, bad=[2])
    before = {k: v.clone() for k, v in trainer.nets.student.state_dict().items()}
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert rows[1]["nonfinite/student"] == 1.0  # step 2 was skipped and logged
    assert any(not torch.equal(before[k], v) for k, v in trainer.nets.student.state_dict().items())

    trainer = Trainer(recipe, tmp_path / "b", show_progress=False).setup()
    trainer.run.method = _NaNAfter(trainer.method, bad=[2, 3, 4])
    with pytest.raises(RunError, match="non-finite loss in 3 consecutive updates"):
        trainer.train()


class _NaNPhase(_NaNAfter):
    """A method whose loss in ``phase`` is always NaN (the other phases stay finite)."""

    def __init__(self, inner, phase):
        super().__init__(inner, bad=[])
        self.phase = phase

    def __call__(self, phase, nets, batch):
        out = self.inner(phase, nets, batch)
        return LossOutput(out.loss * float("nan"), out.logs) if phase == self.phase else out


def test_a_phase_whose_every_update_is_skipped_aborts_though_others_update(tmp_path):
    """DMD2: the critic's finite updates must not reset the student's streak of skipped ones."""
    recipe = build_recipe(dmd_recipe(**{"train.max_nonfinite": 3, "train.update_every": {}}))
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    trainer.run.method = _NaNPhase(trainer.method, "student")
    with pytest.raises(RunError, match="3 consecutive updates of phase 'student'"):
        trainer.train()


def test_a_skipped_student_update_leaves_the_ema_alone(tmp_path):
    recipe = build_recipe(gmm_recipe(**{"train.max_nonfinite": 3, "train.ema_decay": 0.5, "train.max_steps": 1,
                                        "train.checkpoint_every": 0}))
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    with torch.no_grad():  # an EMA apart from the student, so that an update would move it
        for p in trainer.nets["student_ema"].trainable_parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in trainer.nets["student_ema"].role_state_dict().items()}
    trainer.run.method = _NaNPhase(trainer.method, "student")
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.nets["student_ema"].role_state_dict().items())


def test_resumed_log_rows_equal_the_uninterrupted_runs(tmp_path):
    """With update_every a row carries the latest value of a phase that did not run at that step; a resumed run
    carries them from the checkpoint."""
    overrides = {"train.update_every": {"student": 2}, "train.checkpoint_every": 3}
    Trainer(build_recipe(dmd_recipe(**overrides)), tmp_path / "full", show_progress=False).setup().train()
    Trainer(build_recipe(dmd_recipe(**{**overrides, "train.max_steps": 3})), tmp_path / "part",
            show_progress=False).setup().train()
    Trainer(build_recipe(dmd_recipe(**overrides)), tmp_path / "part", resume=True, show_progress=False).setup().train()

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "it_per_s"}
                for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert rows("full") == rows("part")


def test_lr_schedules():
    from stepdistill.config import OptimizerConfig

    cfg = OptimizerConfig(schedule="linear", period=10)
    assert lr_factor(0, cfg) == 1.0 and lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == 1.0  # restarts every period (each PD stage)
    cos = OptimizerConfig(schedule="cosine", warmup=2, period=12)
    assert lr_factor(0, cos) == pytest.approx(0.5) and lr_factor(7, cos) == pytest.approx(0.5)
    # without a period, a schedule anneals over the role's optimizer steps in the run (not a silent constant)
    run = OptimizerConfig(schedule="cosine", warmup=2)
    assert lr_factor(7, run, 12) == pytest.approx(0.5) and lr_factor(12, run, 12) == pytest.approx(0.0)
    assert lr_factor(7, run) == 1.0  # no total known: constant after warmup


def test_logs_and_sample_grids_are_written(tmp_path):
    _run(tmp_path / "run", **{"train.sample_every": 3})
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss/student", "grad_norm/student", "lr/student", "it_per_s", "schedule/stage"} <= rows[-1].keys()
    assert (tmp_path / "run" / "samples" / "step-3.png").exists()
    assert (tmp_path / "run" / "samples" / "step-6.png").exists()
    assert "method" in (tmp_path / "run" / "config.yaml").read_text()


def test_registry_entries_follow_the_interface():
    for name, cls in METHODS.items():
        method = cls()
        owned = [(o,) if isinstance(o, str) else o for o in (method.owner(p) for p in method.phases)]
        assert method.phases and all(set(o) <= set(method.roles()) for o in owned), name  # one role or several


def test_resumed_finished_run_reports_the_final_grid(tmp_path):
    """Python API: a resumed, finished run exports the last stage's grid without training further."""
    _run(tmp_path / "run")
    before = (tmp_path / "run" / "log.jsonl").read_text()
    trainer = Trainer(build_recipe(gmm_recipe()), tmp_path / "run", resume=True, show_progress=False).setup()
    assert trainer.method.student_grid().times == (1.0, 0.5)
    trainer.train()
    assert (tmp_path / "run" / "log.jsonl").read_text() == before
    meta = json.loads((trainer.export() / "stepdistill.json").read_text())
    assert meta["num_inference_steps"] == 2


def test_no_rank_draws_the_shared_stream():
    """Each rank's generator differs from every other rank's and from the stream all ranks draw alike (rank 12 used
    to get the shared stream's seed); ranks 0-11 keep the seeds their results were measured with."""
    seeds = [rank_seed(3, rank) for rank in range(64)]
    assert len(set(seeds)) == 64 and 3 * 1000 + SHARED_OFFSET not in seeds
    assert seeds[:12] == [3017 + rank for rank in range(12)]


def test_reading_a_finished_run_back_leaves_its_weights_alone(tmp_path):
    """A finished run is read back (sample / evaluate / export) with its curricula brought to its last step. That
    step (3 of 4, stages of 3) is a PD stage boundary, where the EMA is handed to the student: bookkeeping must not
    redo it. An untrained run has a grid too."""
    recipe = {"train.max_steps": 4, "train.ema_decay": 0.5}
    _run(tmp_path / "run", **recipe)
    run = load_run(tmp_path / "run")
    for role in ("student", "student_ema"):  # the roles a run is read back with
        saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-4" / f"{role}.safetensors"))
        assert all(torch.equal(v, saved[k]) for k, v in run.nets[role].role_state_dict().items()), role
    assert run.step == 4 and "stage_teacher" not in run.nets
    fresh = Trainer(build_recipe(gmm_recipe()), tmp_path / "new", show_progress=False).setup()
    assert fresh.method.student_grid().times == (1.0, 0.75, 0.5, 0.25)  # the first stage: 4 steps of 8


def test_a_run_read_back_at_a_stage_boundary_reports_its_checkpoints_grid(tmp_path):
    """Stopped at step 3 of 6 (stages of 3): the checkpoint holds the first stage's 4-step student, which the next
    step would hand on; reading it back must report that student's grid, not the next stage's."""
    _run(tmp_path / "run", **{"train.max_steps": 3})
    assert load_run(tmp_path / "run").grid.times == (1.0, 0.75, 0.5, 0.25)
