"""CUDA checks: ``pytest -m gpu`` on a machine with a GPU; skipped elsewhere (the default tier deselects them).

What the CPU tier cannot exercise: a bf16 frozen base under bf16 autocast on CUDA with gradient checkpointing and
LoRA roles, the xformers attention switch, and FSDP2 over NCCL (two GPUs or more). Each run ends with the same
checks as its CPU counterpart: the exported stock pipeline reproduces the student, ranks agree.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill.config import build_recipe
from stepdistill.sampling import sample_student
from stepdistill.train import Trainer

from ._recipes import SMOKE_PROMPTS, family_dmd_recipe, family_recipe, stock_pipeline_latents


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parent.parent

CONSUMER = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, latents, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
call = json.load(open(folder + "/stepdistill.json"))["call"]
pipe = DiffusionPipeline.from_pretrained(folder).to("cuda")
x = torch.from_numpy(np.load(latents)).to("cuda")
g = torch.Generator().manual_seed(0)  # draws a re-noising student's noise, as sample_student's generator does
np.save(out, pipe(prompts, latents=x, output_type="latent", generator=g, **call).images.float().cpu().numpy())
assert not any(m.startswith("stepdistill") for m in sys.modules)
"""


def _round_trip(trainer, tmp_path) -> None:
    """The exported pipeline, run by stock diffusers on CUDA in a fresh process, lands on the student's latents.

    The exported pipeline runs in float32. So does the student here: its base is upcast and accelerate's bf16
    autocast wrapper removed (both in place, after export), so the two evaluate the same weights in the same
    precision. Both draw a re-noising student's noise from a generator seeded alike."""
    folder = trainer.export()
    prompts = open(SMOKE_PROMPTS).read().splitlines()[:2]
    student = trainer.sampling_student()
    trainer.accelerator.unwrap_model(student.backbone, keep_fp32_wrapper=False).float()
    device = next(student.parameters()).device
    noise = torch.randn(2, *trainer.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = {k: v[:2].to(device) for k, v in trainer.conditions.items()}
    with torch.no_grad():
        expected = sample_student(student, noise.to(device), trainer.method.student_grid(), cond=cond,
                                  generator=torch.Generator().manual_seed(0)).float().cpu()
    got, _ = stock_pipeline_latents(CONSUMER, folder, noise, prompts, tmp_path)
    # TF32/cuDNN kernels differ between the two processes' calls; the weights and the grid are the same
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * max(1.0, float(expected.abs().mean())))


def test_dmd2_lora_roles_on_cuda_with_a_bf16_base_then_the_stock_pipeline(tmp_path):
    recipe = family_dmd_recipe("sd15", **{"roles.teacher_dtype": "bfloat16", "train.mixed_precision": "bf16",
                                          "train.gradient_checkpointing": True})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert trainer.accelerator.device.type == "cuda"
    base = {p.dtype for n, p in trainer.teacher.backbone.named_parameters() if ".lora_" not in n}
    assert base == {torch.bfloat16}
    before = [p.detach().clone() for p in trainer.nets.student.trainable_parameters()]
    trainer.train()
    after = list(trainer.nets.student.trainable_parameters())
    assert all(torch.isfinite(p).all() for p in after) and any((a - b).abs().max() > 0 for a, b in zip(after, before))
    assert next(trainer.teacher.vae.parameters()).device.type == "cpu"  # the sample grids' decode does not keep it
    _round_trip(trainer, tmp_path)


def test_xformers_attention_trains_and_exports(tmp_path):
    pytest.importorskip("xformers")
    recipe = family_recipe("sd15", **{"train.attention_backend": "xformers"})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    _round_trip(trainer, tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs two GPUs")
@pytest.mark.parametrize("kind", ["dmd2", "sd15"])
def test_fsdp_over_nccl_matches_ddp(tmp_path, kind):
    """The CPU tier's FSDP-vs-DDP check (test_multiprocess.py) on two GPUs with NCCL."""
    def launch(out, job):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "STEPDISTILL_CACHE": f"{out}-cache"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests" / "_ddp_job.py"), str(out), job]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "ddp", kind)
    launch(tmp_path / "fsdp", f"{kind}-fsdp")
    rank = json.loads((tmp_path / "fsdp" / "rank0.json").read_text())
    assert rank["sharded"] == rank["roles"] and "MULTI_GPU" in rank["distributed"]
    w_ddp = np.load(tmp_path / "ddp" / "weights-rank0.npy")
    w_fsdp = np.load(tmp_path / "fsdp" / "weights-rank0.npy")
    diff = np.abs(w_fsdp - w_ddp)
    assert (diff > 1e-4).mean() < 1e-3 and diff.max() < 4e-3, (diff.max(), (diff > 1e-4).sum())
