"""Samplers: parity with diffusers' DDIM, DPM-Solver++(2M) and Heun schedulers on the same tiny UNet, the few-step
student sampler, vector data, and the whole chain on the exact Gaussian-mixture teacher (modes, solver orders)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

from stepdistill.denoisers import GMMDenoiser, UNet2DDenoiser
from stepdistill.mixture import GaussianMixture
from stepdistill.parameterization import OURS_TO_DIFFUSERS
from stepdistill.sampling import (
    StudentGrid,
    nfe,
    prior_noise,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_student,
)
from stepdistill.schedules import EDM, RectifiedFlow, TrigFlow, VPCosine, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER, tiny_unet2d, vector_unet

from .conftest import SCHEDULE_FACTORIES, SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
STEPS = [1, 4, 8]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_unet2d().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vp():
    return VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _scheduler(cls, prediction: str, **kwargs):
    config = {**DEFAULT_SCHEDULER, "prediction_type": OURS_TO_DIFFUSERS[prediction]}
    return cls.from_config(config, timestep_spacing="trailing", **kwargs)


@torch.no_grad()
def _diffusers_loop(scheduler, unet, sample, steps):
    """The loop every diffusers pipeline runs."""
    scheduler.set_timesteps(steps)
    vector = sample.ndim == 2
    x = sample[:, :, None, None] if vector else sample
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x[:, :, 0, 0] if vector else x


def _assert_parity(ours, ref):
    """Same result up to float32 rounding. A random eps-net's x0 at t = 1 is eps / alpha(1) ~ 178 eps (values
    ~600), so the tolerance is relative to the output's scale."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * max(10.0, ref.abs().max().item()))


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers on a tiny UNet


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers_ddim_trailing(unet, vp, noise, prediction, steps):
    den = UNet2DDenoiser(unet, vp, prediction)
    ours = sample_ddim(den, noise.clone(), vp.grid(steps))
    scheduler = _scheduler(DDIMScheduler, prediction, set_alpha_to_one=True, clip_sample=False)
    _assert_parity(ours, _diffusers_loop(scheduler, unet, noise.clone(), steps))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [*STEPS, 3])  # 3 does not divide 1024: trailing indices 1023, 682, 340
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(unet, vp, noise, prediction, steps):
    den = UNet2DDenoiser(unet, vp, prediction)
    ours = sample_dpmpp_2m(den, noise.clone(), vp.grid(steps))
    scheduler = _scheduler(DPMSolverMultistepScheduler, prediction, algorithm_type="dpmsolver++", solver_order=2,
                           final_sigmas_type="zero")
    assert scheduler.init_noise_sigma == 1.0  # VP schedulers start from plain noise, as we do
    _assert_parity(ours, _diffusers_loop(scheduler, unet, noise.clone(), steps))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [*STEPS, 3])
def test_heun_matches_diffusers_heun_discrete(unet, vp, noise, prediction, steps):
    """diffusers' Heun works on x / alpha in sigma space, so the same x_T enters it as x_T / alpha(1).

    Its ``init_noise_sigma`` for "trailing" is sigma_max = 177.7278, not 1 / alpha(1) = sqrt(1 + sigma_max^2)
    = 177.7306 (ECOSYSTEM.md §1.2); starting from ``noise * init_noise_sigma`` would feed the UNet 0.99998 * noise.
    """
    den = UNet2DDenoiser(unet, vp, prediction)
    ours = sample_heun(den, noise.clone(), vp.grid(steps))
    scheduler = _scheduler(HeunDiscreteScheduler, prediction)
    start = (noise.double() / vp.alpha(1.0)).float()
    _assert_parity(ours, _diffusers_loop(scheduler, unet, start, steps))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_samplers_match_diffusers_on_an_sd_schedule(unet, noise, sampler):
    """The same checks on SD's 1000-step scaled_linear schedule (4 steps: indices 999, 749, 499, 249)."""
    config = {**SD_SCHEDULER, "timestep_spacing": "trailing"}
    sch = VPDiscrete.from_scheduler_config(config)
    den = UNet2DDenoiser(unet, sch, "eps")
    start = noise.clone()
    if sampler == "ddim":
        ours = sample_ddim(den, noise.clone(), sch.grid(4))
        scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=True)
    elif sampler == "dpmpp_2m":
        ours = sample_dpmpp_2m(den, noise.clone(), sch.grid(4))
        scheduler = DPMSolverMultistepScheduler.from_config(config, final_sigmas_type="zero")
    else:
        ours = sample_heun(den, noise.clone(), sch.grid(4))
        scheduler = HeunDiscreteScheduler.from_config(config)
        start = (noise.double() / sch.alpha(1.0)).float()
    _assert_parity(ours, _diffusers_loop(scheduler, unet, start, 4))
    assert scheduler.timesteps[0].item() == 999


