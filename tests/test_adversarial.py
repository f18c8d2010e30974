"""Adversarial distillation (methods/adversarial.py, methods/lightning.py, nets/discriminator.py; ISSUE 28): each
feature source's maps on every tiny family; gradients reach the student (and the sample) but no frozen feature
network; hinge / NS losses and R1 against hand computations; LADD's logit-normal re-noising; Lightning's stage
hand-over and conditional / relaxed discriminator input; the gmm recipe on the exact mixture resumes exactly and
exports; bad input."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stepdistill.config import ConfigError, build_recipe
from stepdistill.methods import METHODS
from stepdistill.methods.base import Batch
from stepdistill.methods.terms import gan_critic_loss, gan_generator_loss, r1_penalty
from stepdistill.schedules import RectifiedFlow, VPDiscrete, map_time
from stepdistill.train import Trainer

from ._recipes import EXACT_GMM, _apply, family_recipe, two_steps_and_a_resume


ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_gan_losses_and_r1_equal_hand_computations():
    fake, real = torch.tensor([[0.3, -2.0], [1.5, 0.0]]), torch.tensor([[2.0, 0.5], [-0.7, 1.0]])
    torch.testing.assert_close(gan_generator_loss(fake, "hinge"), torch.tensor([1.7, -1.5]))
    torch.testing.assert_close(gan_generator_loss(fake, "ns"), F.softplus(-fake).sum(1))
    hinge = torch.tensor([max(0, 1.3) + max(0, -1.0) + max(0, -1.0) + max(0, 0.5),
                          max(0, 2.5) + max(0, 1.7) + max(0, 1.0) + max(0, 0.0)])
    torch.testing.assert_close(gan_critic_loss(fake, real, "hinge"), hinge)
    torch.testing.assert_close(gan_critic_loss(fake, real, "ns"), (F.softplus(fake) + F.softplus(-real)).sum(1))
    # R1 of D(x) = [sum(w1 * x^2), sum(w2 * x)]: grad of the sum = 2 w1 x + w2
    x = torch.randn(3, 4, requires_grad=True)
    w1, w2 = torch.randn(4), torch.randn(4)
    logits = torch.stack([(w1 * x**2).sum(1), (w2 * x).sum(1)], 1)
    r1 = r1_penalty(logits, x)
    torch.testing.assert_close(r1, ((2 * w1 * x + w2) ** 2).sum(1).detach())
    assert r1.requires_grad  # the penalty trains the heads
    with pytest.raises(ValueError, match="takes no gradient"):
        r1_penalty(logits, x.detach())


def test_ladd_renoises_at_logit_normal_times_mapped_by_snr():
    method = METHODS["ladd"](disc_time_mean=1.0, disc_time_std=1.0)
    rf = RectifiedFlow()
    t = method.disc_time(rf, 20000, torch.Generator().manual_seed(0))
    logit = torch.logit(t.clamp(1e-6, 1 - 1e-6))
    assert abs(float(logit.mean()) - 1.0) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    # on a VP teacher the same draws, at the same SNR, on its timesteps
    vp = VPDiscrete(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
    u = torch.sigmoid(1.0 + torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    expect = vp.snap(map_time(u.clamp(max=1 - 1e-6), rf, vp)[0]).clamp(min=vp.t_min, max=1.0)
    torch.testing.assert_close(method.disc_time(vp, 8, torch.Generator().manual_seed(1)), expect)


def _ladd(tmp_path, **overrides):
    recipe = _apply({"seed": 0, "teacher": {"tiny": "unet2d"}, "method": {"name": "ladd", "student_steps": 2,
                                                                            "num_pairs": 8, "pair_steps": 2},
                     "data": {"batch_size": 2}, "optim": {},
                     "train": {"max_steps": 2, "log_every": 1, "num_sample_images": 2},
                     "eval": {"num_samples": 4, "teacher_full_steps": 4}}, overrides)
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


def _batch(trainer, b=2, seed=0):
    cond = None
    if trainer.conditions is not None:
        cond = {k: v[:b].to(trainer.accelerator.device) for k, v in trainer.conditions.items()}
    return Batch(x0=torch.randn(b, *trainer.teacher.sample_shape), cond=cond,
                 generator=torch.Generator().manual_seed(seed), shared=torch.Generator().manual_seed(seed + 1))


SOURCES = [("sd15", "teacher"), ("sdxl", "teacher"), ("sd3", "teacher"), ("flux", "teacher"), ("unet2d", "teacher"),
           ("sd15", "encoder"), ("sdxl", "encoder"), ("unet2d", "encoder"), ("sd15", "dino"), ("unet2d", "dino")]


@pytest.mark.parametrize("tiny,source", SOURCES, ids=[f"{t}-{s}" for t, s in SOURCES])
def test_each_source_gives_its_maps_and_only_the_student_takes_the_generator_gradient(tmp_path, tiny, source):
    """Per-layer maps of the expected shapes; the student phase's loss reaches the student, through the feature
    network to the sample, but no frozen network (teacher, DINO, VAE) and no discriminator role gets a gradient."""
    method = {"name": "ladd", "source": source, "student_steps": 2, "num_pairs": 4, "pair_steps": 2,
              **({"dino_tiny": True} if source == "dino" else {})}
    if tiny == "unet2d":
        trainer = _ladd(tmp_path, method=method)
    else:
        recipe = family_recipe(tiny, method=method, optim={}, **{"roles.mode": "lora", "roles.rank": 4})
        trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    m, nets = trainer.method, trainer.nets
    x = torch.randn(2, *trainer.teacher.sample_shape)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    cond = _batch(trainer).cond
    feats = m.source(nets, x, t, cond)
    head = nets["discriminator"]
    assert (m.text_dim > 0) == (tiny != "unet2d")  # the heads see the prompt, sized from the null condition
    assert [f.shape[1] for f in feats] == m.source.channels(nets) and all(f.ndim == 4 for f in feats)
    if source != "dino":
        den = m.source.network(nets)
        assert len(feats) == len(den.feature_modules())  # every block (LADD)
        if tiny in ("sd3", "flux"):  # tokens back on the latent grid of patches
            patch = getattr(den, "inner", den).patch
            assert all(f.shape[2:] == (x.shape[-2] // patch, x.shape[-1] // patch) for f in feats)
    else:
        assert len(feats) == len(m.source.dino.layers) and feats[0].shape[1] == m.source.dino.hidden_size
    frozen = [p for name, p in nets.teacher.backbone.named_parameters() if ".lora_" not in name]
    if source == "dino":
        frozen += list(m.source.dino.parameters())
    with trainer_phase(trainer, "student"):
        out = m("student", nets, _batch(trainer))
        out.loss.mean().backward()
    student = list(nets.student.trainable_parameters())
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in student)
    assert all(p.grad is None for p in head.parameters())
    for role in m.source.trained_roles:
        assert all(p.grad is None for p in nets[role].trainable_parameters())
    assert all(p.grad is None for p in frozen)
    for p in student:
        p.grad = None
    with trainer_phase(trainer, "discriminator"):
        m("discriminator", nets, _batch(trainer)).loss.mean().backward()
    assert any(p.grad is not None for p in head.parameters()) and all(p.grad is None for p in student)


def trainer_phase(trainer, phase):
    """The loop's freezing of a phase's non-owners (``roles.frozen``)."""
    from stepdistill.roles import frozen

    owners = trainer._owners(phase)
    return frozen([trainer.nets[r] for r in trainer.trainable if r not in owners])


def test_add_distills_and_r1_trains_the_heads_on_reals(tmp_path):
    """ADD's student loss adds the teacher's score distillation; R1 (through the frozen teacher) is logged and its
    gradient reaches the heads."""
    trainer = _ladd(tmp_path, method={"name": "add", "source": "teacher", "student_steps": 2, "r1_weight": 1.0},
                    data={"source": "digits", "batch_size": 2}, teacher={"embedded": "digits"})
    out = trainer.method("student", trainer.nets, _batch(trainer))
    assert float(out.logs["loss_distill"]) > 0
    out = trainer.method("discriminator", trainer.nets, _batch(trainer))
    assert float(out.logs["r1"]) > 0


def test_the_gmm_recipe_runs_on_the_exact_mixture_resumes_exactly_and_exports(tmp_path):
    """``recipes/ladd/gmm.yaml`` with the true mixture as teacher and fresh roles: two steps, the same two steps as one
    then a resume, and the stock export."""
    path = ROOT / "recipes" / "ladd" / "gmm.yaml"
    full, rows = two_steps_and_a_resume(path, [*EXACT_GMM, "method.num_pairs=32", "method.pair_steps=4"], tmp_path)
    assert rows[0] == rows[1] and {"loss/student", "loss/discriminator"} <= set(rows[0][0])
    folder = full.export()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert json.loads((folder / "stepdistill.json").read_text())["method"] == "ladd"


@pytest.mark.parametrize("overrides,message", [
    ({"method": {"name": "ladd", "source": "dino", "dino_weights": "/nonexistent/dinov2"}}, "method.dino_weights"),
    ({"method": {"name": "ladd", "source": "encoder"}, "teacher": {"tiny": "sd3"}, "data.prompts": "SMOKE"},
     "SD3Transformer2DModel teacher .* has no encoder half"),
    ({"method": {"name": "add", "source": "teacher"}}, "needs real data|real samples"),
    ({"method": {"name": "ladd", "source": "nope"}}, "method.source must be one of"),
    ({"method": {"name": "ladd", "layers": "output", "source": "encoder"}}, "for method.source: teacher"),
])
def test_bad_adversarial_settings_are_one_line(tmp_path, overrides, message):
    from ._recipes import SMOKE_PROMPTS

    if overrides.get("data.prompts") == "SMOKE":
        overrides = {**overrides, "data.prompts": SMOKE_PROMPTS}
    with pytest.raises((ConfigError, ValueError), match=message) as err:
        _ladd(tmp_path, **overrides)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_unconditioned_gmm_heads_see_the_noise_level_and_labels_one_hot():
    from stepdistill.nets.discriminator import TIME_DIM, text_vector, time_features

    rf = RectifiedFlow()
    f = time_features(rf, torch.tensor([0.1, 0.9], dtype=torch.float64))
    assert f.shape == (2, TIME_DIM) and not torch.allclose(f[0], f[1])
    labels = text_vector({"class_labels": torch.tensor([0, 2])}, 4)
    torch.testing.assert_close(labels, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))


def _lightning(tmp_path, **method):
    recipe = {"seed": 0, "teacher": {"tiny": "unet2d"},
              "method": {"name": "lightning", "teacher_steps": 8, "stages": [4, 2], "mse_stages": 1,
                         "steps_per_stage": 2, "relaxed_steps": 1, **method},
              "data": {"batch_size": 2}, "optim": {},
              "train": {"max_steps": 4, "log_every": 1, "num_sample_images": 2},
              "eval": {"num_samples": 4, "teacher_full_steps": 4}}
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


def test_lightning_hands_each_stage_on_and_judges_x_s_given_x_t_then_relaxed(tmp_path):
    """The MSE stage runs the student alone; the adversarial stage's teacher is the previous stage's student (PD's
    hand-over); its heads see the maps of x_s beside those of x_t (conditional), then beside zeros (relaxed)."""
    trainer = _lightning(tmp_path)
    m, nets = trainer.method, trainer.nets
    every = trainer.recipe.train.update_every
    assert [m.active_phases(s, every) for s in range(4)] == [("student",)] * 2 + [("student", "discriminator")] * 2
    m.update_schedule(0, nets)
    assert m.pd.student_steps == 4 and not m.adversarial
    with torch.no_grad():  # the student moves during stage 0; at the boundary it becomes the stage teacher
        for p in nets.student.trainable_parameters():
            p.add_(0.01)
    m.update_schedule(2, nets)
    assert m.begin_step(2, nets) == ("student",)
    for key, value in nets.student.role_state_dict().items():
        assert torch.equal(nets["stage_teacher"].role_state_dict()[key], value)
    assert m.adversarial and m.pd.student_steps == 2 and not m.relaxed
    seen = []
    hook = nets["discriminator"].register_forward_pre_hook(
        lambda mod, args: seen.append([f.detach() for f in args[0]]))
    m("discriminator", nets, _batch(trainer))
    half = [f.shape[1] // 2 for f in seen[0]]
    assert all(float(f[:, h:].abs().max()) > 0 for f, h in zip(seen[0], half))  # x_t's maps
    m.update_schedule(3, nets)
    assert m.relaxed
    seen.clear()
    m("discriminator", nets, _batch(trainer))
    hook.remove()
    assert all(float(f[:, h:].abs().max()) == 0 and float(f[:, :h].abs().max()) > 0 for f, h in zip(seen[0], half))
    # the first student step of a stage starts from pure noise at t = 1
    x_t, t, s, real, jump, cond = m.jumps(nets, _batch(trainer, b=64))
    assert float(t.max()) == 1.0 and real.shape == x_t.shape


def test_lightning_discriminator_warms_up_alone_at_the_start_of_each_adversarial_stage(tmp_path):
    """``disc_warmup``: the first steps of an adversarial stage train only the heads (the student would otherwise
    move on a chance discriminator's noise); the MSE stage before it is untouched."""
    trainer = _lightning(tmp_path, stages=[4, 2, 1], disc_warmup=1, relaxed_steps=0)
    every = trainer.recipe.train.update_every
    assert [trainer.method.active_phases(s, every) for s in range(6)] == [
        ("student",), ("student",), ("discriminator",), ("student", "discriminator"),
        ("discriminator",), ("student", "discriminator")]


@pytest.mark.parametrize("method,message", [
    ({"disc_warmup": 3}, "method.disc_warmup must be in"),
    ({"stages": [4, 1]}, "method.stages must halve"),
    ({"stages": [3]}, "method.stages must halve"),
    ({"mse_stages": 2}, "at least one adversarial stage"),
])
def test_bad_lightning_settings_are_one_line(tmp_path, method, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _lightning(tmp_path, **method)
    assert not (tmp_path / "run").exists()
