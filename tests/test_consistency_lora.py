"""LCM-LoRA students (recipes/lcm_lora, ISSUE 24): a few steps of the recipe on the tiny SD1.5 / SDXL teacher export
``lora/pytorch_lora_weights.safetensors``, and in a process that never imports stepdistill the stock base pipeline
with ``load_lora_weights(run/lora)`` and LCM-LoRA's own scheduler line, ``LCMScheduler.from_config(
pipe.scheduler.config)`` (``original_inference_steps`` 50: 999/759/499/259, the student's grid on its 50-step
ladder), reproduces the student's samples; so do the scheduler and call the LoRA card gives."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from stepdistill.config import load_recipe
from stepdistill.train import Trainer

from ._recipes import SMOKE_PROMPTS, stock_pipeline_latents
from .test_families import _tiny_overrides
from .test_lora_export import _expected


pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "lcm_lora"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


#: argv: a folder holding ``base/`` (the stock teacher pipeline) and ``run/lora/``, the initial latents, the output
#: file, the prompts. Samples the base alone, then base + LoRA as LCM-LoRA's card says (stock LCMScheduler from the
#: base's scheduler config, 4 steps, guidance_scale 1: no CFG pass), then with the scheduler and call of the LoRA
#: folder's own card.
CONSUMER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    import diffusers
    from diffusers import DiffusionPipeline, LCMScheduler

    folder, latents, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    prompts = json.loads(sys.argv[4])
    lora = folder / "run" / "lora"
    torch.set_num_threads(1)  # tiny models: one thread is faster on shared cores
    x = torch.from_numpy(np.load(latents))
    pipe = DiffusionPipeline.from_pretrained(folder / "base")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    size = x.shape[-1] * pipe.vae_scale_factor

    def sample(**call):
        return pipe(prompts, latents=x.clone(), output_type="latent", generator=torch.Generator().manual_seed(0),
                    **call).images

    lcm_lora = dict(num_inference_steps=4, guidance_scale=1.0, height=size, width=size)
    base = sample(**lcm_lora)
    pipe.load_lora_weights(lora)
    stock = sample(**lcm_lora)
    print("pipeline", type(pipe).__name__, "timesteps", pipe.scheduler.timesteps.tolist())
    meta = json.load(open(lora / "stepdistill.json"))
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_pretrained(lora, subfolder="scheduler")
    card = sample(**meta["call"])
    np.save(out, torch.stack([base, stock, card]).numpy())
    assert not any(m.startswith("stepdistill") for m in sys.modules), "consumer imported stepdistill"
""")


@pytest.mark.parametrize("tiny", ["sd15", "sdxl"])
def test_an_lcm_lora_student_reloads_as_lcm_lora_is_used(tmp_path, tiny):
    path = RECIPES / f"{tiny}.yaml"
    # lr 1e-2: three steps move the zero-initialised adapter far enough that a LoRA left unloaded shows; the base in
    # float32, as the stock pipeline the consumer loads
    recipe = load_recipe(path, [*_tiny_overrides(path, tmp_path, tiny), "train.max_steps=3", "optim.student.lr=1e-2",
                                "roles.teacher_dtype=float32"])
    assert recipe.roles.mode == "lora" and recipe.method.params["guidance"][0] == recipe.method.params["guidance"][1]
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    trainer.train()
    lora_dir = trainer.export_lora(kohya=recipe.export.kohya)
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()
    meta = json.loads((lora_dir / "stepdistill.json").read_text())
    assert meta["scheduler"] == "LCMScheduler" and meta["timesteps"] == [999, 759, 499, 259]
    assert {k: meta["call"][k] for k in ("num_inference_steps", "guidance_scale")} == {"num_inference_steps": 4,
                                                                                       "guidance_scale": 0.0}
    card = (lora_dir / "README.md").read_text()
    assert "from diffusers import DiffusionPipeline, LCMScheduler" in card
    assert "num_inference_steps=4, guidance_scale=0.0" in card
    w = meta["method_config"]["guidance"]  # the distilled CFG scale, recorded with its convention (METHODS.md §9.1)
    assert w[0] == w[1] and f"CFG scale w = {w[0]:g} (`p = p_u + w (p_c - p_u)`" in card

    trainer.teacher.load_pipeline().save_pretrained(tmp_path / "base")
    noise = torch.randn(2, *trainer.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    prompts = open(SMOKE_PROMPTS).read().splitlines()[:2]
    (base, stock, by_card), stdout = stock_pipeline_latents(CONSUMER, tmp_path, noise, prompts, tmp_path)
    assert f"pipeline {trainer.teacher.family.pipeline} timesteps [999, 759, 499, 259]" in stdout
    expected = _expected(trainer, noise)
    atol = 1e-4 * max(1.0, float(expected.abs().mean()))
    torch.testing.assert_close(stock, expected, rtol=1e-4, atol=atol)
    torch.testing.assert_close(by_card, expected, rtol=1e-4, atol=atol)
    assert (base - expected).abs().max() > 100 * atol  # the adapter changed the samples: it was loaded and applied