def test_vector_data_through_vector_unet(vp):
    torch.manual_seed(0)
    unet = vector_unet(2, width=16).eval().requires_grad_(False)
    den = UNet2DDenoiser(unet, vp, "v")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    pred = den(x, torch.full((16,), 0.5, dtype=F64))
    assert pred.x0.shape == (16, 2)
    ours = sample_ddim(den, x.clone(), vp.grid(4))
    assert ours.shape == (16, 2)
    _assert_parity(ours, _diffusers_loop(_scheduler(DDIMScheduler, "v", set_alpha_to_one=True), unet, x, 4))
    ours = sample_dpmpp_2m(den, x.clone(), vp.grid(4))
    scheduler = _scheduler(DPMSolverMultistepScheduler, "v", final_sigmas_type="zero")
    _assert_parity(ours, _diffusers_loop(scheduler, unet, x, 4))
    assert torch.isfinite(sample_heun(den, x.clone(), vp.grid(4))).all()


# ---------------------------------------------------------------------------------------------------------------
# The student sampler


def test_student_ddim_grid_equals_sample_ddim(unet, vp, noise):
    den = UNet2DDenoiser(unet, vp, "v")
    grid = StudentGrid((1.0, 0.75, 0.5, 0.25), "ddim")
    assert grid.steps == 4 and grid.with_end().tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    torch.testing.assert_close(grid.with_end(), vp.grid(4), rtol=0, atol=0)  # the trailing 4-step grid
    student = sample_student(den, noise.clone(), grid)
    torch.testing.assert_close(student, sample_ddim(den, noise.clone(), grid.with_end()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("times", [(1.0, 0.5), (0.8, 0.6, 0.4)])
def test_student_starts_from_noise_at_the_marginal_scale_of_its_first_time(times):
    sch = EDM()  # the marginal scale sqrt(1 + sigma^2) is far from 1 and differs between times
    den = GMMDenoiser(GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], 0.2), sch)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = StudentGrid(times)
    expected = sample_ddim(den, noise * (1 + sch.sigma(times[0]) ** 2).sqrt(), grid.with_end())
    torch.testing.assert_close(sample_student(den, noise, grid), expected, rtol=1e-12, atol=1e-12)


def test_student_renoise_grid_draws_fresh_noise():
    gmm = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], 0.2)
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    den = GMMDenoiser(gmm, sch)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    grid = StudentGrid((1.0, 0.5), "renoise")
    out = sample_student(den, noise, grid, generator=torch.Generator().manual_seed(5))
    # by hand: denoise at t = 1, re-noise to t = 1/2 with fresh noise, denoise and land on 0
    gen = torch.Generator().manual_seed(5)
    x0 = den(noise, torch.tensor(1.0, dtype=F64)).x0_64
    z = torch.randn(noise.shape, generator=gen, dtype=noise.dtype).double()
    x = (sch.alpha(0.5) * x0 + sch.sigma(0.5) * z).float()
    torch.testing.assert_close(out, den(x, torch.tensor(0.5, dtype=F64)).x0, rtol=0, atol=1e-6)
    assert (out - sample_student(den, noise, StudentGrid((1.0, 0.5)))).abs().max() > 1e-3
    # the callback sees each step's state and clean estimate (what benchmarks/multistep_probe.py scores)
    seen = []
    sample_student(den, noise, grid, generator=torch.Generator().manual_seed(5),
                   callback=lambda i, x_i, pred: seen.append((i, x_i, pred.x0)))
    assert [i for i, _, _ in seen] == [0, 1]
    torch.testing.assert_close(seen[0][2], x0.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[0][1], x, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[1][1], out, rtol=0, atol=0)


def test_student_grid_validation():
    for bad in [(1.0, 1.0), (0.5, 0.75), (1.0, 0.0), ()]:
        with pytest.raises(ValueError):
            StudentGrid(bad)
    with pytest.raises(ValueError, match="transition"):
        StudentGrid((1.0,), "stochastic")


@pytest.mark.parametrize("name", ["vp_default", "edm", "trigflow", "rf"])
def test_prior_noise_is_the_marginal_scale(name):
    sch = SCHEDULE_FACTORIES[name]()
    expected = {"vp_default": 1.0, "edm": math.sqrt(1 + 80.0**2), "trigflow": 0.5, "rf": 1.0}[name]
    noise = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior_noise(sch, noise), noise * expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The whole chain on the exact mixture teacher


MIXTURE = GaussianMixture([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.5]], [0.3, 0.6, 0.15], [0.5, 0.3, 0.2])


