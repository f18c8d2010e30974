"""Phased DMD (methods/phased_dmd.py, terms.subinterval_target; ISSUE 27): the subinterval target is ordinary
denoising at the clean end, the official velocity target on a flow, the same on a VP teacher through the schedule map,
the exact conditional score, and (Vincent) has the exact mixture denoiser as its regression; a phase's critic never
sees a time outside its band; only the phase's expert takes gradient; the schedule; the multi-expert pipeline equals
our sampler in a process that never imports stepdistill (K = 2 and 4, full and LoRA experts); bad input."""

import json

import numpy as np
import pytest
import torch

from stepdistill.config import ConfigError, build_recipe
from stepdistill.methods import METHODS
from stepdistill.methods.base import Batch
from stepdistill.methods.terms import subinterval_target
from stepdistill.mixture import GaussianMixture
from stepdistill.schedules import RectifiedFlow, VPCosine, map_time
from stepdistill.train import Trainer

from ._recipes import EXACT_GMM, GMM_2D, _apply, family_dmd_recipe, two_steps_and_a_resume
from .test_export import _consume, _expected


F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _draws(n=64, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=F64), torch.randn(n, dim, generator=g, dtype=F64), g


def test_the_target_is_ordinary_denoising_at_the_clean_end_and_the_official_velocity_on_a_flow():
    sch = RectifiedFlow()
    x_s, n, g = _draws()
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=F64)
    x_t, x0, eps = subinterval_target(x_s, sch, torch.zeros(64, dtype=F64), t, n)
    torch.testing.assert_close(x0, x_s)
    torch.testing.assert_close(eps, n)
    torch.testing.assert_close(eps - x0, n - x_s)  # flow matching's target
    s = 0.5 * t
    x_t, x0, eps = subinterval_target(x_s, sch, s, t, n)
    tc, sc = t[:, None], s[:, None]
    alpha = (1 - tc) / (1 - sc)
    beta = (tc**2 - alpha**2 * sc**2).sqrt()
    torch.testing.assert_close(x_t, alpha * x_s + beta * n)
    # LightX2V phased_dmd/math.py phased_velocity_target, written out
    official = -x_s / (1 - sc) + (tc + (1 - tc) * sc**2 / (1 - sc) ** 2) / beta * n
    torch.testing.assert_close(eps - x0, official)
    torch.testing.assert_close((1 - tc) * x0 + tc * eps, x_t)  # a consistent (x0, eps) pair


def test_the_vp_target_is_the_flow_target_through_the_schedule_map_and_the_exact_conditional_score():
    vp, rf = VPCosine(), RectifiedFlow()
    x_s, n, g = _draws()
    t = 0.3 + 0.6 * torch.rand(64, generator=g, dtype=F64)
    s = t * torch.rand(64, generator=g, dtype=F64)
    x_t, x0, eps = subinterval_target(x_s, vp, s, t, n)
    (t_rf, c_t), (s_rf, c_s) = map_time(t, vp, rf), map_time(s, vp, rf)
    x_t_rf, x0_rf, eps_rf = subinterval_target(c_s[:, None] * x_s, rf, s_rf, t_rf, n)
    torch.testing.assert_close(x_t_rf, c_t[:, None] * x_t)  # the same noisy point, in flow coordinates
    torch.testing.assert_close(x0_rf, x0)  # the same clean target and noise target
    torch.testing.assert_close(eps_rf, eps)
    # the score read from the target, -eps*/s_t, is the score of q(x_t | x_s) = N(alpha x_s, beta^2)
    a_t, s_t, a_s, s_s = (f(v)[:, None] for f, v in ((vp.alpha, t), (vp.sigma, t), (vp.alpha, s), (vp.sigma, s)))
    var = s_t**2 - (a_t / a_s) ** 2 * s_s**2
    point = x_t.clone().requires_grad_(True)
    logq = (-0.5 * (point - a_t / a_s * x_s) ** 2 / var).sum()
    (score,) = torch.autograd.grad(logq, point)
    torch.testing.assert_close(-eps / s_t, score)


