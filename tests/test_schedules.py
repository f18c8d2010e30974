"""Noise schedules: closed forms, parity with diffusers' DDPM tables and grids, logSNR inversion, derivatives,
SNR-matched time mapping (METHODS.md §1.3) and the time densities."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from stepdistill.schedules import (
    EDM,
    SCHEDULES,
    KarrasGrid,
    LogitNormal,
    LogNormalSigma,
    RectifiedFlow,
    TrigFlow,
    UniformIndex,
    UniformTime,
    VPCosine,
    VPDiscrete,
    map_time,
)
from stepdistill.teachers import DEFAULT_SCHEDULER

from .conftest import SCHEDULE_FACTORIES, SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")

VP_CONFIGS = {"default_1024": DEFAULT_SCHEDULER, "sd_1000": SD_SCHEDULER}
F64 = torch.float64


def _abar(config) -> torch.Tensor:
    """diffusers' own ``alphas_cumprod`` for a DDPM config."""
    return DDPMScheduler.from_config(config).alphas_cumprod.double()


# ---------------------------------------------------------------------------------------------------------------
# VPDiscrete against diffusers


@pytest.mark.parametrize("config", VP_CONFIGS.values(), ids=VP_CONFIGS.keys())
def test_vp_discrete_grid_points_match_ddpm_alphas_cumprod(config):
    sch = VPDiscrete.from_scheduler_config(config)
    abar = _abar(config)
    n_train = config["num_train_timesteps"]
    assert sch.num_train_timesteps == n_train and sch.t_min == pytest.approx(1.0 / n_train)
    n = torch.arange(n_train)
    t = sch.index_to_t(n)
    torch.testing.assert_close(t, (n + 1.0).double() / n_train, rtol=0, atol=1e-15)
    torch.testing.assert_close(sch.alpha(t), abar.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.sigma(t), (1 - abar).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.logsnr(t), torch.log(abar / (1 - abar)), rtol=0, atol=1e-9)
    # the backbone sees the integer DDPM index
    torch.testing.assert_close(sch.model_time(t), n.double(), rtol=0, atol=1e-9)


def test_vp_discrete_clean_end():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    assert sch.alpha(0.0).item() == 1.0
    assert sch.sigma(0.0).item() == 0.0
    assert sch.logsnr(0.0).item() == math.inf
    assert sch.model_time(0.0).item() == -1.0
    # Between the clean end and index 0 the EDM sigma is linear in t.
    sigma0 = math.sqrt((1 - sch.alphas_cumprod[0].item()) / sch.alphas_cumprod[0].item())
    half = 0.5 / sch.num_train_timesteps
    assert (sch.sigma(half) / sch.alpha(half)).item() == pytest.approx(0.5 * sigma0, rel=1e-12)


@pytest.mark.parametrize("config", VP_CONFIGS.values(), ids=VP_CONFIGS.keys())
def test_vp_discrete_interpolates_log_sigma_like_diffusers(config):
    """Between indices, log(sigma/alpha) is linear in the index: diffusers' ``_sigma_to_t`` inverts the same map."""
    sigma_to_t = getattr(EulerDiscreteScheduler, "_sigma_to_t", None)
    if sigma_to_t is None:  # a private helper; only its maths matters here
        pytest.skip("this diffusers has no EulerDiscreteScheduler._sigma_to_t")
    sch = VPDiscrete.from_scheduler_config(config)
    abar = _abar(config).numpy()
    log_sigmas = np.log(np.sqrt((1 - abar) / abar))
    gen = torch.Generator().manual_seed(0)
    log_sigma = log_sigmas[0] + (log_sigmas[-1] - log_sigmas[0]) * torch.rand(64, generator=gen, dtype=F64)
    ours = sch.model_time(sch.t_from_logsnr(-2.0 * log_sigma))
    ref = sigma_to_t(None, np.exp(log_sigma.numpy()), log_sigmas)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    # and half-way between two indices the log-sigma is the mean of its neighbours
    n = torch.tensor([10, 300, 700])
    mid = sch.index_to_t(n + 0.5)
    expected = 0.5 * (torch.from_numpy(log_sigmas[n.numpy()]) + torch.from_numpy(log_sigmas[n.numpy() + 1]))
    torch.testing.assert_close(torch.log(sch.sigma(mid) / sch.alpha(mid)), expected, rtol=0, atol=1e-12)


