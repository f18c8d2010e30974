"""Declarative roles (``types.RoleSpec``, ``roles.py``): EMAs by decay or half-life, recipe EMAs, built networks,
the exact teacher's fresh roles, and the refusals."""

import pytest
import torch
import yaml
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError, build_recipe
from stepdistill.roles import build_nets, check_specs, with_recipe_roles
from stepdistill.teachers import load_gmm
from stepdistill.train import Trainer
from stepdistill.types import Nets, RoleSpec

from ._recipes import GMM_2D, gmm_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_decay_by_half_life_with_edm_rampup():
    assert RoleSpec(ema_of="student", decay=0.9).ema_decay(5) == 0.9
    halflife = RoleSpec(ema_of="student", halflife=100)
    assert halflife.ema_decay(1) ** 100 == pytest.approx(0.5)  # half the weight is gone after 100 updates
    ramped = RoleSpec(ema_of="student", halflife=100, rampup=0.05)  # EDM: at most 5% of the updates so far
    assert ramped.ema_decay(20) == pytest.approx(0.5)  # half-life 1 update after 20
    assert ramped.ema_decay(10_000) == halflife.ema_decay(1)
    for bad in ({}, {"decay": 0.9, "halflife": 10}, {"decay": 1.0}, {"halflife": 0}):
        with pytest.raises(ValueError):
            RoleSpec(ema_of="student", **bad)
    with pytest.raises(ValueError, match="set by build"):
        RoleSpec(init="build")  # a built role needs its builder


def test_a_recipe_ema_follows_its_source_with_its_half_life(tmp_path):
    recipe = gmm_recipe(**{"roles.ema": {"target": {"of": "student", "halflife": 2}}, "train.max_steps": 2,
                           "train.checkpoint_every": 0})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    start = {k: v.clone() for k, v in trainer.nets["target"].role_state_dict().items()}
    trainer.train()
    assert trainer.ema_updates == {"target": 2}
    assert any(not torch.equal(v, start[k]) for k, v in trainer.nets["target"].role_state_dict().items())
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "target.safetensors").exists()
    assert trainer.sampling_student() is trainer.nets.student  # only <role>_ema samples


@pytest.mark.parametrize("ema, match", [
    ({"t": {"of": "critic", "decay": 0.9}}, "roles.ema.t: follows 'critic', which is not a denoiser role"),
    ({"t": {"decay": 0.9}}, "roles.ema.t: give 'of'"),
    ({"t": {"of": "student", "decay": 0.9, "halflife": 3}}, "roles.ema.t: an EMA of 'student' needs exactly one"),
    ({"t": {"of": "student", "halflife": "abc"}}, "roles.ema.t: could not convert string to float"),
    ({"t": {"of": "student", "halflife": 10, "rampup": -1}}, "roles.ema.t: an EMA ramp-up must be positive"),
    ({"stage_teacher_ema": {"of": "student", "decay": 0.9}}, "must follow it, not 'student'"),
])
def test_bad_recipe_emas_are_one_line_and_write_nothing(tmp_path, capsys, ema, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(gmm_recipe(**{"roles.ema": ema})))
    assert main(["distill", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "run").exists()


def test_built_roles_are_any_module_and_see_the_roles_before_them():
    teacher = load_gmm(GMM_2D["means"], std=GMM_2D["std"], denoiser="exact")
    made = {}

    def head(nets: Nets) -> nn.Module:
        made["saw"] = sorted(nets.roles())
        return nn.Linear(2, 1)

    specs = {"student": RoleSpec(), "critic": RoleSpec(), "head": RoleSpec(build=head),
             "critic_ema": RoleSpec(ema_of="critic", decay=0.5)}
    nets = build_nets(teacher, specs)
    assert made["saw"] == ["critic", "student", "teacher"]
    assert [p.shape for p in nets["head"].trainable_parameters()] == [(1, 2), (1,)]
    assert not any(p.requires_grad for p in nets["critic_ema"].trainable_parameters())
    # the exact teacher has no weights: roles that would copy them start as fresh vector networks, all different
    student, critic = nets.student.role_state_dict(), nets["critic"].role_state_dict()
    assert any(not torch.equal(student[k], critic[k]) for k in student)
    with pytest.raises(ValueError, match="'ghost_ema' is an EMA of 'ghost'"):
        check_specs({"student": RoleSpec(), "ghost_ema": RoleSpec(ema_of="ghost", decay=0.5)})
    with pytest.raises(ValueError, match="'teacher' is the frozen teacher"):
        check_specs({"student": RoleSpec(), "teacher": RoleSpec()})
    assert "student_ema" in with_recipe_roles({"student": RoleSpec()}, 0.9)


def test_back_propagating_through_a_bf16_teacher_without_autocast_is_refused(tmp_path):
    from stepdistill.methods import METHODS
    from stepdistill.methods.dmd import DMD

    class ThroughTheTeacher(DMD):
        teacher_grad = True

    METHODS["_through_teacher"] = ThroughTheTeacher
    try:
        recipe = gmm_recipe(**{"roles.teacher_dtype": "bfloat16", "roles.mode": "lora"})
        recipe["teacher"]["gmm"] = {**GMM_2D, "denoiser": "mlp", "fit": {"steps": 50, "width": 16}}
        recipe["method"] = {"name": "_through_teacher"}
        recipe["student"] = {"init": "teacher"}
        recipe["optim"] = {}
        with pytest.raises(ConfigError, match="back-propagates through the teacher, whose bfloat16 weights"):
            Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
        assert not (tmp_path / "run").exists()
    finally:
        del METHODS["_through_teacher"]


def test_a_gan_head_reads_checkpoints_of_the_one_head_layout():
    """Checkpoints written before heads on several layers hold one head's keys unprefixed (``body.*``, ``out.*``)."""
    from stepdistill.nets.gan_head import BottleneckHead, GANHead

    old = BottleneckHead(8)
    head = GANHead([8])
    head.load_role_state_dict(old.state_dict())
    maps = [torch.randn(2, 8, 4, 4)]
    torch.testing.assert_close(head(maps)[:, 0], old(maps[0]))