def test_its_regression_on_the_noisy_point_is_the_exact_mixture_denoiser():
    """Vincent's identity: with x_s from the mixture's marginal at s, the target's residual against the exact denoiser
    at t is orthogonal to every function of x_t (here x_t, sin 3 x_t, the denoiser itself); treating x_s as clean data
    (a critic trained on phase outputs as if they were x0) is not."""
    mixture = GaussianMixture(torch.tensor(GMM_2D["means"], dtype=F64), 0.08)
    sch, n_pts = VPCosine(), 200_000
    g = torch.Generator().manual_seed(1)
    s, t = torch.tensor(0.4, dtype=F64), torch.tensor(0.6, dtype=F64)
    x0 = mixture.sample(n_pts, g)[0].to(F64)
    x_s = sch.alpha(s) * x0 + sch.sigma(s) * torch.randn(x0.shape, generator=g, dtype=F64)
    x_t, target, _ = subinterval_target(x_s, sch, s.expand(n_pts), t.expand(n_pts), torch.randn(
        x0.shape, generator=g, dtype=F64))
    exact = mixture.denoise(x_t, sch.alpha(t), sch.sigma(t))
    features = torch.cat([x_t, torch.sin(3 * x_t), exact], 1)

    def worst_z(residual):
        prod = residual[:, :, None] * features[:, None, :]
        return float((prod.mean(0).abs() / (prod.std(0) / n_pts**0.5)).max())

    assert worst_z(target - exact) < 4.5
    assert worst_z(x_s - exact) > 50


def _phased(tmp_path, **overrides):
    recipe = _apply({"seed": 0, "teacher": {"gmm": dict(GMM_2D)}, "method": {"name": "phased_dmd"},
                     "data": {"batch_size": 8}, "optim": {},
                     "train": {"max_steps": 2, "log_every": 1, "num_sample_images": 4},
                     "eval": {"num_samples": 8, "teacher_full_steps": 4}}, overrides)
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


def _batch(trainer, b=8, seed=0):
    return Batch(x0=torch.zeros(b, *trainer.teacher.sample_shape), cond=None,
                 generator=torch.Generator().manual_seed(seed), shared=torch.Generator().manual_seed(seed + 1))


def test_a_phase_critic_sees_only_its_band_and_only_the_phase_expert_takes_gradient(tmp_path):
    trainer = _phased(tmp_path, **{"method.num_phases": 4})
    method, nets = trainer.method, trainer.nets
    method.update_schedule(0, nets)
    assert method.student_grid().experts == ("student", "student_1", "student_2", "student_3")
    for k in range(4):
        start, end = method.phase_times(k)
        critic, seen = nets[method.critic(k)], []
        hook = critic.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
        for seed in range(3):
            method(f"fake_score@{k}", nets, _batch(trainer, 64, seed))
            method(f"student@{k}", nets, _batch(trainer, 64, seed))
        hook.remove()
        times = torch.cat(seen)
        assert float(times.max()) <= start + 1e-12
        assert float(times.min()) > end + (method.margin if end > 0 else 0.0) - 1e-12
        for role in method.sampling_roles():  # the loss of phase k reaches expert k only
            for p in nets[role].parameters():
                p.grad = None
        method(f"student@{k}", nets, _batch(trainer, 16)).loss.mean().backward()
        for role in method.sampling_roles():
            moved = any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in nets[role].parameters())
            assert moved == (role == method.expert(k)), (k, role)


def test_phases_alternate_in_blocks_of_the_student_ratio_or_all_run():
    method = METHODS["phased_dmd"](student_steps=4, num_phases=2)
    every = {"student": 2}
    assert [method.active_phases(s, every) for s in range(5)] == [
        ("student@0", "fake_score@0"), ("fake_score@0",), ("student@1", "fake_score@1"), ("fake_score@1",),
        ("student@0", "fake_score@0")]
    assert method.owner("student@1") == "student_1" and method.owner("fake_score@1") == "fake_score_1"
    assert method.owner("student") == ("student", "student_1")
    every_phase = METHODS["phased_dmd"](student_steps=4, num_phases=2, schedule="all", fake_scores="shared")
    assert every_phase.active_phases(0, {}) == ("student@0", "fake_score@0", "student@1", "fake_score@1")
    assert every_phase.owner("fake_score@1") == "fake_score"
    shared = METHODS["phased_dmd"](student_steps=4, num_phases=2, experts="shared")
    assert set(shared.roles()) == {"student", "fake_score", "fake_score_1"}


