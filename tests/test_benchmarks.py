"""The README's benchmark scripts still run against the current library (on the tiny models, one repeat): a change
that breaks them would leave the README's figures without a way to reproduce them. The timings are not checked."""

import json
import math
import sys
from collections import Counter

import pytest
import torch

from ._benchmarks import bench_module, bench_modules


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def benches():
    yield from bench_modules("bench_family_speed", "bench_overhead")


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_family_speed_bench_distils_exports_and_times(tmp_path, monkeypatch, benches, family):
    speed, _ = benches
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(speed.DEFAULTS, family, (2, True))  # a 2-step CFG teacher call: only that it runs matters
    rows = speed.bench(family, "tiny", 1, tmp_path, "cpu", torch.float32, ["np"])
    assert [r["student_steps"] for r in rows] == [1, 4] and all(r["student_s"] > 0 for r in rows)
    # counted as the calls run: 2 steps x CFG = 4 evaluations over 1 and 4 student steps, one backbone call a step at
    # the student's batch (no CFG pair), one prompt encoding, nothing flagged as waste
    assert [(r["teacher_nfe"], r["student_nfe"], r["nfe_ratio"]) for r in rows] == [(4, 1, 4.0), (4, 4, 1.0)]
    assert [(r["student_k"], r["student_batch"], r["teacher_k"], r["teacher_batch"]) for r in rows] == [
        (1, 1, 2, 2), (4, 1, 2, 2)]
    assert all(r["student_encode_calls"] == 1 and r["waste"] == [] for r in rows)
    # the pieces of the student call, measured directly, and the ratios built on them (values not checked: noisy)
    for r in rows:
        for key in ("encode_s", "decode_s", "fixed_s", "eval_s", "expected_s", "student_ratio", "teacher_fixed_s",
                    "teacher_eval_s", "teacher_half_eval_s", "cfg_factor", "teacher_ratio", "speedup", "ideal",
                    "ideal_with_fixed"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["fixed_s"] >= r["encode_s"] and r["expected_s"] > r["student_k"] * r["eval_s"]
    assert speed.table(rows).count("\n") == 3  # header, rule, a row per student


@pytest.mark.parametrize("method, passes", [
    ("progressive", {"teacher fwd": 2, "student fwd+bwd": 1}),
    # the critic trains on the student phase's own samples: no second student pass (DMD2's train_one_step)
    ("dmd2", {"student fwd+bwd": 1, "teacher fwd": 1, "fake_score fwd": 1, "fake_score fwd+bwd": 1}),
    # LCM-LoRA's step: the CFG teacher's DDIM step, the target from the student under no grad, the student trained
    ("lcm", {"teacher fwd": 1, "student fwd": 1, "student fwd+bwd": 1}),
    # sCM: the CFG teacher's velocity, the student's time derivative (forward-mode JVP, or a central difference's three
    # forwards: value, plus and minus), the student trained
    ("scm", {"teacher fwd": 1, "student jvp": 1, "student fwd+bwd": 1}),
    ("scm-fd", {"teacher fwd": 1, "student fwd": 3, "student fwd+bwd": 1}),
    # SiD: the critic's update on a no-grad generator sample, then the generator's loss through the inputs of the CFG
    # teacher and the CFG fake score (their weights frozen: input gradients only)
    ("sid", {"student fwd": 1, "fake_score fwd+bwd": 1, "student fwd+bwd": 1,
             "teacher fwd+bwd (input grad only)": 1, "fake_score fwd+bwd (input grad only)": 1}),
    # its sequential backward: a no-grad generator draw and a no-grad fake-score pass more
    ("sid-seq", {"student fwd": 2, "fake_score fwd+bwd": 1, "student fwd+bwd": 1, "fake_score fwd": 1,
                 "teacher fwd+bwd (input grad only)": 1, "fake_score fwd+bwd (input grad only)": 1}),
])
def test_overhead_bench_records_the_passes_the_readme_lists(tmp_path, monkeypatch, benches, method, passes):
    _, overhead = benches
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = overhead.save_teacher("tiny", tmp_path / "teacher")
    row = overhead.measure(method, teacher, tmp_path, 1, 1, 32)
    counted = Counter()
    for p in row["passes"]:  # one label may cover passes in two states (the student frozen in the critic phase)
        counted[p["pass"]] += p["per_iter"]
    assert counted == passes and row["ratio"] > 0


def test_the_probes_exact_fake_score_is_the_gaussian_posterior_mean():
    """``dm_gradient_probe.empirical_x0``, the fake score of a perfect critic for a sample set, against the closed form
    for Gaussian data: ``x0 ~ N(0, v I)`` gives ``E[x0 | x_t] = a v x_t / (a^2 v + s^2)``."""
    empirical_x0 = bench_module("dm_gradient_probe").empirical_x0
    g = torch.Generator().manual_seed(0)
    v, a, s = 0.25, 0.8, 0.6
    reference = torch.randn(200_000, 1, generator=g, dtype=torch.float64) * v**0.5
    x_t = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None]
    torch.testing.assert_close(empirical_x0(x_t, reference, a, s), a * v * x_t / (a**2 * v + s**2), atol=5e-3, rtol=0)