@pytest.mark.parametrize("name", ["vp_default", "edm", "rf_shift3", "trigflow", "vp_cosine"])
def test_ddim_on_the_gmm_oracle_lands_on_the_modes(name):
    sch = SCHEDULE_FACTORIES[name]()
    den = GMMDenoiser(MIXTURE, sch)
    gen = torch.Generator().manual_seed(0)
    x = sample_ddim(den, prior_noise(sch, torch.randn(2000, 2, generator=gen)), sch.grid(64))
    assert x.shape == (2000, 2) and torch.isfinite(x).all()
    log_prob = MIXTURE.log_prob(x)
    reference = MIXTURE.log_prob(MIXTURE.sample(20000, gen)[0])  # exact samples: 99.7% above -7, mean -1.6
    assert (log_prob > -7.0).double().mean().item() > 0.98
    assert log_prob.mean().item() == pytest.approx(reference.mean().item(), abs=0.2)
    # the modes are filled in proportion to their weights
    torch.testing.assert_close(MIXTURE.responsibilities(x).mean(0), MIXTURE.weights, rtol=0, atol=0.03)


@pytest.mark.parametrize("name", ["vp_default", "edm", "rf_shift3"])
def test_solvers_converge_at_their_order_on_the_gmm_oracle(name):
    """Halving the step from 16 to 32 steps cuts DDIM's error ~2x (first order), Heun's and DPM++(2M)'s ~4x."""
    sch = SCHEDULE_FACTORIES[name]()
    den = GMMDenoiser(MIXTURE, sch)
    x = prior_noise(sch, torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=F64))
    reference = sample_dpmpp_2m(den, x.clone(), sch.grid(256))

    def error(sampler, steps):
        return (sampler(den, x.clone(), sch.grid(steps)) - reference).norm(dim=1).median().item()

    orders, errors = {}, {}
    for sampler in (sample_ddim, sample_heun, sample_dpmpp_2m):
        e16, e32 = error(sampler, 16), error(sampler, 32)
        orders[sampler.__name__], errors[sampler.__name__] = math.log2(e16 / e32), e32
    assert 0.75 < orders["sample_ddim"] < 1.35, orders
    assert orders["sample_heun"] > 1.5 and orders["sample_dpmpp_2m"] > 1.5, orders
    assert max(errors["sample_heun"], errors["sample_dpmpp_2m"]) < 0.5 * errors["sample_ddim"], errors


@pytest.mark.parametrize("schedule", [RectifiedFlow(), TrigFlow()], ids=["rf", "trigflow"])
def test_heun_starts_from_alpha_zero(schedule):
    """alpha(1) = 0: the scale-free ODE starts at sigma_bar = inf, so Heun's first step is Euler (no NaN)."""
    den = GMMDenoiser(MIXTURE, schedule)
    x = prior_noise(schedule, torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=F64))
    out = sample_heun(den, x.clone(), schedule.grid(32))
    assert torch.isfinite(out).all()
    reference = sample_dpmpp_2m(den, x.clone(), schedule.grid(256))
    assert (out - reference).norm(dim=1).median().item() < 0.02


def test_conditional_sampling_lands_on_the_requested_mode():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    den = GMMDenoiser(MIXTURE, sch)
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.full((500,), 2)}
    for sampler in (sample_ddim, sample_dpmpp_2m):
        plain = sampler(den, noise.clone(), sch.grid(32), cond=cond)
        assert (MIXTURE.responsibilities(plain).argmax(1) == 2).double().mean().item() > 0.99
        guided = sampler(den, noise.clone(), sch.grid(32), cond=cond, w=3.0)
        assert (MIXTURE.responsibilities(guided).argmax(1) == 2).double().mean().item() > 0.99
        assert (guided - plain).abs().max().item() > 1e-3  # guidance did something


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping


class _Counting(GMMDenoiser):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def forward(self, x_t, t, cond=None):
        self.calls += 1
        return super().forward(x_t, t, cond)


@pytest.mark.parametrize("sampler_name,sampler", [("ddim", sample_ddim), ("euler", sample_euler),
                                                  ("heun", sample_heun), ("dpmpp_2m", sample_dpmpp_2m)])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_network_evaluations_match_nfe(sampler_name, sampler, steps):
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    den = _Counting(MIXTURE, sch)
    seen = []
    sampler(den, torch.randn(4, 2), sch.grid(steps), callback=lambda i, x, pred: seen.append((i, x.shape)))
    assert den.calls == nfe(sampler_name, steps)
    assert seen == [(i, (4, 2)) for i in range(steps)]


def test_samplers_keep_the_sample_dtype():
    for sch in (VPCosine(), EDM()):
        den = GMMDenoiser(MIXTURE, sch)
        for sampler in (sample_ddim, sample_heun, sample_dpmpp_2m):
            for dtype in (torch.float32, F64):
                out = sampler(den, prior_noise(sch, torch.randn(8, 2, dtype=dtype)), sch.grid(4))
                assert out.dtype == dtype and torch.isfinite(out).all()
