"""Two real CPU processes (gloo) under `accelerate launch`: both ranks end with identical weights."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ._recipes import gmm_recipe


ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, tmp_path):
    # ACCELERATE_USE_CPU=1 + --multi_gpu is what starts real ranks on a CPU box (ECOSYSTEM.md §3.4).
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "STEPDISTILL_CACHE": f"{tmp_path}-cache"}  # beside the run directory, which must start empty
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # every rank's error line first: the tail alone often shows only the survivor's "connection closed by peer"
    errors = [line for line in proc.stderr.splitlines() if "Error" in line and "]:" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stderr[-3000:]
    return proc


JOB = str(ROOT / "tests" / "_ddp_job.py")
DDP = ("pd", "dmd2", "dmd2-lora", "sd15", "sd15-dmd2-lora", "sd3", "ladd-lora")
FSDP = ("dmd2", "pd-ema", "sd15", "sd15-dmd2-lora", "rcm", "sid")
FSDP_SLOW = ("phased-lora", "lightning", "ladd-lora")  # ~45 s each: slow tier


def _resumes(kind: str) -> bool:
    """The kinds whose sharded roles and optimizers the FSDP test resumes exactly."""
    return kind.startswith(("dmd2", "pd", "rcm", "sid")) or kind.endswith("lora")


def _fsdp_runs(out: Path, kinds) -> Path:
    """``kinds`` under FSDP2 in one launch (OUT/KIND-fsdp), then each resuming kind again from its step-2 checkpoint
    in a second launch; the first run's rank-0 weights are kept as ``weights-first.npy``."""
    _launch([JOB, str(out), ",".join(f"{k}-fsdp" for k in kinds)], out)
    resumed = [k for k in kinds if _resumes(k)]
    for kind in kinds:
        run = out / f"{kind}-fsdp"
        (run / "weights-rank0.npy").rename(run / "weights-first.npy")
        if kind in resumed:
            shutil.rmtree(run / "checkpoints" / "step-4")
    if resumed:
        _launch([JOB, str(out), ",".join(f"{k}-fsdp" for k in resumed), "resume"], out)
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Every DDP kind of this module, the FSDP tests' references included, in one launch."""
    out = tmp_path_factory.mktemp("ddp")
    _launch([JOB, str(out), ",".join(dict.fromkeys(DDP + FSDP))], out)
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    return _fsdp_runs(tmp_path_factory.mktemp("fsdp"), FSDP)


@pytest.mark.parametrize("kind", DDP)
def test_two_ranks_end_with_identical_weights(ddp_runs, kind):
    # dmd2: student, fake score and GAN head all DDP-wrapped; the generator's GAN loss runs through the fake score
    # (which breaks naive DDP, ECOSYSTEM.md §3.2) with the student updated every 2nd step; dmd2-lora also accumulates
    # two micro-batches. sd15*: a tiny Stable Diffusion teacher conditioned on a prompt file, in full and in
    # LoRA-roles mode. sd3: buffers in the backbone, which DDP broadcasts in forward (the main process's sample grid
    # must not start that collective alone). ladd-lora: the generator's adversarial loss through the discriminator's
    # encoder, an adapter of the student's own base. Weights are each rank's own, in memory. The runs share two
    # processes, one after another, as a user's script may run several Trainers.
    run = ddp_runs / kind
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    if kind.startswith("dmd2"):
        assert ranks[0]["roles"] == ["discriminator", "fake_score", "student"]
    if kind.startswith("sd15"):
        assert len(list(Path(f"{run}-cache", "prompt_embeds").glob("*.safetensors"))) == 1
    assert all(r["world"] == 2 and "MULTI_CPU" in r["distributed"] for r in ranks)
    assert ranks[0]["first_batch_sum"] != ranks[1]["first_batch_sum"], "ranks must draw different batches"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["losses"] and ranks[0]["losses"] == ranks[1]["losses"]  # logged losses: the mean over ranks
    assert (run / "checkpoints" / "step-4" / "rng-rank1.safetensors").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 4  # one writer


