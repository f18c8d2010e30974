"""sCM (continuous-time consistency distillation on TrigFlow): the tangent against autograd's total derivative, the
time density and the span, the adaptive weight, the warm-up, sampling grids, and bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stepdistill.config import ConfigError, build_recipe
from stepdistill.denoisers import GMMDenoiser, Reparameterized, UNet2DDenoiser
from stepdistill.methods import METHODS
from stepdistill.methods.scm import SCM, tangent
from stepdistill.mixture import GaussianMixture
from stepdistill.nets.log_variance import LogVariance
from stepdistill.schedules import TrigFlow, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER
from stepdistill.train import Trainer

from ._recipes import _apply, gmm_recipe


pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class _ToyNet(nn.Module):
    """A float64 MLP on ``(x, timestep)`` in UNet2DModel's calling convention (a toy student network)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).double()

    def forward(self, x, timestep, **_):
        h = torch.cat([x[:, :, 0, 0], timestep.double()[:, None] / 1000], dim=1)
        return SimpleNamespace(sample=self.net(h)[:, :, None, None])


def _views(sd=0.5, student_kind="mixture"):
    """A teacher (an exact mixture denoiser) and a different student (another mixture's, or a toy network predicting
    epsilon) on the VP schedule, in TrigFlow time."""
    vp, trig = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), TrigFlow(sigma_data=sd)
    teacher = GaussianMixture([[0.5, 0.5], [-0.5, -0.2], [0.1, -0.6]], [0.1, 0.2, 0.05], [0.3, 0.5, 0.2])
    if student_kind == "mixture":
        student = GMMDenoiser(GaussianMixture([[0.4, 0.6], [-0.3, -0.1]], [0.15, 0.1], [0.6, 0.4]), vp)
    else:
        student = UNet2DDenoiser(_ToyNet(), vp, "eps")
    return Reparameterized(student, trig, "trigflow"), Reparameterized(GMMDenoiser(teacher, vp), trig, "trigflow")


@pytest.mark.parametrize("sd,student_kind", [(0.5, "mixture"), (1.0, "mixture"), (0.5, "toy_network")])
def test_the_tangent_with_r_1_is_cos_times_the_total_derivative_of_the_consistency_function(sd, student_kind):
    """sCM Eq. 8: with r = 1, g = cos(theta) d/dtheta f(x_theta, theta) along the teacher's ODE, f = cos x - sd sin F
    (the student's clean estimate). The method's forward-mode derivative is checked against reverse-mode autograd
    (double backward) of f itself, in float64 (the toy network reads its timestep in float32, as UNet2DDenoiser
    feeds it: 1e-6 relative); r scales only the second term."""
    student, teacher = _views(sd, student_kind)
    method = SCM(sigma_data=sd, jvp="exact")
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.08, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    theta = 0.5 * math.pi * t
    dx, dF = method.derivatives(student, teacher, x, t, None)
    F = student(x, t).get("trigflow", exact=True)

    def f(x_, t_):  # the consistency function in TrigFlow time: the student's clean estimate
        return student(x_, t_).x0_64

    torch.testing.assert_close(f(x, t), torch.cos(theta)[:, None] * x - sd * torch.sin(theta)[:, None] * F)
    _, df_dtheta = torch.autograd.functional.jvp(f, (x, t), (dx, torch.full_like(t, 2 / math.pi)))
    g = tangent(F, dF, x, dx, theta, sd, 1.0)
    tol = {"rtol": 1e-6, "atol": 1e-9} if student_kind == "mixture" else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(g, torch.cos(theta)[:, None] * df_dtheta, **tol)
    first = tangent(F, dF, x, dx, theta, sd, 0.0)
    torch.testing.assert_close(tangent(F, dF, x, dx, theta, sd, 0.3), first + 0.3 * (g - first))


def test_the_teachers_velocity_is_its_pf_ode_in_the_angle():
    """dx/dtheta = sd F_T (through the SNR-matched time of a VP teacher): for one Gaussian N(mu, std^2) the PF-ODE
    moves x(theta) = cos mu + r(theta) xi with xi fixed, r = sqrt(cos^2 std^2 + sd^2 sin^2), in closed form."""
    vp, sd, std = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), 0.5, 0.3
    mu = torch.tensor([0.4, -0.2], dtype=F64)
    teacher = Reparameterized(GMMDenoiser(GaussianMixture(mu[None], [std]), vp), TrigFlow(sigma_data=sd))
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=F64)
    dx, _ = SCM(sigma_data=sd, jvp="exact").derivatives(teacher, teacher, x, t, None)
    th = (0.5 * math.pi * t)[:, None]
    r = (torch.cos(th) ** 2 * std**2 + sd**2 * torch.sin(th) ** 2).sqrt()
    dr = torch.sin(th) * torch.cos(th) * (sd**2 - std**2) / r
    xi = (x - torch.cos(th) * mu) / r
    torch.testing.assert_close(dx, -torch.sin(th) * mu + dr * xi, rtol=1e-7, atol=1e-9)


