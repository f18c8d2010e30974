"""``roles.mode: lora``: student and fake score as adapters on one frozen base, the teacher as that base with adapters
disabled (DESIGN.md §4)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError, build_recipe
from stepdistill.export import load_exported_student
from stepdistill.lora import lora_layers
from stepdistill.roles import frozen
from stepdistill.train import Trainer

from ._lora_checks import check_gradients_reach_only_the_owning_adapter
from ._recipes import dmd_recipe, gmm_recipe


pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"roles.mode": "lora", "roles.rank": 4, "roles.alpha": 8.0}  # alpha != rank: the scale is exercised


def _trainer(tmp_path, name="run", make=dmd_recipe, **overrides):
    return Trainer(build_recipe(make(**{**LORA, **overrides})), tmp_path / name, show_progress=False).setup()


def _perturb(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_one_base_and_the_teacher_is_the_base_without_adapters(tmp_path):
    ref = Trainer(build_recipe(dmd_recipe()), tmp_path / "ref", show_progress=False).setup()
    trainer = _trainer(tmp_path)
    nets = trainer.nets
    base = nets.teacher.backbone
    assert nets.student.backbone is base and nets["fake_score"].backbone is base and trainer.teacher.backbone is base
    assert len(lora_layers(base)) > 0 and not any(p.requires_grad for n, p in base.named_parameters()
                                                  if ".lora_" not in n)
    _perturb(nets.student.trainable_parameters(), 1)
    _perturb(nets["fake_score"].trainable_parameters(), 2)
    x, t = torch.randn(16, 2), torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        teacher, original = nets.teacher(x, t).x0_64, ref.teacher.denoiser(x, t).x0_64
        student, fake = nets.student(x, t).x0_64, nets["fake_score"](x, t).x0_64
    torch.testing.assert_close(teacher, original, rtol=0, atol=0)  # adapters disabled = the original weights
    assert (student - teacher).abs().max() > 1e-3 and (fake - teacher).abs().max() > 1e-3
    assert (student - fake).abs().max() > 1e-3
    # adapters only: the trainable share is small next to a full copy
    n_base = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    assert sum(p.numel() for p in nets.student.trainable_parameters()) < 0.2 * n_base


def test_gradients_reach_only_the_owning_adapter(tmp_path):
    trainer = _trainer(tmp_path)
    nets, method = trainer.nets, trainer.method
    _perturb(nets["fake_score"].trainable_parameters())  # a non-zero DM gradient
    check_gradients_reach_only_the_owning_adapter(nets, method, trainer.data.next(torch.Generator().manual_seed(0)))


def test_resume_is_exact_and_checkpoints_hold_adapters_only(tmp_path):
    full = _trainer(tmp_path, "full")
    full.train()
    _trainer(tmp_path, "part", **{"train.max_steps": 3}).train()
    Trainer(build_recipe(dmd_recipe(**LORA)), tmp_path / "part", resume=True, show_progress=False).setup().train()
    for role in ("student", "fake_score", "discriminator"):
        wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        wb = load_file(str(tmp_path / "part" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), role
        if role != "discriminator":
            assert all(".lora_A." in k or ".lora_B." in k for k in wa)  # the adapter, not the base


def test_export_merges_the_student_adapter(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    folder = trainer.export()
    exported, grid, _ = load_exported_student(folder, trainer.teacher)
    assert not lora_layers(exported.backbone)  # a plain UNet2DModel
    x, t = torch.randn(16, 2), torch.full((16,), grid.times[0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t).x0_64, trainer.nets.student(x, t).x0_64, rtol=0, atol=1e-5)


def test_progressive_distillation_with_lora_roles(tmp_path):
    recipe = gmm_recipe(**LORA)
    recipe["teacher"] = copy.deepcopy(dmd_recipe()["teacher"])
    recipe["student"] = {"init": "teacher"}
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    nets = trainer.nets
    # at the stage boundary (step 3) the stage teacher adapter received the student's adapter
    assert nets["stage_teacher"].role_state_dict().keys() == nets.student.role_state_dict().keys()
    assert not any(p.requires_grad for p in nets["stage_teacher"].trainable_parameters())


@pytest.mark.parametrize("overrides, match", [
    ({"roles.mode": "adapters"}, "roles.mode"),
])
def test_lora_bad_input(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _trainer(tmp_path, **overrides)


def test_an_ema_of_a_lora_role_is_a_frozen_adapter_that_follows_it(tmp_path):
    """``train.ema_decay`` with LoRA roles: the student EMA is a third adapter on the shared base, frozen, updated
    after each student update, checkpointed, and what samples and export use."""
    trainer = _trainer(tmp_path, **{"train.ema_decay": 0.5, "train.max_steps": 2, "train.update_every": {}})
    nets = trainer.nets
    ema, student = nets["student_ema"], nets.student
    assert ema.adapter == "student_ema" and ema.backbone is student.backbone
    assert not any(p.requires_grad for p in ema.trainable_parameters())
    start = {k: v.clone() for k, v in student.role_state_dict().items()}
    after = []  # the student adapter after each of its updates
    trainer.run.method.after_update = lambda phase, stepped: after.append(
        {k: v.clone() for k, v in student.role_state_dict().items()}) if "student" in stepped else None
    trainer.train()
    assert len(after) == 2 and trainer.ema_updates == {"student_ema": 2}
    for key, value in ema.role_state_dict().items():  # ema <- 0.5 ema + 0.5 student, twice, from the start
        expected = 0.5 * (0.5 * start[key] + 0.5 * after[0][key]) + 0.5 * after[1][key]
        torch.testing.assert_close(value, expected)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "student_ema.safetensors"))
    assert saved.keys() == ema.role_state_dict().keys()
    assert trainer.sampling_student() is ema


def test_lora_on_the_exact_gmm_teacher_is_refused(tmp_path):
    recipe = gmm_recipe(**LORA)  # exact oracle teacher: no weights to put adapters on
    with pytest.raises(ConfigError, match="needs a teacher with weights"):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, mode):
    # The student's backward recomputes its blocks after the teacher's and the (frozen) fake score's forwards: the
    # recompute must use the student's adapter and the forward's requires_grad flags (lora.consistent_checkpoint).
    grads = []
    for ckpt in (False, True):
        trainer = _trainer(tmp_path, f"{mode}-{ckpt}", **{"roles.mode": mode, "train.gradient_checkpointing": ckpt})
        nets = trainer.nets
        _perturb(nets["fake_score"].trainable_parameters())
        batch = trainer.data.next(torch.Generator().manual_seed(0))
        batch.generator = torch.Generator().manual_seed(1)
        with frozen([nets["fake_score"], nets["discriminator"]]):  # as the loop runs the student phase
            trainer.method("student", nets, batch).loss.mean().backward()
        grads.append([p.grad.clone() for p in nets.student.trainable_parameters()])
        assert all(p.grad is None for p in nets["fake_score"].trainable_parameters())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_teacher_fingerprint_ignores_the_role_adapters(tmp_path):
    # DMD's ODE-pair cache is keyed by the teacher's weights: LoRA roles on the same teacher must find the same key
    from stepdistill.pairs import weights_fingerprint

    full = Trainer(build_recipe(dmd_recipe()), tmp_path / "full", show_progress=False).setup()
    lora = _trainer(tmp_path)
    _perturb(lora.nets.student.trainable_parameters())
    assert weights_fingerprint(lora.nets.teacher) == weights_fingerprint(full.nets.teacher)




def test_a_run_read_back_merges_into_the_base_it_trained_on(tmp_path):
    """Reading a run back (``load_run``: sample, export, and the export of a sharded run) reloads the teacher and puts
    the adapter back on it; with a bf16 teacher the reloaded base is rounded as in training, so the merged weights
    equal those of the student in memory."""
    from stepdistill.run import load_run

    trainer = _trainer(tmp_path, **{"roles.teacher_dtype": "bfloat16", "train.max_steps": 1})
    trainer.train()
    ours = trainer.nets.student.plain_backbone().state_dict()
    theirs = load_run(tmp_path / "run").sampling_student().plain_backbone().state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
