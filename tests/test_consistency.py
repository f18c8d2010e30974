"""Consistency distillation (CD, LCM, PCM, TCD): the boundary, the CFG-augmented teacher step against diffusers'
alphas, PCM's phase-edge target, the target network as an EMA that takes no gradient, and bad input."""

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from stepdistill.config import ConfigError, build_recipe
from stepdistill.denoisers import GMMDenoiser
from stepdistill.methods import METHODS
from stepdistill.methods.base import Batch, Nets
from stepdistill.mixture import GaussianMixture
from stepdistill.schedules import VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER
from stepdistill.train import Trainer

from ._recipes import gmm_recipe
from .conftest import SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")
SD = VPDiscrete.from_scheduler_config(SD_SCHEDULER)
SCHEDULE = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)  # the GMM and digits teachers' 1024 timesteps
MIX = GaussianMixture([[0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]], 0.1, [0.5, 0.3, 0.2])


def _method(name, schedule=SD, **kw):
    method = METHODS[name](**kw)
    method._use_schedule(schedule)
    return method


@pytest.mark.parametrize("name", ["cd", "lcm", "pcm", "tcd"])
def test_the_consistency_function_is_the_identity_at_the_boundary_and_at_its_own_end(name):
    method = _method(name, teacher_steps=50, student_steps=2)
    net = GMMDenoiser(MIX, SD)
    x = torch.randn(16, 2, dtype=torch.float64)
    t0 = method.ladder[0].expand(16)
    assert float(SD.model_time(t0[0])) == 0  # the boundary is timestep 0, where LCM's scalings are (1, 0)
    assert torch.equal(method.consistency_fn(net, x, t0, None, None), x)
    t = method.ladder[20].expand(16)
    assert torch.equal(method.consistency_fn(net, x, t, t.clone(), None), x)  # a jump to its own time stays put
    # elsewhere LCM's f is the clean estimate (c_skip < 7e-6 from timestep 19 on)
    f = method.consistency_fn(net, x, t, None, None)
    assert torch.allclose(f, net(x, t).x0_64, atol=1e-5) and not torch.equal(f, net(x, t).x0_64)


def test_the_ladder_is_lcms_skipping_step_grid_and_the_student_samples_lcm_schedulers_steps():
    method = _method("lcm", teacher_steps=50)
    steps = SD.model_time(method.ladder).round().long()
    assert steps.tolist() == [0] + [20 * (j + 1) - 1 for j in range(50)]  # tau_j = 20 (j+1) - 1 and timestep 0
    grid = method.student_grid()
    assert SD.model_time(torch.tensor(grid.times)).round().long().tolist() == [999, 759, 499, 259]
    assert grid.transition == "renoise"
    pcm = _method("pcm", teacher_steps=40)
    assert SD.model_time(torch.tensor(pcm.student_grid().times)).round().long().tolist() == [999, 749, 499, 249]
    assert pcm.student_grid().transition == "ddim"
    assert _method("tcd", SCHEDULE).student_grid().transition.config() == {"name": "tcd", "gamma": 0.3}


def test_lcms_teacher_step_is_the_guided_ddim_step_of_the_diffusers_script():
    """x_prev = sqrt(abar_{t-k}) x0 + sqrt(1 - abar_{t-k}) eps with LCM's x0 = x0_c + omega (x0_c - x0_u) (and eps
    alike), omega = w - 1, abar from diffusers' DDPMScheduler: the script's two half-computations."""
    method = _method("lcm", teacher_steps=50, guidance=(3.0, 7.0))
    teacher = GMMDenoiser(MIX, SD)
    abar = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "prediction_type"}).alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    x0, labels = MIX.sample(24, gen)
    j = torch.randint(1, 51, (24,), generator=gen)
    t, t_n = method.ladder[j], method.ladder[j - 1]
    x_t = SD.add_noise(x0, torch.randn(24, 2, generator=gen), t)
    w = method.guidance.draw(24, gen)
    cond = {"class_labels": labels}
    got = method.teacher_step(teacher, x_t, t, t_n, cond, w)

    c, u = teacher(x_t, t, cond), teacher(x_t, t, None)
    omega = (w - 1)[:, None]
    x0_hat = c.x0_64 + omega * (c.x0_64 - u.x0_64)
    eps_hat = c.eps_64 + omega * (c.eps_64 - u.eps_64)
    prev = torch.clamp(20 * j - 1 - 20, min=0)  # t_n = max(t - k, 0)
    a = abar[prev][:, None]
    want = a.sqrt() * x0_hat + (1 - a).sqrt() * eps_hat
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_heun_teacher_step_is_second_order():
    """CD's Heun step has local error O(h^3) (halving the step divides it by ~8), DDIM's O(h^2) (~4), against a fine
    Heun chain on the exact mixture."""
    teacher = GMMDenoiser(MIX, SD)
    heun, ddim = _method("cd", teacher_steps=10), _method("lcm", teacher_steps=10)
    x_t = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def errors(t, t_n):
        full = lambda v: torch.full((64,), v, dtype=torch.float64)  # noqa: E731
        fine, times = x_t, torch.linspace(t, t_n, 201, dtype=torch.float64)
        for a, b in zip(times, times[1:]):
            fine = heun.teacher_step(teacher, fine, full(a), full(b), None, 1.0)
        return [(m.teacher_step(teacher, x_t, full(t), full(t_n), None, 1.0) - fine).abs().max() for m in (heun, ddim)]

    (heun_h, ddim_h), (heun_half, ddim_half) = errors(0.6, 0.55), errors(0.6, 0.575)
    assert heun_h / heun_half > 6 and ddim_h / ddim_half < 5 and heun_h < ddim_h


