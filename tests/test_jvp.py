"""``denoisers.jvp``: time derivatives of a network (sCM, rCM, MeanFlow), exact by forward-mode AD or by a central
difference; and ``Reparameterized``, a backbone seen in another schedule's time."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stepdistill.conditioning import encode_prompts
from stepdistill.denoisers import GMMDenoiser, JVPError, Reparameterized, UNet2DDenoiser, jvp
from stepdistill.mixture import GaussianMixture
from stepdistill.schedules import RectifiedFlow, TrigFlow, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER, load_tiny


pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _one_gaussian_x0(mu, std, x, a, s):
    """E[x0 | x_t] of N(mu, std^2 I): mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu)."""
    gain = a * std**2 / (a**2 * std**2 + s**2)
    return mu + gain[:, None] * (x - a[:, None] * mu)


def test_exact_jvp_of_the_gmm_denoiser_is_the_analytic_derivative():
    """One component: the posterior mean is affine in x_t, with a closed-form time derivative; several components:
    the same as reverse-mode AD of the closed form (float64 throughout)."""
    schedule = RectifiedFlow(shift=3.0)
    mu, std = torch.tensor([0.3, -0.2], dtype=F64), 0.15
    den = GMMDenoiser(GaussianMixture(mu[None], [std]), schedule)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.2, 0.8, 5, dtype=F64)
    dx, dt = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1)), torch.ones(5, dtype=F64)
    value, tangent = jvp(den, (x, t), (dx, dt), mode="exact")

    def analytic(eps):  # the closed form along the tangent, differentiated by a float64 central difference
        tt = t + eps
        return _one_gaussian_x0(mu, std, x + eps * dx, schedule.alpha(tt), schedule.sigma(tt))

    torch.testing.assert_close(value, analytic(0.0))
    torch.testing.assert_close(tangent, (analytic(1e-6) - analytic(-1e-6)) / 2e-6, rtol=1e-6, atol=1e-8)

    mixture = GaussianMixture([[0.5, 0.5], [-0.5, -0.2], [0.1, -0.6]], [0.1, 0.2, 0.05], [0.3, 0.5, 0.2])
    den = GMMDenoiser(mixture, VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER))
    _, tangent = jvp(den, (x, t), (dx, dt), mode="exact")
    xr, tr = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = den(xr, tr).x0_64
    reverse = torch.zeros_like(out)
    for i in range(5):
        for j in range(2):
            gx, gt = torch.autograd.grad(out[i, j], (xr, tr), retain_graph=True)
            reverse[i, j] = (gx * dx).sum() + (gt * dt).sum()
    torch.testing.assert_close(tangent, reverse, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("tiny", ["unet2d", "sd15", "sd3", "flux"])
def test_exact_jvp_runs_on_every_tiny_backbone_and_agrees_with_the_difference(tiny):
    """Forward-mode AD through the fused SDPA kernels and GroupNorm on transposed maps (UNet2DModel's attention) is
    not implemented in torch: ``jvp`` runs them on the math kernel with contiguous inputs, so every backbone gets
    the exact derivative; the central difference agrees to its float32 accuracy."""
    teacher = load_tiny(tiny)
    cond = None if tiny == "unet2d" else encode_prompts(teacher.load_pipeline(), tiny, ["a", "b"],
                                                        **teacher.encode_settings)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *teacher.sample_shape, generator=g)
    t = torch.tensor([0.4567, 0.61], dtype=F64)
    dx, dt = torch.randn(x.shape, generator=g), torch.ones(2, dtype=F64)
    value, exact = jvp(teacher.denoiser, (x, t), (dx, dt), cond=cond, output="x0", mode="exact")
    _, approx = jvp(teacher.denoiser, (x, t), (dx, dt), cond=cond, output="x0", mode="fd")
    torch.testing.assert_close(value, teacher.denoiser(x, t, cond).x0_64, rtol=1e-4, atol=1e-5)  # math vs fused
    assert float((exact - approx).norm() / exact.norm()) < 2e-2
    # the attention backend and GroupNorm are back as they were
    assert torch.nn.functional.group_norm.__module__ == "torch.nn.functional"


def test_the_difference_shares_dropout_masks_and_exact_mode_says_why_it_cannot():
    """A backbone with dropout and an op without a forward-mode formula (cdist): ``auto`` falls back to the central
    difference, whose evaluations see the same dropout masks (a zero tangent gives a zero derivative), and
    ``exact`` refuses with the reason."""
    schedule = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(2, 2), nn.Dropout(0.5)

        def forward(self, x, timestep, **_):
            h = self.drop(self.lin(x[:, :, 0, 0])) + torch.cdist(x[:, :, 0, 0], torch.zeros(1, 2))
            return SimpleNamespace(sample=h[:, :, None, None] * timestep.float()[:, None, None, None] / 1000)

    den = UNet2DDenoiser(Net().train(), schedule, "eps")
    x, t = torch.randn(8, 2), torch.full((8,), 0.5, dtype=F64)
    with pytest.raises(JVPError, match="forward-mode AD fails on Net .*_cdist_forward"):
        jvp(den, (x, t), (torch.zeros_like(x), torch.zeros(8, dtype=F64)), mode="exact")
    value, tangent = jvp(den, (x, t), (torch.zeros_like(x), torch.zeros(8, dtype=F64)), mode="auto")
    assert float(tangent.abs().max()) == 0.0 and torch.isfinite(value).all()


def test_reparameterized_shows_a_vp_backbone_in_trigflow_time_exactly():
    """The exact mixture denoiser on the project's VP schedule, seen in TrigFlow time, is the exact denoiser of the
    TrigFlow schedule: values and time derivatives (through the SNR-matched time) agree."""
    mixture = GaussianMixture([[0.5, 0.5], [-0.5, -0.2]], [0.1, 0.2], [0.3, 0.7])
    vp = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    trig = TrigFlow(sigma_data=0.5)
    view, direct = Reparameterized(GMMDenoiser(mixture, vp), trig, "trigflow"), GMMDenoiser(mixture, trig)
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    torch.testing.assert_close(view(x, t).x0_64, direct(x, t).x0_64, rtol=1e-9, atol=1e-12)
    tangents = (torch.randn_like(x), torch.ones(6, dtype=F64))
    for output in ("x0", "trigflow"):
        a = jvp(view, (x, t), tangents, output=output, mode="exact")[1]
        b = jvp(direct, (x, t), tangents, output=output, mode="exact")[1]
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_reparameterized_refuses_times_noisier_than_the_inner_schedule_reaches():
    """SD's betas end at logSNR -10.6, which TrigFlow (sigma_data 0.5) passes before t = 1: such a time has no
    SNR-matched inner time (bisection would clamp it and the time derivative would be wrong)."""
    from .conftest import SD_SCHEDULER

    view = Reparameterized(GMMDenoiser(GaussianMixture([[0.0, 0.0]], [0.5]),
                                       VPDiscrete.from_scheduler_config(SD_SCHEDULER)), TrigFlow(sigma_data=0.5))
    assert 0.95 < view.t_max < 1.0
    x = torch.zeros(2, 2, dtype=F64)
    view(x, torch.full((2,), view.t_max - 1e-6, dtype=F64))
    with pytest.raises(ValueError, match="noisier than the inner schedule reaches"):
        view(x, torch.full((2,), 0.999, dtype=F64))