def test_vp_discrete_zero_terminal_snr_stays_finite():
    sch = VPDiscrete.from_scheduler_config({**DEFAULT_SCHEDULER, "rescale_betas_zero_snr": True})
    assert sch.alphas_cumprod[-1].item() == pytest.approx(2**-24)
    assert math.isfinite(sch.logsnr(1.0).item())
    assert sch.alpha(1.0).item() == pytest.approx(2**-12, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Continuous schedules: closed forms


T = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.8, 1.0], dtype=F64)


def test_vp_cosine_closed_form():
    sch = VPCosine()
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    lam = -2.0 * torch.log(torch.tan(a * T + b))
    torch.testing.assert_close(sch.logsnr(T), lam)
    assert sch.logsnr(0.0).item() == pytest.approx(20.0) and sch.logsnr(1.0).item() == pytest.approx(-20.0)
    torch.testing.assert_close(sch.alpha(T) ** 2 + sch.sigma(T) ** 2, torch.ones_like(T))
    torch.testing.assert_close(sch.alpha(T) ** 2 / sch.sigma(T) ** 2, torch.exp(lam))


def test_edm_closed_form():
    sch = EDM()
    torch.testing.assert_close(sch.alpha(T), torch.ones_like(T))
    torch.testing.assert_close(sch.sigma(T), 80.0 * T**7)
    assert sch.sigma(sch.t_min).item() == pytest.approx(0.002)
    assert sch.model_time(0.5).item() == pytest.approx(0.25 * math.log(80.0 * 0.5**7))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_closed_form(shift):
    sch = RectifiedFlow(shift=shift)
    tp = shift * T / (1 + (shift - 1) * T)
    torch.testing.assert_close(sch.sigma(T), tp)
    torch.testing.assert_close(sch.alpha(T), 1 - tp)
    torch.testing.assert_close(sch.model_time(T), 1000 * tp)
    if shift == 3.0:  # SD3's shift puts the midpoint at t' = 3/4
        assert sch.sigma(0.5).item() == pytest.approx(0.75)


def test_trigflow_closed_form():
    sch = TrigFlow(sigma_data=0.5)
    torch.testing.assert_close(sch.alpha(T), torch.cos(0.5 * math.pi * T))
    torch.testing.assert_close(sch.sigma(T), 0.5 * torch.sin(0.5 * math.pi * T))
    torch.testing.assert_close(sch.model_time(T), 0.5 * math.pi * T)


@pytest.mark.parametrize("kind", ["vp_cosine", "edm", "rectified_flow", "trigflow"])
def test_config_rebuilds_continuous_schedules(kind):
    original = SCHEDULES[kind](**({"shift": 2.0} if kind == "rectified_flow" else {}))
    cfg = dict(original.config())
    assert cfg.pop("kind") == kind
    rebuilt = SCHEDULES[kind](**cfg)
    torch.testing.assert_close(rebuilt.alpha(T), original.alpha(T))
    torch.testing.assert_close(rebuilt.sigma(T), original.sigma(T))


# ---------------------------------------------------------------------------------------------------------------
# Generic properties, every schedule


def test_logsnr_strictly_decreasing(any_schedule):
    t = torch.linspace(0, 1, 4097, dtype=F64)[1:-1]
    lam = any_schedule.logsnr(t)
    assert torch.isfinite(lam).all()
    assert (lam.diff() < 0).all()


def test_t_from_logsnr_inverts_logsnr(any_schedule):
    t = torch.cat([torch.linspace(0.01, 0.99, 61, dtype=F64), torch.tensor([any_schedule.t_min or 0.005], dtype=F64)])
    torch.testing.assert_close(any_schedule.t_from_logsnr(any_schedule.logsnr(t)), t, rtol=0, atol=1e-9)


# off the VP-discrete knots (t * N is never within 0.05 of an integer for N = 1000 or 1024)
T_SMOOTH = torch.tensor([0.1234, 0.3771, 0.6181, 0.9013], dtype=F64)


def test_derivatives_match_finite_differences(any_schedule):
    h = 1e-6
    da, ds = any_schedule.derivatives(T_SMOOTH)
    fd_a = (any_schedule.alpha(T_SMOOTH + h) - any_schedule.alpha(T_SMOOTH - h)) / (2 * h)
    fd_s = (any_schedule.sigma(T_SMOOTH + h) - any_schedule.sigma(T_SMOOTH - h)) / (2 * h)
    assert da.shape == ds.shape == T_SMOOTH.shape and da.dtype == ds.dtype == F64
    torch.testing.assert_close(da, fd_a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ds, fd_s, rtol=1e-6, atol=1e-8)


