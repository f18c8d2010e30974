"""Export round trip: stock diffusers, in a process that never imports stepdistill, reproduces the student."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stepdistill.config import build_recipe
from stepdistill.export import ExportError, export_pipeline, student_scheduler
from stepdistill.sampling import StudentGrid, sample_student
from stepdistill.schedules import VPDiscrete
from stepdistill.train import Trainer

from ._recipes import dmd_recipe, gmm_recipe
from .conftest import SD_SCHEDULER


CONSUMER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    meta = json.load(open(folder + "/stepdistill.json"))
    call = meta["call"]
    remote = meta.get("load_kwargs", {}).get("trust_remote_code", False)  # a folder with its own pipeline file
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    np.save(out, images)
    print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.scheduler.timesteps.tolist())
    assert not any(m.startswith("stepdistill") for m in sys.modules), "consumer imported stepdistill"
""")


def _consume(folder, tmp_path, n=8):
    out = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, "-c", CONSUMER, str(folder), str(out), str(n)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out), proc.stdout


def _expected(trainer, n=8):
    """The training-time student sampler on the same noise the pipeline draws (randn on CPU, seed 0)."""
    shape = trainer.teacher.sample_shape
    unet_shape = (n, *shape) if len(shape) == 3 else (n, shape[0], 1, 1)
    g = torch.Generator().manual_seed(0)  # the pipeline's generator: initial noise, then any re-noising draws
    noise = torch.randn(unet_shape, generator=g)
    noise = noise if len(shape) == 3 else noise[:, :, 0, 0]
    x = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), generator=g)
    x = x if len(shape) == 3 else x[:, :, None, None]
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("overrides", [
    {},  # vector student (2-D GMM), 2 steps
    {"teacher": {"tiny": "unet2d"}, "student.init": "teacher", "data.batch_size": 4,
     "method.teacher_steps": 2, "method.final_steps": 1, "method.steps_per_stage": 6},  # image student, 1 step
], ids=["gmm-2step", "unet2d-1step"])
def test_stock_pipeline_reproduces_the_student(tmp_path, overrides):
    recipe = gmm_recipe(**{k: v for k, v in overrides.items() if k != "teacher"})
    if "teacher" in overrides:
        recipe["teacher"] = overrides["teacher"]
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    grid = trainer.method.student_grid()
    assert meta["num_inference_steps"] == grid.steps and meta["call"] == {"num_inference_steps": grid.steps}
    assert meta["timesteps"] == [round(t * 1024) - 1 for t in grid.times]
    assert 0 not in meta["timesteps"]  # never a 1-step grid at t=0 (ECOSYSTEM.md §0.2)
    images, stdout = _consume(folder, tmp_path)
    assert stdout.startswith("DDPMPipeline DDIMScheduler " + str(meta["timesteps"]))
    np.testing.assert_allclose(images, _expected(trainer), atol=2e-5, rtol=0)
    assert (folder / "README.md").read_text().count("num_inference_steps") >= 1


