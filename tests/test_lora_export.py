"""LoRA students of the diffusers families (ISSUE: real teachers, LoRA export): the file reloads with
``pipe.load_lora_weights`` in a process that never imports stepdistill, with every trained layer present and the
output unchanged (``lora_alpha != r``), and so does the kohya/webui file; LoRA roles on family backbones."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import build_recipe
from stepdistill.denoisers import pack_latents, unpack_latents
from stepdistill.families import BY_PIPELINE
from stepdistill.lora import lora_layers
from stepdistill.sampling import sample_student
from stepdistill.tiny import tiny_flux, tiny_sd3, tiny_sd15, tiny_sdxl
from stepdistill.train import Trainer

from ._lora_checks import check_gradients_reach_only_the_owning_adapter
from ._recipes import SMOKE_PROMPTS, family_dmd_recipe, family_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


def _trained(tmp_path, tiny, **overrides):
    trainer = Trainer(build_recipe(family_dmd_recipe(tiny, **overrides)), tmp_path / "run", show_progress=False)
    trainer.setup().train()
    return trainer


CONSUMER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    import diffusers
    from diffusers import DiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    base, lora, weight, latents, out = sys.argv[1:6]
    prompts = json.loads(sys.argv[6])
    meta = json.load(open(lora + "/stepdistill.json"))
    pipe = DiffusionPipeline.from_pretrained(base)
    if weight == "-":
        pipe.load_lora_weights(lora, adapter_name="student")
    else:
        pipe.load_lora_weights(lora, weight_name=weight, adapter_name="student")
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_pretrained(lora, subfolder="scheduler")
    backbone = getattr(pipe, "unet", None) or pipe.transformer
    layers = sum(isinstance(m, BaseTunerLayer) and "student" in m.lora_A for m in backbone.modules())
    x = torch.from_numpy(np.load(latents))
    torch.manual_seed(0)  # SD3/FLUX pipelines re-noise with the global RNG (they do not pass generator to step)
    images = pipe(prompts, latents=x, output_type="latent", generator=torch.Generator().manual_seed(0),
                  **meta["call"]).images
    np.save(out, images.numpy())
    print("layers", layers)
    assert not any(m.startswith("stepdistill") for m in sys.modules), "consumer imported stepdistill"
""")


