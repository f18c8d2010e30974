"""Prediction conversions (METHODS.md §1.2): round trips on every schedule, diffusers' v, rectified-flow and TrigFlow
velocities, score, classifier-free guidance, batch splitting and the DDIM x0 target."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from stepdistill.parameterization import (
    DIFFUSERS_PREDICTION,
    KINDS,
    OURS_TO_DIFFUSERS,
    Coefficients,
    Prediction,
    ddim_step,
    ddim_x0_target,
    from_x0_eps,
    to_x0_eps,
)
from stepdistill.schedules import EDM, RectifiedFlow, TrigFlow, VPDiscrete, _bcast
from stepdistill.teachers import DEFAULT_SCHEDULER

from .conftest import SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
# one time per sample, from nearly clean to nearly pure noise
T4 = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=F64)


def _times(schedule):
    """``T4`` with the first time raised to the schedule's ``t_min`` (EDM's sigma at t = 0.05 is 6e-8)."""
    return T4.clamp(min=schedule.t_min)


def _pair(shape=(4, 3, 2), seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)


def _noised(schedule, x0, eps, t):
    c = Coefficients.at(schedule, t, x0)
    return c.a * x0 + c.s * eps, c


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_every_kind(any_schedule, kind):
    x0, eps = _pair()
    x_t, c = _noised(any_schedule, x0, eps, _times(any_schedule))
    out = from_x0_eps(kind, x0, eps, c)
    x0_back, eps_back = to_x0_eps(kind, out, x_t, c)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-10)
    # the Prediction wrapper reads every kind back, exactly in float64
    pred = Prediction.from_output(kind, out, x_t, c)
    for other in KINDS:
        torch.testing.assert_close(pred.get(other, exact=True), from_x0_eps(other, x0, eps, c), rtol=1e-10,
                                   atol=1e-10)


def test_prediction_casts_back_to_the_sample_dtype():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    x0, eps = _pair(dtype=torch.float32)
    x_t = sch.add_noise(x0, eps, T4)
    assert x_t.dtype == torch.float32
    pred = Prediction.from_output("eps", eps, x_t, Coefficients.at(sch, T4, x_t))
    assert pred.x0.dtype == pred.eps.dtype == pred.v.dtype == pred.flow.dtype == pred.score.dtype == torch.float32
    assert pred.x0_64.dtype == pred.get("v", exact=True).dtype == F64
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-5)


def test_add_noise_is_alpha_x0_plus_sigma_eps(any_schedule):
    x0, eps = _pair(dtype=torch.float32)
    x_t = any_schedule.add_noise(x0, eps, T4)
    a, s = any_schedule.alpha(T4)[:, None, None], any_schedule.sigma(T4)[:, None, None]
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t.double(), a * x0.double() + s * eps.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [DEFAULT_SCHEDULER, SD_SCHEDULER], ids=["default_1024", "sd_1000"])
def test_v_matches_diffusers_get_velocity(config):
    scheduler = DDPMScheduler.from_config(config)
    sch = VPDiscrete.from_scheduler_config(config)
    n_train = config["num_train_timesteps"]
    n = torch.tensor([0, 10, n_train // 2, n_train - 1])
    x0, eps = _pair((4, 3, 2, 2), dtype=torch.float32)
    ref = scheduler.get_velocity(x0, eps, n)
    c = Coefficients.at(sch, sch.index_to_t(n), x0)
    ours = from_x0_eps("v", x0.double(), eps.double(), c)
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-6)
    # and a v-prediction is turned back into diffusers' x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    abar = scheduler.alphas_cumprod[n].double()[:, None, None, None]
    x_t = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    x0_v, _ = to_x0_eps("v", ref, x_t, c)
    torch.testing.assert_close(x0_v, abar.sqrt() * x_t - (1 - abar).sqrt() * ref.double(), rtol=0, atol=1e-6)


def test_rectified_flow_velocity_is_eps_minus_x0():
    x0, eps = _pair()
    rf = RectifiedFlow()
    x_t, c = _noised(rf, x0, eps, T4)
    torch.testing.assert_close(from_x0_eps("flow", x0, eps, c), eps - x0, rtol=0, atol=1e-12)
    # x0 = x_t - t u and eps = x_t + (1 - t) u (METHODS.md §1.2)
    u = eps - x0
    x0_u, eps_u = to_x0_eps("flow", u, x_t, c)
    t = T4[:, None, None]
    torch.testing.assert_close(x0_u, x_t - t * u, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_u, x_t + (1 - t) * u, rtol=0, atol=1e-12)
    # the DDIM jump is the Euler step x_s = x_t + (s - t) u (METHODS.md §1.4)
    s = T4 - 0.04
    pred = Prediction.from_output("flow", u, x_t, c)
    torch.testing.assert_close(ddim_step(pred, rf, s), x_t + (s - T4)[:, None, None] * u, rtol=0, atol=1e-12)


def test_shifted_rectified_flow_velocity_is_chain_ruled():
    x0, eps = _pair()
    k = 3.0
    _, c = _noised(RectifiedFlow(shift=k), x0, eps, T4)
    dtp_dt = (k / (1 + (k - 1) * T4) ** 2)[:, None, None]  # t' = k t / (1 + (k - 1) t)
    torch.testing.assert_close(from_x0_eps("flow", x0, eps, c), dtp_dt * (eps - x0), rtol=1e-12, atol=1e-12)


def test_trigflow_velocity_matches_the_scm_formulas():
    """With sigma_data = 1: x0 = cos(s) x_t - sin(s) u and z = sin(s) x_t + cos(s) u for u = dx/ds (sCM)."""
    x0, eps = _pair()
    trig = TrigFlow(sigma_data=1.0)
    x_t, c = _noised(trig, x0, eps, T4)
    u = from_x0_eps("flow", x0, eps, c) / (0.5 * math.pi)  # our flow is d/dt with s = pi t / 2
    ang = (0.5 * math.pi * T4)[:, None, None]
    torch.testing.assert_close(torch.cos(ang) * x_t - torch.sin(ang) * u, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.sin(ang) * x_t + torch.cos(ang) * u, eps, rtol=0, atol=1e-12)


def test_score_is_minus_eps_over_sigma(any_schedule):
    x0, eps = _pair()
    x_t, c = _noised(any_schedule, x0, eps, _times(any_schedule))
    score = Prediction.from_output("x0", x0, x_t, c).get("score", exact=True)
    torch.testing.assert_close(score, -eps / c.s, rtol=1e-12, atol=0)
    torch.testing.assert_close(score, (c.a * x0 - x_t) / c.s**2, rtol=1e-8, atol=1e-8)


def test_unknown_kinds_are_rejected():
    x0, eps = _pair()
    c = Coefficients.at(RectifiedFlow(), T4, x0)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        to_x0_eps("score", x0, x0, c)  # score is an output-only reading
    with pytest.raises(ValueError, match="unknown prediction kind"):
        from_x0_eps("velocity", x0, eps, c)
    # every diffusers prediction_type has a kind; "flow" (our d/dt, chain-ruled through a shift) and sCM's
    # "trigflow" output have no diffusers name
    assert {DIFFUSERS_PREDICTION[OURS_TO_DIFFUSERS[k]] for k in OURS_TO_DIFFUSERS} == set(KINDS) - {"flow", "trigflow"}
    assert DIFFUSERS_PREDICTION["flow_prediction"] == "flow_match"


@pytest.mark.parametrize("schedule", [RectifiedFlow(), RectifiedFlow(shift=3.0)], ids=["rf", "rf-shift3"])
def test_flow_match_is_eps_minus_x0_whatever_the_shift(schedule):
    """SD3/FLUX output eps - x0 (FlowMatchEuler's step is x + (sigma' - sigma) u), not d/dt of the shifted path."""
    x0, eps = _pair()
    x_t, c = _noised(schedule, x0, eps, T4)
    u = eps - x0
    torch.testing.assert_close(from_x0_eps("flow_match", x0, eps, c), u, rtol=0, atol=1e-12)
    x0_u, eps_u = to_x0_eps("flow_match", u, x_t, c)
    torch.testing.assert_close(x0_u, x0.double(), rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_u, eps.double(), rtol=0, atol=1e-10)
    sigma, sigma_next = schedule.sigma(T4), schedule.sigma(T4 - 0.04)
    pred = Prediction.from_output("flow_match", u, x_t, c)
    euler = x_t + (sigma_next - sigma)[:, None, None] * u
    torch.testing.assert_close(ddim_step(pred, schedule, T4 - 0.04), euler, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Guidance and batch splitting


def _uncond_cond(schedule):
    """Two predictions at the same (x_t, t) given as different output kinds."""
    x0, eps = _pair(seed=1)
    x_t, c = _noised(schedule, x0, eps, _times(schedule))
    out_u, out_c = _pair(seed=2)
    return x_t, c, Prediction.from_output("eps", out_u, x_t, c), Prediction.from_output("v", out_c, x_t, c)


def test_combine_with_unit_scale_is_the_conditional(any_schedule):
    _, _, uncond, cond = _uncond_cond(any_schedule)
    plain = Prediction.combine(uncond, cond, 1.0)
    torch.testing.assert_close(plain.x0_64, cond.x0_64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain.eps_64, cond.eps_64, rtol=1e-12, atol=1e-12)
    none = Prediction.combine(uncond, cond, 0.0)
    torch.testing.assert_close(none.x0_64, uncond.x0_64, rtol=0, atol=0)
    torch.testing.assert_close(none.eps_64, uncond.eps_64, rtol=0, atol=0)


@pytest.mark.parametrize("w", [3.5, -0.5])
def test_guidance_is_affine_in_every_parameterisation(any_schedule, w):
    x_t, c, uncond, cond = _uncond_cond(any_schedule)
    guided = Prediction.combine(uncond, cond, w)
    for kind in (*KINDS, "score"):
        u, v = uncond.get(kind, exact=True), cond.get(kind, exact=True)
        torch.testing.assert_close(guided.get(kind, exact=True), u + w * (v - u), rtol=1e-9, atol=1e-9)
    # CFG done in eps space, then converted to x0, is CFG done in x0 space
    eps_cfg = uncond.eps_64 + w * (cond.eps_64 - uncond.eps_64)
    torch.testing.assert_close((x_t - c.s * eps_cfg) / c.a, guided.x0_64, rtol=1e-9, atol=1e-9)


def test_combine_with_per_sample_scale():
    _, _, uncond, cond = _uncond_cond(RectifiedFlow(shift=3.0))
    w = torch.tensor([1.0, 2.0, 4.5, 0.0], dtype=F64)
    guided = Prediction.combine(uncond, cond, w)
    for i, wi in enumerate(w.tolist()):
        one = Prediction.combine(uncond, cond, wi)
        torch.testing.assert_close(guided.x0_64[i], one.x0_64[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(guided.eps_64[i], one.eps_64[i], rtol=0, atol=1e-12)


def test_chunk_splits_the_batch_with_its_coefficients():
    sch = TrigFlow()
    x0, eps = _pair()
    x_t, c = _noised(sch, x0, eps, T4)
    whole = Prediction.from_output("x0", x0, x_t, c)
    first, second = whole.chunk(2)
    for part, rows in ((first, slice(0, 2)), (second, slice(2, 4))):
        torch.testing.assert_close(part.x0_64, x0[rows], rtol=0, atol=0)
        torch.testing.assert_close(part.coeffs.s, c.s[rows], rtol=0, atol=0)
        for kind in ("v", "flow", "score"):
            torch.testing.assert_close(part.get(kind), whole.get(kind)[rows], rtol=0, atol=0)
    # scalar coefficients (one time for the whole batch) are shared by every part
    c0 = Coefficients(*(torch.tensor(v, dtype=F64) for v in (0.8, 0.6, -0.3, 0.4)))
    parts = Prediction(x0, eps, c0, F64).chunk(4)
    assert len(parts) == 4 and all(p.coeffs.a.item() == 0.8 for p in parts)
    torch.testing.assert_close(parts[3].v, 0.8 * eps[3:] - 0.6 * x0[3:], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# DDIM target (progressive distillation)


@pytest.mark.parametrize("t,s", [(1.0, 0.5), (0.75, 0.5), (0.5, 0.125), (0.3, 0.05)])
def test_ddim_x0_target_makes_one_step_land_on_x_s(any_schedule, t, s):
    x_t, x_s = _pair(seed=3)
    x0_tilde = ddim_x0_target(x_t, x_s, any_schedule, t, s)
    assert x0_tilde.dtype == F64
    c = Coefficients.at(any_schedule, torch.full((4,), t, dtype=F64), x_t)
    eps_tilde = (x_t - c.a * x0_tilde) / c.s
    landed = ddim_step(Prediction(x0_tilde, eps_tilde, c, F64), any_schedule, torch.full((4,), s, dtype=F64))
    torch.testing.assert_close(landed, x_s, rtol=0, atol=1e-9)


def test_ddim_x0_target_with_per_sample_times():
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    x_t, x_s = _pair(seed=4)
    t, s = T4, T4 / 2
    x0_tilde = ddim_x0_target(x_t, x_s, sch, t, s)
    for i in range(4):
        one = ddim_x0_target(x_t[i:i + 1], x_s[i:i + 1], sch, t[i:i + 1], s[i:i + 1])
        torch.testing.assert_close(x0_tilde[i:i + 1], one, rtol=1e-12, atol=1e-12)
    # landing at the clean end: the target is x_s itself
    torch.testing.assert_close(ddim_x0_target(x_t, x_s, sch, t, torch.zeros(4, dtype=F64)), x_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_trigflow_output_is_scms_f(sigma_data):
    """On TrigFlow itself x0 = cos(s) x - sd sin(s) F (Lu & Song 2024, Eq. 9, rCM ``denoise``); on any other schedule
    F is the TrigFlow output at the SNR-matched time with the input rescaled to TrigFlow's scale (METHODS.md §1.3)."""
    from stepdistill.schedules import map_time

    x0, eps = _pair()
    trig = TrigFlow(sigma_data=sigma_data)
    c = Coefficients.at(trig, T4, x0)
    x_t = trig.add_noise(x0, eps, T4).double()
    f = from_x0_eps("trigflow", x0.double(), eps.double(), c)
    angle = _bcast(0.5 * math.pi * T4, x0)
    torch.testing.assert_close(torch.cos(angle) * x_t - sigma_data * torch.sin(angle) * f, x0.double())
    for schedule in (VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), RectifiedFlow(shift=3.0)):
        schedule.sigma_data = sigma_data
        here = Coefficients.at(schedule, T4, x0)
        f_here = from_x0_eps("trigflow", x0.double(), eps.double(), here)
        t_trig, _ = map_time(T4, schedule, trig)
        f_trig = from_x0_eps("trigflow", x0.double(), eps.double(), Coefficients.at(trig, t_trig, x0))
        torch.testing.assert_close(f_here, f_trig)
        back = to_x0_eps("trigflow", f_here, schedule.add_noise(x0, eps, T4), here)
        torch.testing.assert_close(back[0], x0.double(), rtol=1e-6, atol=1e-6)


