"""Smoke test of ``benchmarks/bench_dmd2_official.py`` (our DMD2 iteration beside DMD2's official code) on the tiny
SD1.5 model. It needs tianweiy/DMD2's code, which the project does not ship (non-commercial license): a folder holding
its ``main/`` or a git repository of it, named by ``$DMD2_REPO`` (else the mirror path below); skipped without one.
The timings are not checked, only that both sides ran, made the passes they should and gave finite ratios."""

import math
import os
from pathlib import Path

import pytest

from ._benchmarks import bench_modules


MIRROR = Path("/work/.mirror/tianweiy+DMD2/repo")

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_repo() -> Path | None:
    for candidate in (os.environ.get("DMD2_REPO"), MIRROR):
        if candidate and Path(candidate).exists():
            path = Path(candidate)
            exported = (path / "main" / "sd_unified_model.py").is_file()
            if exported or (path / "HEAD").is_file() or (path / ".git").exists():  # or a (bare) git repository
                return path
    return None


@pytest.fixture(scope="module")
def bench():
    for (module,) in bench_modules("bench_dmd2_official"):  # benchmarks/ importable until teardown
        yield module


def test_dmd2_official_side_by_side_runs_both_sides_with_finite_ratios(tmp_path, monkeypatch, bench):
    repo = _official_repo()
    if repo is None:
        pytest.skip("no tianweiy/DMD2 checkout (set DMD2_REPO to a folder holding its main/ or a git repository)")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    args = bench.parser().parse_args(["--repo", str(repo), "--size", "tiny", "--iters", "1", "--warmup", "1",
                                      "--mem-iters", "1"])
    result = bench.run(args)
    # both sides updated their generator and their fake score
    assert result["updated"] == {side: {"generator": True, "fake_score": True} for side in ("ours", "theirs")}
    # the same four UNet passes on each side: the critic reuses the student phase's samples (no second student pass)
    assert result["unet_forwards_per_iter"] == {"ours": 4, "theirs": 4}
    assert result["calls_per_iter"]["ours"] == {"student fwd+graph x2": 1, "teacher fwd x4": 1,
                                                "fake_score fwd x2": 1, "fake_score fwd+graph x2": 1}
    assert result["calls_per_iter"]["theirs"] == {"generator fwd+graph x2": 1, "real_unet fwd x4": 1,
                                                  "fake_unet fwd x2": 1, "fake_unet fwd+graph x2": 1}
    for key in ("wall_ratio", "cpu_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    for key, ratio in result["memory_ratio"].items():
        assert math.isfinite(ratio) and ratio > 0, (key, ratio)
    assert bench.table(result).count("\n") == 9  # header, rule, 4 time rows, 3 memory rows, the pass count