@pytest.mark.parametrize("overrides,message", [
    ({"method.phase_boundaries": [0.6]}, "0.6 is not a time of the student grid"),
    ({"method.num_phases": 5}, "5 phases for a 4-step student"),
    ({"method.num_phases": 3}, "do not split evenly"),
    ({"method.margin": 0.5}, "leaves phase 0 .* no time"),
    ({"method.student_steps": 8, "method.num_phases": 8}, "holds at most 4 experts, not 8"),
])
def test_bad_phased_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _phased(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [  # K = 2 with full experts: the contract test's own export round trip
    {"method.num_phases": 4, "train.ema_decay": 0.9},
    {"teacher": {"tiny": "unet2d"}, "student.init": "teacher", "data.batch_size": 2, "roles.mode": "lora",
     "roles.rank": 4, "roles.alpha": 4.0, "method.num_phases": 2},
], ids=["k4-ema", "unet2d-lora-k2"])
def test_the_experts_pipeline_reproduces_the_student(tmp_path, overrides):
    trainer = _phased(tmp_path, **overrides)
    trainer.train()
    grid = trainer.method.student_grid()
    if "train.ema_decay" in overrides:  # every expert samples by its own EMA
        assert {f"{role}_ema" for role in grid.roles()} <= set(trainer.nets.extra)
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["load_kwargs"]["trust_remote_code"] and meta["custom_pipeline"] == "experts.py"
    assert meta["experts"]["roles"] == list(grid.roles())
    images, stdout = _consume(folder, tmp_path)
    assert stdout.startswith("ExpertsPipeline")
    np.testing.assert_allclose(images, _expected(trainer), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_family_experts_pipeline_reproduces_the_lora_experts(tmp_path, family):
    """Two LoRA experts on a tiny SD1.5 (UNet) / FLUX (transformer, packed latents) teacher, merged into the experts
    pipeline's two backbones: ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)(prompts, **call)`` in a
    process that never imports stepdistill lands on our sampler's latents, the switch happening inside the stock
    loop."""
    from stepdistill.denoisers import pack_latents, unpack_latents
    from stepdistill.sampling import sample_student

    from ._recipes import stock_pipeline_latents
    from .test_families import CONSUMER, _first_two

    recipe = family_dmd_recipe(family, **{"method": {"name": "phased_dmd", "student_steps": 2, "num_phases": 2,
                                                     **({} if family == "flux" else {"guidance_scale": 3.0})},
                                          "train.max_steps": 4})  # each critic trains before its expert reads it
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["pipeline_class"] == f"Experts{trainer.teacher.family.pipeline}"
    assert not trainer.writes_lora()  # one LoRA file cannot hold experts that a stock pipeline would switch
    with pytest.raises(ValueError, match="export --lora: a student of 2 experts"):
        trainer.export_lora()
    prompts, noise, cond = _first_two(trainer)
    grid = trainer.method.student_grid()
    expected = sample_student(trainer.sampling_student(), noise, grid, cond=cond)
    one = sample_student(trainer.nets.student, noise, grid, cond=cond)  # expert 0 alone differs: the switch matters
    assert (one - expected).abs().max() > 1e-4
    fed = pack_latents(noise) if family == "flux" else noise
    consumer = CONSUMER.replace("from_pretrained(folder)", "from_pretrained(folder, trust_remote_code=True)")
    got, stdout = stock_pipeline_latents(consumer, folder, fed, prompts, tmp_path)
    got = unpack_latents(got, *noise.shape[2:]) if family == "flux" else got
    assert stdout.startswith(meta["pipeline_class"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


def test_the_gmm_recipe_runs_on_the_exact_mixture_resumes_exactly_and_exports(tmp_path):
    """``recipes/phased_dmd/gmm.yaml`` with the true mixture as teacher and fresh roles (``teacher.gmm.denoiser=exact
    student.init=new``): two steps, the same two steps as one then a resume, the experts pipeline."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "phased_dmd" / "gmm.yaml"
    full, rows = two_steps_and_a_resume(path, EXACT_GMM, tmp_path)
    assert rows[0] == rows[1] and {"loss/student@0", "loss/student@1"} <= set(rows[0][0]) | set(rows[0][1])
    assert json.loads((full.export() / "stepdistill.json").read_text())["pipeline_class"] == "ExpertsPipeline"
