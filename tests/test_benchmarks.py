"""The README's benchmark scripts still run against the current library (on the tiny models, one repeat): a change
that breaks them would leave the README's figures without a way to reproduce them. The timings are not checked."""

import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def benches():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_family_speed
        import bench_overhead

        yield bench_family_speed, bench_overhead
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_family_speed_bench_distils_exports_and_times(tmp_path, monkeypatch, benches, family):
    speed, _ = benches
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(speed.DEFAULTS, family, (2, True))  # a 2-step CFG teacher call: only that it runs matters
    rows = speed.bench(family, "tiny", 1, tmp_path, "cpu", torch.float32, ["latent"])
    assert [r["student_steps"] for r in rows] == [1, 4] and all(r["student_s"] > 0 for r in rows)
    # counted as the calls run: 2 steps x CFG = 4 evaluations over 1 and 4 student steps
    assert [(r["teacher_nfe"], r["student_nfe"], r["ideal"]) for r in rows] == [(4, 1, 4.0), (4, 4, 1.0)]


@pytest.mark.parametrize("method, passes", [
    ("progressive", {"teacher fwd": 2, "student fwd+bwd": 1}),
    # the critic trains on the student phase's own samples: no second student pass (DMD2's train_one_step)
    ("dmd2", {"student fwd+bwd": 1, "teacher fwd": 1, "fake_score fwd": 1, "fake_score fwd+bwd": 1}),
])
def test_overhead_bench_records_the_passes_the_readme_lists(tmp_path, monkeypatch, benches, method, passes):
    _, overhead = benches
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = overhead.save_teacher("tiny", tmp_path / "teacher")
    row = overhead.measure(method, teacher, tmp_path, 1, 1, 32)
    assert {p["pass"]: p["per_iter"] for p in row["passes"]} == passes and row["ratio"] > 0