def test_derivatives_closed_forms():
    t = T_SMOOTH
    da, ds = EDM().derivatives(t)  # alpha = 1 is a constant: zero derivative, not an autograd error
    torch.testing.assert_close(da, torch.zeros_like(t))
    torch.testing.assert_close(ds, 7 * 80.0 * t**6)
    da, ds = RectifiedFlow(shift=3.0).derivatives(t)
    torch.testing.assert_close(ds, 3.0 / (1 + 2.0 * t) ** 2)
    torch.testing.assert_close(da, -ds)
    da, ds = TrigFlow(sigma_data=0.5).derivatives(t)
    torch.testing.assert_close(da, -0.5 * math.pi * torch.sin(0.5 * math.pi * t))
    torch.testing.assert_close(ds, 0.25 * math.pi * torch.cos(0.5 * math.pi * t))
    da, ds = EDM().derivatives(0.5)  # a 0-d time works too
    assert da.ndim == ds.ndim == 0 and ds.item() == pytest.approx(7 * 80.0 * 0.5**6)


# ---------------------------------------------------------------------------------------------------------------
# SNR-matched mapping between schedules (METHODS.md §1.3)


MAP_PAIRS = [("vp_default", "edm"), ("rf", "edm"), ("rf_shift3", "vp_sd"), ("trigflow", "vp_cosine"),
             ("vp_cosine", "rf_shift3"), ("edm", "trigflow"), ("vp_sd", "vp_default")]


@pytest.mark.parametrize("src_name,dst_name", MAP_PAIRS, ids=[f"{a}->{b}" for a, b in MAP_PAIRS])
def test_map_time_matches_snr_and_round_trips(src_name, dst_name):
    src, dst = SCHEDULE_FACTORIES[src_name](), SCHEDULE_FACTORIES[dst_name]()
    lam = torch.linspace(-5.0, 6.5, 24, dtype=F64)  # inside every schedule's logSNR range (SD's is [-5.4, 7.1])
    t_src = src.t_from_logsnr(lam)
    t_dst, scale = map_time(t_src, src, dst)
    torch.testing.assert_close(dst.logsnr(t_dst), src.logsnr(t_src), rtol=0, atol=1e-8)
    # x_dst = scale * x_src has dst's coefficients: both alpha and sigma rescale by the same factor
    torch.testing.assert_close(scale * src.alpha(t_src), dst.alpha(t_dst), rtol=1e-9, atol=0)
    torch.testing.assert_close(scale * src.sigma(t_src), dst.sigma(t_dst), rtol=1e-9, atol=0)
    # A -> B -> A is the identity
    t_back, scale_back = map_time(t_dst, dst, src)
    torch.testing.assert_close(t_back, t_src, rtol=0, atol=1e-9)
    torch.testing.assert_close(scale * scale_back, torch.ones_like(scale), rtol=1e-9, atol=0)


def test_map_vp_index_to_edm_sigma():
    vp, edm = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), EDM()
    n = torch.tensor([0, 1, 100, 500, 800, 900])  # EDM sigma <= 80 covers indices up to ~930
    abar = vp.alphas_cumprod[n]
    t_edm, scale = map_time(vp.index_to_t(n), vp, edm)
    torch.testing.assert_close(edm.sigma(t_edm), ((1 - abar) / abar).sqrt(), rtol=1e-9, atol=0)
    torch.testing.assert_close(scale, 1 / abar.sqrt(), rtol=1e-9, atol=0)  # x_EDM = x_VP / sqrt(abar)


def test_map_rectified_flow_to_edm_sigma():
    rf, edm = RectifiedFlow(), EDM()
    t = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.95], dtype=F64)
    t_edm, scale = map_time(t, rf, edm)
    torch.testing.assert_close(edm.sigma(t_edm), t / (1 - t), rtol=1e-9, atol=0)
    torch.testing.assert_close(scale, 1 / (1 - t), rtol=1e-9, atol=0)
    # and back: t = sigma / (1 + sigma)
    sigma = torch.tensor([0.01, 0.5, 1.0, 7.0, 40.0], dtype=F64)
    t_rf, _ = map_time(edm.t_from_logsnr(-2 * torch.log(sigma)), edm, rf)
    torch.testing.assert_close(t_rf, sigma / (1 + sigma), rtol=0, atol=1e-10)


