"""Smoke test of ``benchmarks/bench_lcm_official.py`` (our LCM-LoRA iteration beside diffusers' example script
``train_lcm_distill_lora_sd_wds.py``) on the tiny SD1.5 model. It needs that script, which the project does not ship
(``$LCM_SCRIPT``, else ``/work/lcm_official/train_lcm_distill_lora_sd_wds.py``), and the ``webdataset`` and
``braceexpand`` packages its data loader imports; skipped without them. The timings are not checked, only that both
sides ran and trained, made the passes they should and gave finite ratios."""

import math

import pytest

from ._benchmarks import bench_modules


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    for (module,) in bench_modules("bench_lcm_official"):  # benchmarks/ importable until teardown
        yield module


def test_lcm_official_side_by_side_runs_both_sides_with_finite_ratios(tmp_path, monkeypatch, bench):
    script = bench.default_script()
    if not script.is_file():
        pytest.skip(f"no diffusers train_lcm_distill_lora_sd_wds.py at {script} (set LCM_SCRIPT)")
    if bench.missing_packages():
        pytest.skip(f"the script's data loader needs {', '.join(bench.missing_packages())}")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    args = bench.parser().parse_args(["--script", str(script), "--size", "tiny", "--iters", "2", "--warmup", "1"])
    result = bench.run(args)
    assert result["updated"] == {"ours": {"student": True}, "theirs": {"student": True}}
    # ours: the teacher once at the CFG batch (base, adapters off), the target from the student under no grad, the
    # student with its graph; latents and caption embeddings come from the caches made at setup
    assert result["calls_per_iter"]["ours"] == {"teacher (base, adapters off) fwd x4": 1,
                                                "student (adapter) fwd x2": 1, "student (adapter) fwd+graph x2": 1}
    # theirs: the same passes, the teacher as two batch-2 passes (conditional, unconditional), plus the caption
    # encoding and the VAE encode of the images every iteration
    assert result["calls_per_iter"]["theirs"] == {"teacher fwd x2": 2, "student (LoRA) fwd x2": 1,
                                                  "student (LoRA) fwd+graph x2": 1, "text_encoder fwd x2": 1,
                                                  "vae_encoder fwd x2": 1}
    assert result["unet_forwards_per_iter"] == {"ours": 3, "theirs": 4}
    for side in ("ours", "theirs"):
        assert len(result["raw_s"][side]) == 2
        for key in ("wall", "cpu", "unet_forward", "optimizer"):
            assert result["median_s"][side][key] > 0, (side, key)
    for key in ("text_encoder", "vae_encode"):
        assert result["median_s"]["theirs"][key] > 0, key
    for key in ("wall_ratio", "wall_ratio_without_vae_text", "cpu_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["torchvision"] in ("shim", "installed")
    assert (result["precision"], result["their_autocast"]) == ("fp32", "off")  # both sides in float32
    assert "--mixed_precision no" in result["their_flags"] and "--lora_rank 64" in result["their_flags"]
    assert bench.table(result).count("\n") == 8  # header, rule, 3 time rows, 2 piece rows, VAE/text, pass count