def test_consistency_functions_are_the_identity_at_their_boundary():
    """f(x, t_min) = x (METHODS.md §1.7): LCM at timestep 0 (c_skip(0) = 1, and ~7e-6 by timestep 19), CM at
    sigma_min in EDM's variables; and diffusers' LCMScheduler applies the same scalings."""
    from diffusers import LCMScheduler

    from stepdistill.parameterization import cm_scalings, consistency_output, lcm_scalings

    x0, eps = _pair()
    sd = VPDiscrete.from_scheduler_config(SD_SCHEDULER)
    t0 = sd.index_to_t(torch.zeros(x0.shape[0]))
    x_t = sd.add_noise(x0, eps, t0)
    torch.testing.assert_close(consistency_output("lcm", sd, x_t, x0 + 1.0, t0), x_t.double())
    c_skip, _ = lcm_scalings(torch.tensor(19.0))
    assert c_skip < 7e-6
    lcm = LCMScheduler.from_config(SD_SCHEDULER)
    for n in (0, 5, 399):
        ref = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(n))
        torch.testing.assert_close(torch.stack(lcm_scalings(torch.tensor(float(n)))).float(), torch.stack(ref).float())
    edm = EDM()
    t_min = torch.full((x0.shape[0],), edm.t_min, dtype=F64)
    x = edm.add_noise(x0, eps, t_min)
    torch.testing.assert_close(consistency_output("cm", edm, x, x0 + 1.0, t_min), x.double())
    c_skip, c_out = cm_scalings(torch.tensor(0.002, dtype=F64))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
