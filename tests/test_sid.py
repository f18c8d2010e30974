"""SiD (methods/sid.py, terms.sid_loss): the generator's gradient runs through the inputs of the teacher and the fake
score (checked by hand on Gaussian scores, against DMD's stop-gradient surrogate), their weights take none, the loss
vanishes when the fake score is the teacher, NaN rows go, SiD-LSG's guidance scales reach their calls; bad input."""

import pytest
import torch

from stepdistill.config import ConfigError, build_recipe
from stepdistill.denoisers import GMMDenoiser
from stepdistill.methods import sid as sid_module
from stepdistill.methods.base import Batch
from stepdistill.methods.terms import dm_loss, sid_loss
from stepdistill.mixture import GaussianMixture
from stepdistill.schedules import VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER
from stepdistill.train import Trainer

from ._recipes import _apply, gmm_recipe


def _gaussian_score(mean, std):
    """The exact denoiser of one Gaussian, ``x0 = mu + k (x_t - a mu)``, ``k = a std^2 / (a^2 std^2 + s^2)``."""
    schedule = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    return GMMDenoiser(GaussianMixture(torch.tensor([mean], dtype=torch.float64), [std]), schedule)


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_the_generator_gradient_runs_through_both_scores_inputs_as_computed_by_hand(alpha):
    real, fake = _gaussian_score([0.3, -0.2], 0.5), _gaussian_score([0.1, 0.2], 0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    n = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    sch = real.schedule
    x_t = sch.add_noise(x, n, t)
    y_r, y_f = real(x_t, t).x0, fake(x_t, t).x0
    loss, _ = sid_loss(x, y_r, y_f, alpha)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    # by hand: dy/dx = a k I for each score; w = mean|x - y_r| held constant; the loss is a mean over D = 2 elements
    a, s = float(sch.alpha(t[0])), float(sch.sigma(t[0]))
    k_r, k_f = (a * 0.5**2 / (a**2 * 0.5**2 + s**2)), (a * 0.7**2 / (a**2 * 0.7**2 + s**2))
    with torch.no_grad():
        d, w = y_r - y_f, (x - y_r).abs().mean(1, keepdim=True)
        by_hand = (a * (k_r - k_f) * ((y_r - x) - alpha * d) + d * (a * k_r - 1 - alpha * a * (k_r - k_f))) / (2 * w)
    torch.testing.assert_close(grad, by_hand, rtol=1e-6, atol=1e-9)  # w in float32, as the official code
    # DMD's surrogate stops the gradient at the scores: (fake - real) / mean|x - real| per element, another direction
    x2 = x.detach().clone().requires_grad_(True)
    dm, _ = dm_loss(x2, y_r.detach(), y_f.detach())
    (dmd_grad,) = torch.autograd.grad(dm.sum(), x2)
    assert float((grad - dmd_grad).abs().max()) > 1e-3


def test_nan_rows_are_dropped_and_counted():
    x = torch.randn(4, 3, requires_grad=True)
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    real[2, 1] = float("nan")
    loss, logs = sid_loss(x, real, fake, 1.2)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and float(logs["nan_rows"]) == 1


def _sid(tmp_path, **overrides):
    recipe = _apply(gmm_recipe(), {"teacher": {"tiny": "unet2d"}, "student.init": "teacher",
                                   "method": {"name": "sid"}, "data": {"batch_size": 4}, "train.max_steps": 2,
                                   **overrides})
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


def _generator_batch(trainer, b=4):
    shape = trainer.teacher.sample_shape
    return Batch(x0=torch.zeros(b, *shape), cond=None, generator=torch.Generator().manual_seed(0))


def test_the_loss_vanishes_while_the_fake_score_is_the_teacher_and_no_score_weight_takes_gradient(tmp_path):
    trainer = _sid(tmp_path)
    method, nets = trainer.method, trainer.nets
    method.update_schedule(0, nets)
    out = method(phase="student", nets=nets, batch=_generator_batch(trainer))
    assert float(out.loss.detach().abs().max()) < 1e-6  # fake score = teacher: y_r = y_f up to the kernels chosen
    trainer.train()  # both phases run; the loop freezes the fake score during the generator phase
    for p in nets.teacher.parameters():
        assert p.grad is None
    trainer2 = _sid(tmp_path / "again")
    trainer2.method.update_schedule(0, trainer2.nets)
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in trainer2.nets["fake_score"].backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer2._run_phase("student")
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in trainer2.nets["fake_score"].parameters())
    assert all(p.grad is None for p in trainer2.nets.teacher.parameters())