def test_map_trigflow_to_edm_sigma():
    trig, edm = TrigFlow(sigma_data=0.5), EDM()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64)
    t_edm, scale = map_time(t, trig, edm)
    theta = 0.5 * math.pi * t
    torch.testing.assert_close(edm.sigma(t_edm), 0.5 * torch.tan(theta), rtol=1e-9, atol=0)
    torch.testing.assert_close(scale, 1 / torch.cos(theta), rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling grids


@pytest.mark.parametrize("config", VP_CONFIGS.values(), ids=VP_CONFIGS.keys())
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 16])
def test_vp_grid_equals_ddim_trailing_timesteps(config, steps):
    sch = VPDiscrete.from_scheduler_config(config)
    grid = sch.grid(steps)
    assert grid.dtype == F64 and grid.shape == (steps + 1,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and (grid.diff() < 0).all()
    ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    idx = sch.model_time(grid[:-1])
    torch.testing.assert_close(idx, ddim.timesteps.double(), rtol=0, atol=1e-9)
    sch.check_grid(grid)  # trailing indices are integers even when steps does not divide N (e.g. 3)


def test_vp_grid_four_steps_on_1024():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    grid = sch.grid(4)
    assert sch.model_time(grid[:-1]).tolist() == [1023.0, 767.0, 511.0, 255.0]
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_check_grid_rejects_times_between_discrete_indices():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    with pytest.raises(ValueError, match="divides 1024"):
        sch.check_grid(torch.linspace(1, 0, 4, dtype=F64))  # 3 uniform steps: index 681.67
    with pytest.raises(ValueError):
        sch.check_grid(torch.tensor([1.0, 0.5 / 1024, 0.0], dtype=F64))  # below t_min = 1/N
    with pytest.raises(ValueError):
        sch.check_grid(torch.tensor([1.5, 0.5, 0.0], dtype=F64))
    sch.check_grid(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))


def test_check_grid_continuous_schedules():
    RectifiedFlow().check_grid(torch.tensor([1.0, 1 / 3, 0.0], dtype=F64))
    edm = EDM()
    edm.check_grid(edm.grid(5))
    with pytest.raises(ValueError):
        edm.check_grid(torch.tensor([1.0, 0.5 * edm.t_min, 0.0], dtype=F64))
    with pytest.raises(ValueError):
        RectifiedFlow().check_grid(torch.tensor([1.2, 0.5, 0.0], dtype=F64))


@pytest.mark.parametrize("steps", [2, 4, 18])
def test_edm_grid_is_the_karras_rho_grid(steps):
    sch = EDM()
    grid = sch.grid(steps)
    assert grid[-1].item() == 0.0 and (grid.diff() < 0).all()
    i = torch.arange(steps, dtype=F64)
    r = 1 / 7.0
    karras = (80.0**r + i / (steps - 1) * (0.002**r - 80.0**r)) ** 7  # Karras et al. (2022), Eq. 5
    torch.testing.assert_close(sch.sigma(grid[:-1]), karras, rtol=1e-12, atol=0)
    torch.testing.assert_close(KarrasGrid(num_points=steps).sigmas(), karras, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Time densities


DENSITIES = {
    "uniform": UniformTime(),
    "uniform_0.2_0.8": UniformTime(0.2, 0.8),
    "lognormal_edm": LogNormalSigma(),
    "lognormal_ict": LogNormalSigma(-1.1, 2.0),
    "logit_normal": LogitNormal(),
    "karras_grid": KarrasGrid(),
}


@pytest.mark.parametrize("density", DENSITIES.values(), ids=DENSITIES.keys())
@pytest.mark.parametrize("schedule_name", ["vp_default", "vp_cosine", "edm", "rf_shift3", "trigflow"])
def test_time_densities_stay_in_range(density, schedule_name):
    sch = SCHEDULE_FACTORIES[schedule_name]()
    t = density.sample(2048, sch, torch.Generator().manual_seed(0))
    assert t.shape == (2048,) and t.dtype == F64
    assert (t >= sch.t_min - 1e-12).all() and (t <= 1.0).all()
    if isinstance(density, UniformTime) and density.t_lo > 0:
        assert (t >= 0.2).all() and (t <= 0.8).all()
    # the same generator seed draws the same times
    torch.testing.assert_close(density.sample(2048, sch, torch.Generator().manual_seed(0)), t)


def test_uniform_time_is_uniform():
    t = UniformTime().sample(20000, RectifiedFlow(), torch.Generator().manual_seed(1))
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.003)


# EDM's (-1.2, 1.2), iCT's (-1.1, 2.0), rCM's generator density (0.7, 1.6) on rectified flow (METHODS.md §1.6)
LOGNORMAL_CASES = [(-1.2, 1.2, "edm"), (-1.2, 1.2, "vp_cosine"), (-1.1, 2.0, "edm"), (-1.1, 2.0, "vp_cosine"),
                   (0.7, 1.6, "rf"), (0.7, 1.6, "vp_cosine")]


