"""ECT (consistency training and tuning, Geng et al. 2025) as the consistency loss on continuous time pairs: the gap
schedule, the weight, training without a teacher, the L2 distance, and bad input."""

import json

import pytest
import torch

from stepdistill.config import ConfigError, build_recipe
from stepdistill.methods.terms import regression_loss
from stepdistill.methods.time_pairs import ECTPairs
from stepdistill.schedules import EDM, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER
from stepdistill.train import Trainer

from ._recipes import _apply, gmm_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_gap_is_the_whole_time_at_stage_0_for_small_noise_and_shrinks_by_q_per_stage():
    """ECT's t_to_r_sigmoid: at stage 0, r = 0 wherever q^-1 (1 + k sigmoid(-b t)) >= 1 (diffusion pre-training's
    target, the data); at large t the gap (t - r) / t is q^-(stage + 1), a geometric shrink."""
    pairs = ECTPairs(q=4.0, k=8.0, b=1.0)
    small = torch.tensor([0.002, 0.1, 0.5], dtype=torch.float64)  # sigmoid(-t) >= 3/8 up to t = 0.51
    assert torch.equal(pairs.gap_ratio(small, 0), torch.zeros(3, dtype=torch.float64))
    big = torch.tensor([60.0], dtype=torch.float64)
    gaps = [1 - float(pairs.gap_ratio(big, s)) for s in range(4)]
    for s, gap in enumerate(gaps):
        assert gap == pytest.approx(4.0 ** -(s + 1), rel=1e-9)


@pytest.mark.parametrize("schedule", [EDM(), VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)],
                         ids=["edm", "vp"])
def test_pairs_are_ordered_on_the_schedule_and_weighted_by_snr_plus_one_over_sd_squared(schedule):
    pairs = ECTPairs(stage_steps=10, sigma_data=0.5)
    t, r, weight = pairs.draw(4000, schedule, 10, torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and float(t.min()) >= schedule.t_min and float(t.max()) <= 1.0
    sigma = schedule.sigma(t) / schedule.alpha(t)
    torch.testing.assert_close(weight, 1 / sigma**2 + 1 / 0.25)
    inside = (t > schedule.t_min) & (t < 1)
    log_sigma = torch.log(sigma[inside])
    assert abs(float(log_sigma.mean()) + 1.1) < 0.25  # ln sigma ~ N(-1.1, 2^2), truncated at the schedule's ends


def test_the_l2_distance_is_the_norm_and_has_a_finite_gradient_where_both_sides_agree():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = regression_loss(x, y, "l2")
    torch.testing.assert_close(loss, torch.tensor([5.0, 0.0]), atol=1e-6, rtol=0)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()


def _ect(tmp_path, **overrides):
    recipe = _apply(gmm_recipe(), {"method": {"name": "ect", "times": {"name": "ect", "stage_steps": 2}},
                                   "data.batch_size": 16, "train.max_steps": 4, **overrides})
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


@pytest.mark.parametrize("name,times,key,expected", [
    ("ect", {"name": "ect", "stage_steps": 2}, "schedule/ect_stage", [0.0, 0.0, 1.0, 1.0]),
    ("ict", {"name": "ict", "total_steps": 4}, "schedule/ict_intervals", [10.0, 20.0, 40.0, 80.0]),
])
def test_consistency_training_never_calls_the_teacher_and_its_curriculum_advances(tmp_path, monkeypatch, name, times,
                                                                                  key, expected):
    trainer = _ect(tmp_path, **{"method.name": name, "method.times": times})

    def refuse(*args, **kwargs):
        raise AssertionError("consistency training called the teacher")

    monkeypatch.setattr(type(trainer.nets.teacher), "forward", refuse)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r[key] for r in rows] == expected
    assert all(torch.isfinite(torch.tensor(r["loss/student"])) for r in rows)


@pytest.mark.parametrize("overrides,message", [
    ({"method.times": {"name": "ect", "stage_steps": 0}}, "stage_steps .* must be at least 1"),
    ({"method.times": {"name": "ect", "stages": 3}}, "unknown ect settings"),
    ({"method.times": "karras"}, "method.times must be ladder, ect, ict"),
    ({"data.source": "gaussian"}, "needs a real-data source"),
    ({"method.x0_source": "teacher"}, "consistency training on real data"),
    ({"method.endpoint": "phase"}, "continuous pairs need method.endpoint: data"),
])
def test_bad_ect_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _ect(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_icts_grid_doubles_from_s0_to_s1_over_the_run_and_its_pairs_follow_the_discretised_log_normal():
    """iCT §3.4-3.5: N(k) - 1 = min(s0 2^floor(k / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1)); pair i of
    the Karras grid with probability erf(..sigma_{i+1}..) - erf(..sigma_i..), weight 1 / (sigma_{i+1} - sigma_i)."""
    import math

    from stepdistill.methods.time_pairs import ICTPairs

    pairs = ICTPairs(total_steps=800, s0=10, s1=1280)  # K' = 800 // 8 = 100
    assert [pairs.intervals(k) for k in (0, 99, 100, 250, 700, 799)] == [10, 10, 20, 40, 1280, 1280]
    sigma = pairs.sigmas(0)
    assert sigma[0] == pytest.approx(0.002) and sigma[-1] == pytest.approx(80.0) and len(sigma) == 11
    t, r, weight = pairs.draw(20000, EDM(), 0, torch.Generator().manual_seed(0))
    edm = EDM()
    s_t, s_r = edm.sigma(t) / edm.alpha(t), edm.sigma(r) / edm.alpha(r)
    torch.testing.assert_close(weight, 1 / (s_t - s_r), rtol=1e-6, atol=0)
    cdf = torch.erf((torch.log(sigma) + 1.1) / (math.sqrt(2) * 2.0))
    expected = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    idx = torch.searchsorted(sigma, s_t * (1 - 1e-9)) - 1  # the interval each pair's upper end closes
    observed = torch.bincount(idx, minlength=10).double() / 20000
    assert float((observed - expected).abs().max()) < 0.01