def test_lsg_guidance_scales_reach_the_teacher_the_fake_score_and_its_training(monkeypatch, tmp_path):
    trainer = _sid(tmp_path, **{"method.guidance_real": 4.5, "method.guidance_fake": 2.0,
                                "method.guidance_fake_train": 1.5})
    method, nets = trainer.method, trainer.nets
    assert method.dmd.cond_dropout == 0.1  # SiD-LSG's context dropout once a fake-score scale is not 1
    calls = []

    def recording(denoiser, x_t, t, cond, w):
        calls.append((denoiser, w))
        return denoiser(x_t, t, cond)

    monkeypatch.setattr(sid_module, "guided", recording)
    monkeypatch.setattr("stepdistill.methods.dmd.guided", recording)
    method.update_schedule(0, nets)
    method("student", nets, _generator_batch(trainer))
    list(method("fake_score", nets, _generator_batch(trainer)))
    assert [(d is nets.teacher, d is nets["fake_score"], w) for d, w in calls] == [
        (True, False, 4.5), (False, True, 2.0), (False, True, 1.5)]


@pytest.mark.parametrize("overrides,message", [
    ({"method.alpha": 0.0}, "method.alpha must be in \\(0, 2\\]"),
    ({"method.alpha": 2.5}, "method.alpha must be in \\(0, 2\\]"),
    ({"method.guidance_fake": 0.5}, "method.guidance_fake .* must be >= 1"),
    ({"method.guidance_real": 0.5}, "guidance scales >= 1"),
    ({"method.init_time": 1.5}, "method.init_time must be in \\(0, 1\\]"),
    ({"method.name": "sida", "data": {"source": "gaussian", "batch_size": 4}},
     "GAN term .*method.gan_real: teacher uses the teacher's samples.* needs a real-data source"),
    ({"method.name": "sida", "method.gan_real": "prompts"}, "method.gan_real must be one of"),
])
def test_bad_sid_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _sid(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_data_free_sida_classifies_cached_teacher_samples_as_real(tmp_path):
    """SiDA without data (``gan_real: teacher``): the head's reals are the teacher's cached ODE samples, never the
    batch's stand-in ``x0``, held once when the regression warm-up uses the same pairs; the run trains."""
    settings = {"method.name": "sida", "method.gan_real": "teacher", "method.num_pairs": 8, "method.pair_steps": 2,
                "method.regression_warmup": 1, "data": {"source": "gaussian", "batch_size": 4}}
    trainer = _sid(tmp_path, **settings)
    method, nets = trainer.method, trainer.nets
    reals = method.dmd.gan.reals.pairs["target"]
    assert reals.shape == (8, *trainer.teacher.sample_shape) and not method.reads_data
    assert reals is method.dmd.ode.pairs["target"]
    method.update_schedule(0, nets)
    reals.fill_(7.0)  # marks the cached samples
    seen = []
    noised = method.dmd.gan.noised
    method.dmd.gan.noised = lambda x, *args: seen.append(x.detach().clone()) or noised(x, *args)
    list(method("fake_score", nets, _generator_batch(trainer)))
    fakes, real = seen  # the head's inputs: noised fakes, then noised reals
    assert bool((real == 7.0).all()) and not bool((fakes == 7.0).any())
    method.dmd.gan.noised = noised
    trainer.train()


def test_with_lora_roles_the_generator_phase_reaches_only_the_students_adapter(tmp_path):
    """On one frozen base the generator loss runs through the teacher (adapters off) and the fake score's adapter: the
    student's adapter moves, the fake score's takes no gradient, the base none."""
    trainer = _sid(tmp_path, **{"roles.mode": "lora", "roles.rank": 4, "roles.alpha": 4.0})
    nets = trainer.nets
    trainer.method.update_schedule(0, nets)
    with torch.no_grad():  # the fake score's adapter away from zero, so that it differs from the teacher
        for p in nets["fake_score"].trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = [p.detach().clone() for p in nets.student.trainable_parameters()]
    trainer._run_phase("student")
    assert any(not torch.equal(a, p) for a, p in zip(student, nets.student.trainable_parameters()))
    assert all(p.grad is None for p in nets["fake_score"].trainable_parameters())
    assert all(p.grad is None for n, p in nets.student.backbone.named_parameters() if "lora_" not in n)


def test_a_one_step_generator_samples_sid_lsgs_untrained_renoising_baseline_at_more_steps():
    from types import SimpleNamespace

    from stepdistill.methods import METHODS

    method = METHODS["sid"](init_time=0.625)
    method.update_schedule(0, SimpleNamespace(student=SimpleNamespace(
        schedule=VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER))))
    assert method.grid_for(1).times == (0.625,) and method.grid_for(1).transition == "ddim"
    two = method.grid_for(2)
    assert two.times == (0.625, 0.3125) and two.transition == "renoise"  # t_init (1 - i / k), on the timesteps
    with pytest.raises(ValueError, match="samples its trained grid only"):
        multi = METHODS["sid"](student_steps=4)
        multi.update_schedule(0, SimpleNamespace(student=SimpleNamespace(
            schedule=VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER))))
        multi.grid_for(2)