def test_times_are_log_normal_in_sigma_and_stay_inside_the_teachers_span():
    method = SCM(p_mean=-1.0, p_std=1.4)
    method.view.use(VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), method.student_steps)
    t = method.draw_times(20000, torch.Generator().manual_seed(0))
    lo, hi = method.view.span
    assert lo <= float(t.min()) and float(t.max()) <= hi and 0 < lo < 0.05 and 0.95 < hi < 1
    inside = (t > lo) & (t < hi)
    log_sigma = torch.log(0.5 * torch.tan(0.5 * math.pi * t[inside]))
    # truncation at the span's ends moves the moments a little; the untruncated draw is N(-1.0, 1.4^2)
    assert abs(float(log_sigma.mean()) + 1.0) < 0.1 and abs(float(log_sigma.std()) - 1.4) < 0.1


def test_the_log_variance_starts_uniform_and_learns_the_log_of_the_loss():
    """EDM2's learned uncertainty: exp(-u) L + u is minimised at u = log L, per time."""
    net = LogVariance()
    log_sigma = torch.linspace(-3, 3, 64)
    assert float(net(log_sigma).detach().abs().max()) == 0.0
    target = 0.5 * log_sigma  # a loss whose magnitude grows with the noise level: L = exp(0.5 ln sigma)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(600):
        u = net(log_sigma)
        opt.zero_grad()
        (torch.exp(-u) * torch.exp(target) + u).mean().backward()
        opt.step()
    assert float((net(log_sigma) - target).abs().max()) < 0.15


def _scm(tmp_path, **overrides):
    recipe = _apply(gmm_recipe(), {"method": {"name": "scm", "tangent_warmup": 4}, "data.batch_size": 16,
                                   "train.max_steps": 4, **overrides})
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


def test_a_run_warms_the_tangent_up_trains_the_weight_and_samples_at_any_step_count(tmp_path):
    trainer = _scm(tmp_path)
    trainer.train()
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    r = [json.loads(row)["schedule/tangent_r"] for row in rows]
    assert r == [0.0, 0.25, 0.5, 0.75]
    assert trainer.method.student_grid().times == (1.0, 0.5) and trainer.method.student_grid().transition == "renoise"
    assert trainer.method.grid_for(1).times == (1.0,)
    weight = trainer.nets["weight"].net.linear.weight
    assert float(weight.detach().abs().max()) > 0  # the adaptive weight took its updates with the student


def test_rcm_runs_scm_alone_during_the_warm_up_then_dmds_critic_every_step_and_the_student_every_kth(tmp_path):
    trainer = _scm(tmp_path, **{"method.name": "rcm", "method.tangent_warmup": 2, "train.update_every": {"student": 2},
                                "train.max_steps": 5})
    method = trainer.method
    assert [method.active_phases(s, {"student": 2}) for s in range(5)] == [
        ("student",), ("student",), ("student", "fake_score"), ("fake_score",), ("student", "fake_score")]
    assert set(method.roles()) == {"student", "weight", "fake_score"} and method.owner("fake_score") == "fake_score"
    before = {k: v.clone() for k, v in trainer.nets["fake_score"].state_dict().items()}
    trainer.train()
    rows = [json.loads(row) for row in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "loss_dm/student" in rows[2] and "loss_dm/student" not in rows[1]
    assert "loss_denoise/fake_score" in rows[2]  # (a log row keeps the last values of roles that did not run)
    after = trainer.nets["fake_score"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_scm_has_a_weight_role_only_when_adaptive():
    assert set(METHODS["scm"]().roles()) == {"student", "weight"}
    assert set(METHODS["scm"](adaptive_weight=False).roles()) == {"student"}


@pytest.mark.parametrize("overrides,message", [
    ({"method.jvp": "forward"}, "method.jvp must be one of"),
    ({"method.sigma_data": 0}, "method.sigma_data must be positive"),
    ({"method.x0_source": "data", "data.source": "gaussian"}, "needs a real-data source"),
    ({"method.student_steps": 0}, "method.student_steps must be at least 1"),
])
def test_bad_scm_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _scm(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_an_exact_jvp_the_backbone_cannot_do_is_refused_at_start_naming_the_module_and_the_fallback(tmp_path,
                                                                                                  monkeypatch):
    """Forward-mode AD failing inside the backbone (here: torch.func.jvp raising as for an op without a forward-AD
    formula) stops ``method.jvp: exact`` before anything is written; ``auto`` would fall back."""
    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with _cdist_forward that does not support it")

    monkeypatch.setattr(torch.func, "jvp", no_forward_ad)
    with pytest.raises(ValueError, match="method.jvp: exact: forward-mode AD fails on .*_cdist_forward.*auto falls "
                                         "back to a central difference"):
        _scm(tmp_path, **{"method.jvp": "exact", "student.init": "new"})
    assert not (tmp_path / "run").exists()