@pytest.mark.parametrize("kind", [*FSDP, *(pytest.param(k, marks=pytest.mark.slow) for k in FSDP_SLOW)])
def test_fsdp_matches_ddp_and_resumes_exactly_from_sharded_checkpoints(tmp_path, request, kind):
    """``train.fsdp``: every trainable role sharded with FSDP2 over 2 real gloo ranks. The result equals the DDP run
    of the same recipe (same batches, same averaged gradients), a resume from the sharded step-2 checkpoint lands
    on the same weights (DMD2: student, fake score, GAN head and the student EMA; PD: the sharded EMA handed to the
    sharded student at the step-3 stage boundary; with LoRA roles, the student and fake-score adapters on a sharded
    frozen base), and a single process exports from the sharded checkpoint."""
    import numpy as np

    from stepdistill.cli import main

    if kind in FSDP:  # the default tier's kinds share their launches
        ddp, fsdp = request.getfixturevalue("ddp_runs") / kind, request.getfixturevalue("fsdp_runs") / f"{kind}-fsdp"
    else:
        _launch([JOB, str(tmp_path), kind], tmp_path)
        ddp, fsdp = tmp_path / kind, _fsdp_runs(tmp_path, (kind,)) / f"{kind}-fsdp"
    rank = json.loads((fsdp / "rank0.json").read_text())
    ema = ["student_ema"] if kind in ("dmd2", "pd-ema") else []  # a student EMA is sharded like the student
    assert rank["sharded"] == sorted(rank["roles"] + ema) and rank["world"] == 2
    step4 = fsdp / "checkpoints" / "step-4"
    assert (step4 / "student-rank1.safetensors").exists() and (step4 / "optim-student-rank1.pt").exists()
    w_ddp, w_fsdp = np.load(ddp / "weights-rank0.npy"), np.load(fsdp / "weights-first.npy")
    diff = np.abs(w_fsdp - w_ddp)
    # Reduce-scatter and all-reduce sum in different orders. Adam turns a rounding-level change of a near-zero
    # gradient into an update of up to lr in either direction, so a few elements of the DMD2 roles may move by a few
    # lr; everything else agrees to 1% of lr. The LoRA run (lr 1e-2) has ~0.5% such elements, scattered a few per
    # tensor over every layer (a sharding mistake would move whole tensors).
    # rCM's fake score starts fresh (the exact mixture teacher has no weights) and takes its first two Adam steps at
    # steps 2 and 3, where m / sqrt(v) is +-1 for every element: 2.6% of its elements differ, by up to 0.3 lr (the
    # student and the log-variance role agree to 1% of lr).
    tolerances = {"sd15-dmd2-lora": (1e-2, 1e-2), "ladd-lora": (1e-3, 1e-2), "rcm": (1e-3, 3e-2)}
    lr, share = tolerances.get(kind, (1e-3, 1e-3))
    assert (diff > 0.01 * lr).mean() < share and diff.max() < 4 * lr, (diff.max(), (diff > 0.01 * lr).sum())
    assert (fsdp / "pipeline" / "model_index.json").exists()

    if kind == "sd15-dmd2-lora":  # the export reloaded the base and put the consolidated student adapter on it (a
        # LoRA file is written for diffusers families; a student of several experts ships as its merged pipeline only)
        assert (fsdp / "lora" / "pytorch_lora_weights.safetensors").exists()
    if _resumes(kind):  # sharded roles and their optimizers: exact resume from the step-2 checkpoint
        np.testing.assert_array_equal(np.load(fsdp / "weights-rank0.npy"), w_fsdp)

    # one process reads the 2-rank sharded checkpoint (consolidated) and exports it
    os.environ["STEPDISTILL_CACHE"] = f"{fsdp}-cache"
    assert main(["export", str(fsdp), "--output-dir", str(tmp_path / "single")]) == 0
    assert (tmp_path / "single" / "model_index.json").exists()


def test_cli_module_under_accelerate_launch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(gmm_recipe(**{"train.max_steps": 2, "train.checkpoint_every": 0})))
    proc = _launch(["-m", "stepdistill", "distill", str(recipe), "--output-dir", str(tmp_path / "run")], tmp_path)
    assert proc.stdout.count("pipeline:") == 1  # the export runs on the main process only
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["world_size"] == 2


def test_gradients_are_averaged_on_every_rank_even_where_one_rank_has_none(tmp_path):
    """The loop's gradient averaging: a parameter only one rank's loss reached gets the average (half its gradient)
    on both ranks, so both take the same optimizer step (a missing gradient would make the ranks drift apart)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(ROOT / "tests" / "_sync_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    weight_a, bias_a, weight_b, bias_b = ranks[0]
    assert weight_a == [1.5] * 6 and bias_a == [1.0, 1.0]  # (1 + 2) / 2 and (1 + 1) / 2
    assert weight_b == [0.5] * 4 and bias_b == [0.5, 0.5]  # only rank 1 reached b