def test_the_partials_are_autograds_of_the_loss():
    from stepdistill.methods.terms import sid_partials

    g = torch.Generator().manual_seed(1)
    x, real, fake = (torch.randn(5, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    loss, _ = sid_loss(x, real, fake, 1.2)
    grads = torch.autograd.grad(loss.sum(), (real, fake, x))
    g_real, g_fake, g_x, keep = sid_partials(x.detach(), real.detach(), fake.detach(), 1.2)
    for ours, auto in zip((g_real, g_fake, g_x), grads):
        torch.testing.assert_close(ours, auto)
    assert keep.all()


def test_the_sequential_backward_gives_the_joint_gradient(tmp_path):
    """``backward: sequential`` (one score network at a time) moves the generator as the joint backward does."""
    grads = {}
    for mode in ("joint", "sequential"):
        trainer = _sid(tmp_path / mode, **{"method.backward": mode, "method.alpha": 1.2})
        nets = trainer.nets
        trainer.method.update_schedule(0, nets)
        torch.manual_seed(0)
        with torch.no_grad():  # the same perturbed fake score in both runs
            for p in nets["fake_score"].backbone.parameters():
                p.add_(0.01 * torch.randn_like(p))
        nets["fake_score"].requires_grad_(False)  # as the loop freezes it in the generator phase
        out = trainer.method("student", nets, _generator_batch(trainer))
        out.loss.mean().backward()
        grads[mode] = [p.grad.clone() for p in nets.student.backbone.parameters() if p.grad is not None]
        assert all(p.grad is None for p in nets["fake_score"].parameters())
    assert len(grads["joint"]) == len(grads["sequential"]) > 0
    for a, b in zip(grads["joint"], grads["sequential"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_regression_warm_up_runs_before_sid_in_its_order():
    from stepdistill.methods import METHODS

    method = METHODS["sid"](regression_warmup=2)
    warm, sid = ("regression", "fake_score"), ("fake_score", "student")
    assert [method.active_phases(s, {}) for s in range(4)] == [warm, warm, sid, sid]
    assert METHODS["sid"]().active_phases(0, {"student": 2}) == ("fake_score", "student")
    assert METHODS["sid"]().active_phases(1, {"student": 2}) == ("fake_score",)


def test_phased_multistep_matching_judges_each_step_in_its_own_band(tmp_path):
    """``multistep_matching: phased`` (DMD's): the generator loss of step ``k``'s output draws its time only in the
    band ``(t_{k+1}, t_k]`` of the student grid (the last step: down to 0), as DMD2's 4-step students do."""
    trainer = _sid(tmp_path, **{"method": {"name": "sid", "student_steps": 4, "multistep_matching": "phased"}})
    method, nets = trainer.method, trainer.nets
    method.update_schedule(0, nets)
    times = method.student_grid().times
    seen = set()
    for seed in range(12):
        batch = _generator_batch(trainer)
        batch.generator, batch.shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            _, k, t, _ = method._draw(nets, batch)
        lo = times[k + 1] if k + 1 < len(times) else 0.0
        assert bool(((t > lo) | (t >= lo) & (lo == 0)).all()) and bool((t <= times[k] + 1e-9).all()), (k, t, times)
        seen.add(k)
    assert len(seen) > 1  # several steps drawn
    logs = trainer.train()
    assert logs and all(torch.isfinite(torch.tensor(float(v))) for v in logs.values())
