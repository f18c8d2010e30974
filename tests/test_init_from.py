"""``train.init_from``: a new run that starts from another run's weights under new method settings (DMD2's SD1.5
stage 2 adds the GAN term and lowers the learning rate; METHODS.md §4), with fresh optimizers and step 0."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.config import build_recipe, dump_recipe
from stepdistill.train import RunError, Trainer

from ._recipes import dmd_recipe, gmm_recipe


pytestmark = pytest.mark.usefixtures("one_thread")

STAGE1 = {"method.gan_weight": 0.0}  # DMD2 stage 1: distribution matching only, no GAN head


def _trainer(out, make=dmd_recipe, **overrides):
    return Trainer(build_recipe(make(**overrides)), out, show_progress=False)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage_two_starts_from_stage_one_and_adds_the_gan_head(tmp_path, mode):
    roles = {"roles.mode": mode, "roles.rank": 4, "roles.alpha": 8.0} if mode == "lora" else {}
    stage1 = _trainer(tmp_path / "stage1", **STAGE1, **roles).setup()
    stage1.train()
    ckpt = tmp_path / "stage1" / "checkpoints" / "step-6"
    stage2 = _trainer(tmp_path / "stage2", **roles, **{"train.init_from": str(tmp_path / "stage1"),
                                                        "optim.student.lr": 5e-4}).setup()
    for role in ("student", "fake_score"):
        assert _same(stage2.nets[role].role_state_dict(), load_file(str(ckpt / f"{role}.safetensors")))
    head = stage2.nets["discriminator"]
    fresh = _trainer(tmp_path / "fresh", **roles).setup().nets["discriminator"]
    assert _same(head.role_state_dict(), fresh.role_state_dict())  # not in stage 1: built as in any new run
    assert stage2.step == 0 and all(not opt.state for opt in stage2.optimizers.values())
    assert stage2.optimizers["student"].param_groups[0]["initial_lr"] == 5e-4
    stage2.train()
    assert stage2.step == 6 and (tmp_path / "stage2" / "checkpoints" / "step-6").is_dir()
    # resuming stage 2 reads its own checkpoint, not stage 1's
    resumed = Trainer(build_recipe(dmd_recipe(**roles, **{"train.init_from": str(tmp_path / "stage1"),
                                                          "optim.student.lr": 5e-4, "train.max_steps": 8})),
                      tmp_path / "stage2", resume=True, show_progress=False).setup()
    mine = load_file(str(tmp_path / "stage2" / "checkpoints" / "step-6" / "student.safetensors"))
    assert resumed.step == 6 and _same(resumed.nets.student.role_state_dict(), mine)


def test_a_checkpoint_folder_works_and_derived_roles_follow_the_loaded_student(tmp_path):
    """Progressive distillation: the stage teacher is derived from the student, so it follows the loaded one."""
    _trainer(tmp_path / "a", make=gmm_recipe).setup().train()
    ckpt = tmp_path / "a" / "checkpoints" / "step-3"
    b = _trainer(tmp_path / "b", make=gmm_recipe, **{"train.init_from": str(ckpt)}).setup()
    student = load_file(str(ckpt / "student.safetensors"))
    assert _same(b.nets.student.role_state_dict(), student)
    assert _same(b.nets["stage_teacher"].role_state_dict(), student)


def test_an_ema_the_source_lacks_starts_at_the_loaded_student(tmp_path):
    _trainer(tmp_path / "a", make=gmm_recipe).setup().train()
    b = _trainer(tmp_path / "b", make=gmm_recipe, **{"train.init_from": str(tmp_path / "a"),
                                                      "train.ema_decay": 0.9}).setup()
    assert _same(b.nets["student_ema"].role_state_dict(), b.nets.student.role_state_dict())


@pytest.mark.parametrize("change, match", [
    ({"teacher.gmm.std": 0.2}, "same method, teacher and roles.mode"),
    ({"method.fake_score_target": "eps"}, None),  # the fake score's target is not its output parameterisation
    ({"method.student_prediction": "eps"}, "role 'student' predicts"),
])
def test_what_may_and_may_not_change(tmp_path, change, match):
    _trainer(tmp_path / "a", **STAGE1).setup().train()
    make = _trainer(tmp_path / "b", **{**change, "train.init_from": str(tmp_path / "a")})
    if match is None:
        make.setup()
    else:
        with pytest.raises(RunError, match=match):
            make.setup()
        assert not (tmp_path / "b").exists()  # refused before the run directory is made


def test_bad_sources_are_one_line_and_nothing_is_overwritten(tmp_path, capsys):
    _trainer(tmp_path / "a", **STAGE1).setup().train()
    old = tmp_path / "old"  # an earlier run that --overwrite would replace
    _trainer(old, **STAGE1).setup().train()
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(build_recipe(dmd_recipe())))
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "checkpoints" / "step-6" / "fake_score.safetensors").write_bytes(b"not safetensors")
    for source, match in [(tmp_path / "missing", "neither a run with a complete checkpoint nor a checkpoint"),
                          (tmp_path / "empty", "neither a run with a complete checkpoint nor a checkpoint"),
                          (tmp_path / "a", "corrupt or incompatible checkpoint")]:
        code = main(["distill", str(recipe), "--output-dir", str(old), "--overwrite", f"train.init_from={source}"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and match in err, err
        assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    state = json.loads((old / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["step"] == 6