def _bench_module(name: str, tmp_path, monkeypatch):
    """A script of benchmarks/ imported as a module, with the run's caches under ``tmp_path``."""
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    return bench_module(name)


def test_mixture_bench_trains_a_recipe_on_a_benchmark_mixture_and_reads_mode_weights(tmp_path, monkeypatch):
    """``mixture_bars.run``: the recipe's mixture replaced by a benchmark family's, trained, and the student, the
    teacher at 64 and at 4 NFE scored with mode weights that are distributions over the family's modes."""
    mixture_bars = _bench_module("mixture_bars", tmp_path, monkeypatch)
    over = ["train.max_steps=2", "method.regression_warmup=1", "method.num_pairs=16", "method.pair_steps=4",
            "teacher.gmm.fit.steps=5", "train.sample_every=0", "train.checkpoint_every=0", "data.batch_size=16"]
    m = mixture_bars.run("dmd2/gmm.yaml", "highdim", 0, overrides=over, out=tmp_path, samples=64, eval_seeds=1,
                         track=1)
    assert [h["step"] for h in m["history"]] == [0, 1]
    for who in ("student", "teacher@64", "teacher@4"):
        assert m[who]["modes"] == 6 and abs(sum(m[who]["weights"]) - 1) < 1e-6 and 0 <= m[who]["tv_true"] <= 1


def test_quality_bars_evaluate_one_consistency_student_at_several_step_counts(tmp_path, monkeypatch):
    """``quality_bars``: the 1- and 2-step LCM benches share one trained student (one run directory), each bench's
    metrics are its own step count's, and the one-step bench checks coverage only."""
    quality_bars = _bench_module("quality_bars", tmp_path, monkeypatch)
    over = ["teacher.gmm.fit.steps=5", "train.max_steps=2", "train.sample_every=0", "train.checkpoint_every=0",
            "data.batch_size=16"]
    monkeypatch.setattr(sys, "argv", ["quality_bars.py", "lcm-gmm-1step", "lcm-gmm-2step", "--out", str(tmp_path),
                                      "--samples", "64", "--seeds", "1", "--set", *over])
    quality_bars.main()
    assert (tmp_path / "lcm-gmm-1step" / "pipeline").is_dir()
    assert not (tmp_path / "lcm-gmm-2step" / "pipeline").exists()
    one, two = (json.loads((tmp_path / f"lcm-gmm-{k}step" / "metrics.json").read_text()) for k in (1, 2))
    assert one["student"]["nfe"] == 1 and two["student"]["nfe"] == 2
    assert list(one["bars"]) == ["all modes covered"] and len(two["bars"]) == 3