@pytest.mark.parametrize("p_mean,p_std,schedule_name", LOGNORMAL_CASES)
def test_lognormal_sigma_has_the_requested_log_moments(p_mean, p_std, schedule_name):
    sch = SCHEDULE_FACTORIES[schedule_name]()
    t = LogNormalSigma(p_mean, p_std).sample(20000, sch, torch.Generator().manual_seed(0))
    log_ratio = torch.log(sch.sigma(t) / sch.alpha(t))
    # standard errors: 0.01 (mean) and 0.008 (std) for p_std = 1.2; tolerances are several times larger
    assert log_ratio.mean().item() == pytest.approx(p_mean, abs=0.05 * p_std)
    assert log_ratio.std().item() == pytest.approx(p_std, rel=0.03)


def test_logit_normal_has_the_requested_logit_moments():
    sch = RectifiedFlow(shift=3.0)
    t = LogitNormal(mean=0.5, std=0.8).sample(20000, sch, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, rel=0.03)


def test_karras_grid_density_samples_grid_points():
    sch = EDM()
    density = KarrasGrid(num_points=40)
    sigma = sch.sigma(density.sample(4000, sch, torch.Generator().manual_seed(0)))
    grid = density.sigmas()
    nearest = (torch.log(sigma)[:, None] - torch.log(grid)[None]).abs().min(dim=1)
    assert nearest.values.max().item() < 1e-9
    counts = torch.bincount(nearest.indices, minlength=40)
    assert (counts > 50).all()  # uniform over the 40 points: 100 expected each


def test_karras_grid_part_is_counted_from_the_clean_end():
    # DMD2's EDM code: positions [int(0.02 N), int(0.98 N)] of its grid sorted from small to large sigma
    sch, n = EDM(), 1000
    part = KarrasGrid(num_points=n, lo=0.02, hi=0.98)
    ascending = part.sigmas().flip(0)
    sigma = sch.sigma(part.sample(20000, sch, torch.Generator().manual_seed(0)))
    pos = (torch.log(sigma)[:, None] - torch.log(ascending)[None]).abs().argmin(dim=1)
    assert pos.min().item() == 20 and pos.max().item() == 980
    # the whole grid is the draw it always was
    whole = KarrasGrid(num_points=n).sample(64, sch, torch.Generator().manual_seed(1))
    idx = torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sch.sigma(whole), KarrasGrid(num_points=n).sigmas()[idx], rtol=1e-9, atol=0)


def test_karras_grid_spans_a_narrower_schedule_and_lands_on_its_timesteps():
    # SD's schedule covers sigma 0.029..14.6: the 0.002..80 grid would clamp 28% of draws to its noisiest timestep
    sch, grid = VPDiscrete.from_scheduler_config(SD_SCHEDULER), KarrasGrid(num_points=1000)
    assert grid.span(sch) == pytest.approx((float(sch._sigmas[1]), float(sch._sigmas[-1])), rel=1e-9)
    idx = sch.model_time(grid.sample(20000, sch, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(idx, idx.round(), rtol=0, atol=0)
    assert (idx.min().item(), idx.max().item()) == (0, 999)
    assert (idx == 999).double().mean() < 0.005 and (idx == 0).double().mean() < 0.03
    # rho-spaced in sigma between the schedule's own ends: the median draw sits at the grid's middle point
    median_sigma = float(sch._sigmas[1 + int(idx.median())])
    assert median_sigma == pytest.approx(float(grid.sigmas(grid.span(sch))[500]), rel=0.05)
    # a schedule wider than the grid keeps the grid as it is (EDM: 0.002..80, flows: up to infinity)
    assert grid.span(EDM()) == pytest.approx((0.002, 80.0), rel=1e-9)
    assert grid.span(RectifiedFlow())[1] == 80.0


def test_uniform_index_draws_integer_indices():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    t = UniformIndex(20, 1000).sample(8000, sch, torch.Generator().manual_seed(0))
    idx = sch.model_time(t)
    torch.testing.assert_close(idx, idx.round(), rtol=0, atol=1e-9)
    assert idx.min().item() == 20 and idx.max().item() == 999
    full = sch.model_time(UniformIndex().sample(8000, sch, torch.Generator().manual_seed(0)))
    assert full.min().item() >= 0 and full.max().item() <= 1023
    with pytest.raises(ValueError, match="vp_discrete"):
        UniformIndex().sample(4, EDM())