def test_pcm_maps_to_its_phase_end_and_its_target_at_a_phase_edge_is_x_prev_itself():
    method = _method("pcm", SCHEDULE, teacher_steps=64, student_steps=4)
    net = GMMDenoiser(MIX, SCHEDULE)
    j = torch.tensor([1, 16, 17, 33, 48, 49, 64])
    end = method._end(j, method.ladder[j - 1], SCHEDULE, None)
    assert (end == method.ladder[torch.tensor([0, 0, 16, 32, 32, 48, 48])]).all()
    edge = torch.tensor([17, 33, 49])  # t_n = tau_{j-1} is the end of j's phase
    x_prev = torch.randn(3, 2, dtype=torch.float64)
    t_n = method.ladder[edge - 1]
    assert torch.equal(method.consistency_fn(net, x_prev, t_n, method._end(edge, t_n, SCHEDULE, None), None), x_prev)


def test_tcds_endpoint_is_a_timestep_between_the_data_and_t_n():
    method = _method("tcd", SD, teacher_steps=50)
    j = torch.randint(1, 51, (500,), generator=torch.Generator().manual_seed(1))
    t_n = method.ladder[j - 1]
    s = method._end(j, t_n, SD, torch.Generator().manual_seed(2))
    assert (s <= t_n).all() and (s >= 0).all() and torch.equal(s, SD.snap(s)) and s.unique().numel() > 50


def _lcm_run(tmp_path, **overrides):
    recipe = gmm_recipe(**{"method": {"name": "lcm", "teacher_steps": 8, "student_steps": 2, "target_ema": 0.5},
                           "train.max_steps": 3, "train.checkpoint_every": 1, **overrides})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False)
    trainer.setup()
    return trainer


def test_the_target_network_is_the_ema_of_the_student_and_takes_no_gradient(tmp_path):
    trainer = _lcm_run(tmp_path)
    target = trainer.nets["target"]
    assert not any(p.requires_grad for p in target.parameters())
    trainer.train()
    assert all(p.grad is None for p in target.parameters())
    ckpt = tmp_path / "run" / "checkpoints"
    student = [load_file(str(ckpt / f"step-{k}" / "student.safetensors")) for k in (1, 2, 3)]
    ema = [load_file(str(ckpt / f"step-{k}" / "target.safetensors")) for k in (1, 2, 3)]
    for k in (1, 2):  # target_k = 0.5 target_{k-1} + 0.5 student_k
        for name, value in ema[k].items():
            torch.testing.assert_close(value, 0.5 * ema[k - 1][name] + 0.5 * student[k][name])
        assert any(not torch.equal(ema[k][n], ema[k - 1][n]) for n in ema[k])


def test_teacher_samples_stand_in_for_a_missing_data_source(tmp_path, capsys):
    trainer = _lcm_run(tmp_path, **{"data.source": "gaussian", "method.num_pairs": 64, "method.pair_steps": 4})
    assert trainer.method.clean.pairs["target"].shape == (64, 2)
    assert "x_t is noised from 64 teacher samples" in capsys.readouterr().err
    trainer.train()


@pytest.mark.parametrize("overrides,message", [
    ({"method.teacher_steps": 48}, "do not divide the teacher's 1024 timesteps"),
    ({"method.name": "pcm", "method.student_steps": 3}, "phases must split the teacher's 8 steps evenly"),
    ({"method.guidance": [4.0, 2.0]}, "1 <= w_min <= w_max"),
    ({"method.gamma": 1.5}, "gamma"),
    ({"method.x0_source": "data", "data.source": "gaussian"}, "needs a real-data source"),
    ({"method.distance": "l1"}, "method.distance must be one of"),
    ({"method.weight_power": -1}, "method.weight_power must be in"),
])
def test_bad_consistency_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _lcm_run(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_pcm_has_no_target_network_and_lcm_an_ema_one():
    assert "target" not in METHODS["pcm"]().roles()
    assert METHODS["lcm"]().roles()["target"].ema_of == "student"


def test_the_loss_weight_is_a_power_of_each_samples_link_in_edm_sigma():
    teacher, student = GMMDenoiser(MIX, SCHEDULE), GMMDenoiser(MIX, SCHEDULE)
    nets = Nets(student=student, teacher=teacher)
    x0, _ = MIX.sample(32, torch.Generator().manual_seed(0))
    losses = {}
    for power in (0.0, 1.0, 0.5):
        method = _method("pcm", SCHEDULE, teacher_steps=16, student_steps=2, weight_power=power)
        batch = Batch(x0=x0, cond=None, generator=torch.Generator().manual_seed(3))
        losses[power] = method("student", nets, batch).loss
    j = torch.randint(1, 17, (32,), generator=torch.Generator().manual_seed(3))  # the method's first draw
    sigma = SCHEDULE.sigma(method.ladder) / SCHEDULE.alpha(method.ladder)
    link = sigma[j] - sigma[j - 1]
    torch.testing.assert_close(losses[1.0].double(), losses[0.0].double() / link, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[0.5].double(), losses[0.0].double() / link.sqrt(), rtol=1e-5, atol=0)