def test_grids_a_stock_scheduler_cannot_replay_are_refused(tmp_path):
    trainer = Trainer(build_recipe(gmm_recipe()), tmp_path / "run", show_progress=False).setup()
    with pytest.raises(ExportError, match=r"no stock scheduler reproduces the renoise .*LCMScheduler: \[1023, 511\]"):
        export_pipeline(trainer.nets.student, trainer.teacher, StudentGrid((1.0, 0.625), "renoise"), trainer.recipe,
                        tmp_path / "p")
    with pytest.raises(ExportError, match="no stock scheduler reproduces the ddim"):
        export_pipeline(trainer.nets.student, trainer.teacher, StudentGrid((1.0, 0.25)), trainer.recipe,
                        tmp_path / "p")
    # 3 steps rounded to 1024 timesteps: DDIMScheduler runs them, but steps 682 -> 682 - 1024 // 3 = 341, not 340
    uneven = StudentGrid(tuple(trainer.teacher.denoiser.schedule.snap(torch.tensor([3, 2, 1]) / 3).tolist()))
    with pytest.raises(ExportError, match=r"DDIMScheduler: \[1023, 682, 340\], but it steps each t to t - 341: "
                                          r"\[682, 341, -1\]"):
        export_pipeline(trainer.nets.student, trainer.teacher, uneven, trainer.recipe, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("overrides, scheduler", [
    ({"method.student_steps": 4}, "LCMScheduler"),  # DMD2 multi-step: denoise, then re-noise
    ({"method.conditioning_time": 0.4}, "DDIMScheduler"),  # one step told t=409 while fed pure noise
], ids=["dmd2-4step-renoise", "dmd2-1step-conditioning-time"])
def test_stock_pipeline_reproduces_dmd_students(tmp_path, overrides, scheduler):
    trainer = Trainer(build_recipe(dmd_recipe(**{"train.max_steps": 2, **overrides})), tmp_path / "run",
                      show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    grid = trainer.method.student_grid()
    assert meta["timesteps"] == [round(t * 1024) - 1 for t in grid.times] and meta["transition"] == grid.transition
    images, stdout = _consume(folder, tmp_path)
    assert stdout.startswith(f"DDPMPipeline {scheduler} {meta['timesteps']}")
    np.testing.assert_allclose(images, _expected(trainer), atol=2e-5, rtol=0)


def test_a_class_conditional_unet2d_student_is_refused_before_training(tmp_path):
    """DDPMPipeline cannot pass class labels: the run says so up front unless export.pipeline is off."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from stepdistill.config import ConfigError

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1024)).save_pretrained(tmp_path / "teacher")
    recipe = gmm_recipe(teacher={"pretrained": str(tmp_path / "teacher")}, student={"init": "teacher"},
                        **{"data.source": "digits", "data.labels": True, "data.batch_size": 4, "train.max_steps": 2,
                           "method.regression_steps": 1})  # an eps teacher: the v student first regresses
    with pytest.raises(ConfigError, match="DDPMPipeline cannot pass class labels"):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()
    recipe["export"] = {"pipeline": False}
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert trainer.nets.student.num_classes == 10


@pytest.mark.parametrize("setting", [{"interpolation_type": "log_linear"}, {"use_karras_sigmas": True}],
                         ids=["log-linear", "karras"])
def test_an_uneven_grid_replays_on_its_own_sigmas_whatever_the_teachers_sampler_settings(setting):
    """Community SD folders ship Euler settings for sampling (Karras sigmas, log-linear interpolation): the exported
    EulerDiscreteScheduler must still run the student's sigmas at its own timesteps (Karras sigmas would refuse
    custom timesteps; log-linear interpolation would move them)."""
    config = {**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler", **setting}
    schedule = VPDiscrete.from_scheduler_config(config)
    grid = StudentGrid(tuple(schedule.snap(torch.tensor([3, 2, 1]) / 3).tolist()))
    scheduler, call = student_scheduler(config, "v", grid, [999, 666, 332])
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and call == {"timesteps": [999, 666, 332]}
    t = torch.tensor([*grid.times, 0.0], dtype=torch.float64)
    want = schedule.sigma(t) / schedule.alpha(t)
    torch.testing.assert_close(scheduler.sigmas.double(), want, rtol=1e-5, atol=0)


def test_export_dtype_and_variant_load_as_diffusers_users_expect(tmp_path):
    """``export.dtype`` / ``export.variant``: the weights saved in float16 under diffusers' variant naming, the call to
    load them in stepdistill.json and on the model card, and the card's Hub front matter."""
    import yaml

    recipe = gmm_recipe(**{"export.dtype": "float16", "export.variant": "fp16"})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["load_kwargs"] == {"dtype": "float16", "variant": "fp16"} and meta["dtype"] == "float16"
    card = (folder / "README.md").read_text()
    assert 'from_pretrained("PATH_TO_THIS_FOLDER", dtype=torch.float16, variant=\'fp16\')' in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "unconditional-image-generation"
    assert {"stepdistill", "progressive", "2-step"} <= set(front["tags"]) and "base_model" not in front
    plain_load = "pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)"
    consumer = CONSUMER.replace(plain_load, "; ".join([
        'meta = json.load(open(folder + "/stepdistill.json"))',
        'kwargs = {k: getattr(torch, v) if k == "dtype" else v for k, v in meta["load_kwargs"].items()}',
        "pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)", "assert pipe.unet.dtype == torch.float16"]))
    out = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, "-c", consumer, str(folder), str(out), "8"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), _expected(trainer), atol=0.02, rtol=0)  # float16 weights


def test_a_model_card_carries_the_teachers_license(tmp_path):
    from types import SimpleNamespace

    from stepdistill.export import card_header, teacher_license

    (tmp_path / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a teacher\n")
    recipe = SimpleNamespace(teacher=SimpleNamespace(pretrained=str(tmp_path)))
    assert teacher_license(recipe) == "creativeml-openrail-m"
    assert teacher_license(SimpleNamespace(teacher=SimpleNamespace(pretrained=None))) is None
    meta = {"teacher_source": f"pretrained:{tmp_path}", "teacher_license": "creativeml-openrail-m",
            "family": "sd15", "method": "dmd2", "num_inference_steps": 1}
    header = card_header(meta, adapter=True)
    assert "license: creativeml-openrail-m" in header and "base_model_relation: adapter" in header
    assert "pipeline_tag: text-to-image" in header and "- lora" in header