def _reload(tmp_path, trainer, lora_dir, weight="-"):
    """Save the teacher as its stock pipeline, then load base + LoRA in a fresh process and sample the student grid
    from the same latents; returns (latents, LoRA layers diffusers loaded)."""
    base = tmp_path / "base"
    if not base.exists():
        trainer.teacher.load_pipeline().save_pretrained(base)
    prompts = open(SMOKE_PROMPTS).read().splitlines()[:2]
    noise = torch.randn(2, *trainer.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    flux = trainer.teacher.family.name == "flux"
    np.save(tmp_path / "noise.npy", (pack_latents(noise) if flux else noise).numpy())
    argv = [sys.executable, "-c", CONSUMER, str(base), str(lora_dir), weight, str(tmp_path / "noise.npy"),
            str(tmp_path / "out.npy"), json.dumps(prompts)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    got = unpack_latents(got, *noise.shape[2:]) if flux else got
    return noise, got, int(proc.stdout.split("layers")[-1].split()[0])


def _expected(trainer, noise):
    cond = {k: v[:2] for k, v in trainer.conditions.items()}
    # the re-noising draws follow the pipeline's generator: initial latents are given, so the first draw is the
    # re-noise of step 1 (randn on CPU, seed 0), as in sample_student
    return sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond,
                          generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tiny", ["sd15", "sd3", "flux"])
def test_lora_file_reloads_exactly_with_every_layer(tmp_path, tiny):
    trainer = _trained(tmp_path, tiny)
    student = trainer.nets.student
    trained = sum(1 for m in lora_layers(student.backbone) if "student" in m.lora_A)
    lora_dir = trainer.export_lora()
    meta = json.loads((lora_dir / "stepdistill.json").read_text())
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists() and meta["lora"]["alpha"] == 8.0
    assert meta["lora"]["layers"] == trained
    noise, got, loaded = _reload(tmp_path, trainer, lora_dir)
    assert loaded == trained  # no layer silently dropped (ECOSYSTEM.md §2.2)
    expected = _expected(trainer, noise)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


def test_a_lora_student_on_an_uneven_grid_reloads_with_its_scheduler_and_timesteps(tmp_path):
    """DMD2's 3 re-noising steps on SD's 1000 timesteps (999/666/332; LCM's own 3-step grid is 998/665/332) go as
    ``timesteps=`` in ``call``; the LoRA folder's scheduler and call, used as its card says, reproduce the student.
    (PD's deterministic uneven grids take EulerDiscreteScheduler the same way: test_families; a PD LoRA student needs a
    v-prediction SD base, which the tiny models do not have.)"""
    trainer = _trained(tmp_path, "sd15", **{"method.student_steps": 3})
    lora_dir = trainer.export_lora()
    meta = json.loads((lora_dir / "stepdistill.json").read_text())
    assert meta["scheduler"] == "LCMScheduler" and meta["call"]["timesteps"] == [999, 666, 332]
    assert "pass `timesteps=[999, 666, 332]`" in (lora_dir / "README.md").read_text()
    noise, got, _ = _reload(tmp_path, trainer, lora_dir)
    expected = _expected(trainer, noise)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


@pytest.mark.parametrize("tiny", ["sd15", "sdxl"])
def test_kohya_file_reloads(tmp_path, tiny):
    trainer = _trained(tmp_path, tiny)
    trained = sum(1 for m in lora_layers(trainer.nets.student.backbone) if "student" in m.lora_A)
    lora_dir = trainer.export_lora(kohya=True)
    noise, got, loaded = _reload(tmp_path, trainer, lora_dir, weight="student_kohya.safetensors")
    assert loaded == trained
    expected = _expected(trainer, noise)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


def test_cli_export_lora_kohya_and_fuse(tmp_path, capsys):
    trainer = _trained(tmp_path, "sd15")
    run = trainer.dir
    assert main(["export", str(run), "--kohya", "--fuse", "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "lora" / "student_kohya.safetensors").exists()
    assert (tmp_path / "out" / "pipeline" / "model_index.json").exists()


def test_lora_export_of_a_full_run_is_one_line(tmp_path, capsys):
    trainer = Trainer(build_recipe(family_recipe("sd15")), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    code = main(["export", str(trainer.dir), "--lora"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "roles.mode: lora" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("tiny", ["sd15", "sd3", "flux"])
def test_lora_roles_on_family_backbones(tmp_path, tiny):
    """Gradients reach only the owning adapter; the teacher is the base with adapters disabled."""
    trainer = Trainer(build_recipe(family_dmd_recipe(tiny)), tmp_path / "run", show_progress=False).setup()
    nets, method = trainer.nets, trainer.method
    base = nets.teacher.backbone
    assert nets.student.backbone is base and nets["fake_score"].backbone is base
    batch = trainer.data.next(torch.Generator().manual_seed(0))
    x = torch.randn(2, *trainer.teacher.sample_shape)
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    with torch.no_grad():
        before = nets.teacher(x, t, batch.cond).x0_64
        for p in nets["fake_score"].trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = nets.teacher(x, t, batch.cond).x0_64
        fake = nets["fake_score"](x, t, batch.cond).x0_64
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert (fake - before).abs().max() > 1e-4

    check_gradients_reach_only_the_owning_adapter(nets, method, batch)


#: the linear/conv layers LoRA leaves frozen on purpose: input/output and embedding layers and adaLN modulations
#: (the LCM-LoRA scripts and diffusers' FLUX LoRA scripts leave them out too)
_NOT_ADAPTED = r"(conv_in|conv_out|x_embedder|pos_embed\.proj|context_embedder|proj_out|time_embedding\..*|"\
               r"add_embedding\..*|time_text_embed\..*|.*norm.*\.linear)"


@pytest.mark.parametrize("make", [tiny_sd15, tiny_sdxl, tiny_sd3, tiny_flux], ids=["sd15", "sdxl", "sd3", "flux"])
def test_lora_targets_cover_every_layer_inside_the_blocks(make):
    """Down/upsampling convs (UNets) and the single-stream blocks' proj_out (FLUX) included: they carry the blocks'
    outputs, and the LCM-LoRA / FLUX LoRA scripts adapt them (ECOSYSTEM.md §2.2)."""
    pipe = make()
    backbone = getattr(pipe, "unet", None) or pipe.transformer
    family = BY_PIPELINE[type(pipe).__name__]
    left = sorted(n for n, m in backbone.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                  and not re.fullmatch(family.lora_targets, n) and not re.fullmatch(_NOT_ADAPTED, n))
    assert left == []


def test_a_model_that_cannot_take_adapters_is_one_line():
    from stepdistill.lora import add_adapters

    with pytest.raises(ValueError, match=r"roles.mode: lora: no layer of Sequential can take a LoRA adapter"):
        add_adapters(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Identity()), ["student"], rank=4, alpha=4)
