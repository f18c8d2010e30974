"""The command line: the happy paths, and every bad input of the foundation issue as one clear line + exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stepdistill.cli import main

from ._recipes import gmm_recipe


def _recipe_file(tmp_path, name="recipe.yaml", **overrides):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(gmm_recipe(**overrides)))
    return path


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("stepdistill: error: "), err
    return err[-1]


@pytest.mark.parametrize("overrides, message", [
    (["teacher.gmm=null", "teacher.pretrained=/no/such/teacher"], "teacher.pretrained: no such directory"),
    (["method.name=magic"], "method.name: unknown method 'magic'"),
    (["teacher.gmm=null", "teacher.tiny=sd99"], "teacher.tiny: unknown kind 'sd99'"),
    (["method.teacher_steps=2048", "method.final_steps=4"], "2048 steps need as many distinct timesteps, the teacher "
                                                            "has 1024"),
    (["method.steps_per_stage=0"], "error: method.steps_per_stage must be >= 1, got 0"),  # the key, once
    (["train.colour=blue"], "train.colour: unknown key"),
    (["train.max_steps=abc"], "train.max_steps: expected an integer"),
    (["teacher.gmm.stds=[0.1]"], "teacher.gmm needs exactly one of 'std'"),
    (["teacher.gmm.std=abc"], "teacher.gmm: cannot build the mixture from these values"),
    (["data.source=image_folder", "data.path=."], "data.source image_folder needs an image teacher"),
])
def test_bad_recipe_inputs(tmp_path, capsys, overrides, message):
    recipe = _recipe_file(tmp_path)
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(tmp_path / "run"), *overrides])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_missing_and_malformed_recipe_files(tmp_path, capsys):
    assert "recipe file not found" in _error(capsys, ["distill", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    assert "not valid YAML" in _error(capsys, ["distill", str(bad)])


def test_distill_sample_eval_export_and_protection(tmp_path, capsys):
    recipe, run = _recipe_file(tmp_path), tmp_path / "run"
    assert main(["distill", str(recipe), "--output-dir", str(run)]) == 0
    assert (run / "pipeline" / "stepdistill.json").exists()
    log_before = (run / "log.jsonl").read_text()

    # An output directory holding an earlier run is never overwritten without --overwrite.
    assert "already holds files" in _error(capsys, ["distill", str(recipe), "--output-dir", str(run)])
    assert (run / "log.jsonl").read_text() == log_before

    # --resume of a finished run with a larger budget continues; an incompatible recipe is refused.
    other = _recipe_file(tmp_path, "other.yaml", **{"teacher.gmm.std": 0.3})
    config_before = (run / "config.yaml").read_text()
    assert "different method/teacher" in _error(capsys, ["distill", str(other), "--output-dir", str(run),
                                                         "--resume", "train.max_steps=8"])
    assert (run / "config.yaml").read_text() == config_before
    assert main(["distill", str(recipe), "--output-dir", str(run), "--resume", "train.max_steps=7"]) == 0
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 7

    for target in (run, run / "pipeline"):
        assert main(["sample", str(target), "--num-samples", "16", "--output", str(tmp_path / "s.npy")]) == 0
        capsys.readouterr()
        assert main(["eval", str(target), "--num-samples", "64"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert {"student", "teacher_same_nfe", "teacher_full"} <= metrics.keys()
        assert metrics["teacher_full"]["nfe"] == 8 if target == run else 64
        if target == run:  # the run's metrics.json and its pipeline's card; an exported folder is left alone
            assert json.loads((run / "metrics.json").read_text()) == metrics
        card = (run / "pipeline" / "README.md").read_text()  # the model card carries the run's own metrics
        assert "## Metrics" in card and json.dumps(metrics["student"]["nfe"]) in card
    assert main(["sample", str(run), "--num-samples", "16", "--output", str(tmp_path / "grid.png")]) == 0
    assert main(["export", str(run), "--output-dir", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model_index.json").exists()
    assert "DDPMPipeline has no load_lora_weights" in _error(capsys, ["export", str(run), "--lora"])


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    recipe, run = _recipe_file(tmp_path), tmp_path / "run"
    assert main(["distill", str(recipe), "--output-dir", str(run)]) == 0
    ckpt = run / "checkpoints" / "step-6"
    (ckpt / "optim-student.pt").write_bytes(b"\x00garbage")
    kept = (ckpt / "student.safetensors").read_bytes()
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(run), "--resume", "train.max_steps=9"])
    assert "corrupt or incompatible checkpoint" in line and "step-6" in line
    assert (ckpt / "student.safetensors").read_bytes() == kept  # nothing earlier touched
    (ckpt / "state.json").write_text("{not json")
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(run), "--resume"])
    assert "no complete checkpoint" in line or "corrupt checkpoint" in line


def test_module_entry_point_exit_code_and_single_line(tmp_path):
    recipe = _recipe_file(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "stepdistill", "distill", str(recipe), "method.name=magic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("stepdistill: error:")]
    assert len(errors) == 1 and "unknown method 'magic'" in errors[0]
    out = subprocess.run([sys.executable, "-m", "stepdistill", "ls"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "\n  progressive/digits\n" in out.stdout


def test_tiny_smoke_recipe_runs_from_the_command_line(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "progressive" / "tiny_unet2d.yaml"
    assert main(["distill", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "pipeline" / "stepdistill.json").read_text())
    assert meta["timesteps"] == [1023, 511] and (tmp_path / "run" / "samples" / "step-4.png").exists()


def test_what_is_already_on_disk_is_kept(tmp_path, capsys):
    """Nothing the user has is deleted or silently replaced: export targets, folders that are not runs, logs."""
    recipe, run = _recipe_file(tmp_path), tmp_path / "run"
    assert main(["distill", str(recipe), "--output-dir", str(run)]) == 0

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = _error(capsys, ["export", str(run), "--output-dir", str(mine)])
    assert "already exists; pass --overwrite" in line and (mine / "notes.txt").read_text() == "keep me"
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(mine), "--overwrite"])
    assert "not a stepdistill run; refusing to delete it" in line and (mine / "notes.txt").exists()
    assert "--resume and --overwrite" in _error(capsys, ["distill", str(recipe), "--output-dir", str(run),
                                                         "--resume", "--overwrite"])
    # --overwrite replaces an earlier export, never a folder of the user's own (it deleted notes.txt once)
    line = _error(capsys, ["export", str(run), "--output-dir", str(mine), "--overwrite"])
    assert "no exported pipeline or LoRA" in line and (mine / "notes.txt").read_text() == "keep me"
    assert main(["export", str(run), "--output-dir", str(tmp_path / "exported")]) == 0
    assert main(["export", str(run), "--output-dir", str(tmp_path / "exported"), "--overwrite"]) == 0
    assert (tmp_path / "exported" / "model_index.json").exists()

    # A resumed run keeps its method settings (the stage schedule and the exported grid hang on them).
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(run), "--resume", "train.max_steps=8",
                           "method.steps_per_stage=4"])
    assert "method.steps_per_stage is 4 here but the run was trained with 3" in line

    # Rows logged after the checkpoint by an interrupted run (and a line cut short) are dropped on resume.
    with (run / "log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 7, "loss/student": 1.0}) + "\n" + '{"step": 8, "lo')
    assert main(["distill", str(recipe), "--output-dir", str(run), "--resume", "train.max_steps=8"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_sample_arguments_and_a_checkpoint_that_is_json_but_not_a_state(tmp_path, capsys):
    recipe, run = _recipe_file(tmp_path), tmp_path / "run"
    assert main(["distill", str(recipe), "--output-dir", str(run)]) == 0
    assert "--output:" in _error(capsys, ["sample", str(run), "--output", str(tmp_path / "x.txt")])
    assert "--num-samples: must be in [1, 1000000]" in _error(capsys, ["sample", str(run), "--num-samples", "0",
                                                            "--output", str(tmp_path / "x.png")])
    assert "--steps: must be >= 1" in _error(capsys, ["sample", str(run), "--steps", "-2",
                                                      "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
    (run / "checkpoints" / "step-6" / "state.json").write_text("[1, 2]")
    line = _error(capsys, ["export", str(run)])
    assert line.startswith("stepdistill: error: checkpoint: corrupt checkpoint") or "no complete checkpoint" in line


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, capsys, monkeypatch, sig):
    """Ctrl-C or a scheduler's SIGTERM: the step under way completes, is checkpointed, and one line says how to go
    on; the resumed run ends where an uninterrupted one does."""
    import os
    import signal

    from safetensors.torch import load_file

    from stepdistill.train import Trainer

    recipe = _recipe_file(tmp_path)
    assert main(["distill", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0
    update = Trainer._follow_emas

    def signal_during_step_2(self, stepped):
        if self.step == 1:
            os.kill(os.getpid(), getattr(signal, sig))
        update(self, stepped)

    monkeypatch.setattr(Trainer, "_follow_emas", signal_during_step_2)
    run = tmp_path / "run"
    # as in a terminal (a background job, e.g. CI's, starts with SIGINT ignored, which the loop respects)
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, signal.SIG_DFL))}
    try:
        line = _error(capsys, ["distill", str(recipe), "--output-dir", str(run)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert f"stopped by {sig} at step 2" in line and "--resume" in line
    assert (run / "checkpoints" / "step-2" / "state.json").exists()
    monkeypatch.setattr(Trainer, "_follow_emas", update)
    assert main(["distill", str(recipe), "--output-dir", str(run), "--resume"]) == 0
    whole, resumed = (load_file(str(d / "checkpoints" / "step-6" / "student.safetensors"))
                      for d in (tmp_path / "whole", run))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """nohup and background jobs start with SIGINT ignored; training must not start catching it."""
    import signal

    from stepdistill.stop import StopRequest

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_demo_command_end_to_end_on_a_small_budget(tmp_path, capsys):
    """``stepdistill demo`` (the quickstart's first command) on a 40-step budget: train, export, evaluate, and the
    model card carries the metrics."""
    out = tmp_path / "demo"
    assert main(["demo", "train.max_steps=40", "method.steps_per_stage=10", "eval.num_samples=64",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Frechet distance" in printed and "classes covered by the student" in printed
    assert (out / "pipeline" / "model_index.json").exists() and (out / "metrics.json").exists()
    assert "## Metrics" in (out / "pipeline" / "README.md").read_text()


def test_eval_uses_the_recipes_eval_settings(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("stepdistill.evaluate")  # the package also exports a function of that name
    recipe, run = _recipe_file(tmp_path, **{"eval.seed": 7, "eval.teacher_full_steps": 16}), tmp_path / "run"
    assert main(["distill", str(recipe), "--output-dir", str(run)]) == 0
    seen = {}
    real = module.evaluate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate", spy)
    assert main(["eval", str(run), "--num-samples", "32"]) == 0
    assert seen == {"num_samples": 32, "seed": 7, "teacher_sampler": "ddim", "full_steps": 16}


def test_first_run_mishaps_are_one_line_and_lose_nothing(tmp_path, capsys, monkeypatch):
    """From a run of the README tried as a new user would: ``export --overwrite`` onto a folder of the user's own,
    a non-finite learning rate, a full disk while a checkpoint is written, and the demo on an existing run."""
    import errno
    import subprocess
    import sys

    import stepdistill.checkpoints as store

    recipe = _recipe_file(tmp_path, **{"train.max_steps": 2})
    assert main(["distill", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    line = _error(capsys, ["export", str(tmp_path / "run"), "--output-dir", str(notes), "--overwrite"])
    assert "holds files but no exported pipeline" in line and (notes / "notes.txt").read_text() == "mine"
    # an earlier export at the same place is replaced
    assert main(["export", str(tmp_path / "run"), "--output-dir", str(tmp_path / "out")]) == 0
    assert main(["export", str(tmp_path / "run"), "--output-dir", str(tmp_path / "out"), "--overwrite"]) == 0

    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(tmp_path / "nan"), "optim.student.lr=.nan"])
    assert "optim.student.lr: must be a positive number" in line and not (tmp_path / "nan").exists()

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "save_file", full_disk)
    line = _error(capsys, ["distill", str(recipe), "--output-dir", str(tmp_path / "run"), "--resume",
                           "train.max_steps=3"])
    assert "checkpoint step-3 could not be written" in line and "No space left on device" in line
    assert not (tmp_path / "run" / "checkpoints" / ".step-3.tmp").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "state.json").exists()
    monkeypatch.undo()

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "x").write_text("")
    line = _error(capsys, ["demo", "--output-dir", str(demo)])
    assert "pass --overwrite" in line and "--resume" not in line
    # --help answers without importing the training stack
    proc = subprocess.run([sys.executable, "-c", "import sys, stepdistill.cli; stepdistill.cli.build_parser(); "
                           "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_eval_of_an_exported_pipeline_leaves_it_unchanged(tmp_path, capsys):
    recipe = _recipe_file(tmp_path, **{"train.max_steps": 2})
    assert main(["distill", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--num-samples", "32"]) == 0
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "## Metrics" in card and "metrics:" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run" / "pipeline"), "--num-samples", "16"]) == 0
    assert "left unchanged" in capsys.readouterr().err
    assert (tmp_path / "run" / "pipeline" / "README.md").read_text() == card
    assert not (tmp_path / "run" / "pipeline" / "metrics.json").exists()
