"""Teacher sources (pretrained dir, tiny, gmm mlp/exact, embedded) and the UNet2D adapter's conditioning."""

import json
import shutil

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from stepdistill.config import build_recipe
from stepdistill.denoisers import UNet2DDenoiser, guided
from stepdistill.sampling import sample_ddim
from stepdistill.schedules import VPDiscrete
from stepdistill.teachers import (
    ASSETS,
    DEFAULT_SCHEDULER,
    TeacherError,
    load_embedded,
    load_gmm,
    load_pretrained,
    load_tiny,
    tiny_unet2d,
)
from stepdistill.train import Trainer

from ._recipes import gmm_recipe


@pytest.fixture
def pipeline_dir(tmp_path):
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    DDPMPipeline(unet=tiny_unet2d(), scheduler=sched).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_pretrained_directory_loads_with_its_own_schedule(pipeline_dir):
    teacher = load_pretrained(str(pipeline_dir))
    assert teacher.denoiser.prediction == "eps" and teacher.sample_shape == (3, 16, 16)
    abar = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler").alphas_cumprod.double()
    sch = teacher.denoiser.schedule
    assert torch.allclose(sch.alpha(sch.index_to_t(torch.arange(1000))) ** 2, abar, atol=1e-12)
    assert not any(p.requires_grad for p in teacher.backbone.parameters())
    # The adapter's eps output equals the UNet's own output at the same integer timestep.
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = teacher.backbone(x, torch.tensor([500, 500])).sample
        pred = teacher.denoiser(x, sch.index_to_t(torch.tensor([500, 500])))
    assert torch.allclose(pred.eps, ref, atol=1e-5)


def test_pretrained_errors_name_the_problem(pipeline_dir, tmp_path):
    with pytest.raises(TeacherError, match="no such directory"):
        load_pretrained(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(TeacherError, match="no scheduler/scheduler_config.json"):
        load_pretrained(str(broken))
    shutil.rmtree(broken / "unet")
    with pytest.raises(TeacherError, match="cannot load a UNet2DModel"):
        load_pretrained(str(broken))
    with pytest.raises(TeacherError, match="unknown kind"):
        load_tiny("sd15-xl")
    with pytest.raises(TeacherError, match="no embedded teacher 'cats'"):
        load_embedded("cats")


def test_embedded_digits_teacher_ships_and_samples():
    teacher = load_embedded("digits")
    assert teacher.sample_shape == (1, 8, 8) and teacher.denoiser.prediction == "v"
    record = json.loads((ASSETS / "digits_teacher" / "training.json").read_text())
    assert record["fit"]["seed"] == 0 and record["command"] == "stepdistill build-assets"
    size = sum(f.stat().st_size for f in (ASSETS / "digits_teacher").rglob("*") if f.is_file())
    assert size < 5 * 2**20, "shipped weights must stay a few MB"
    with torch.no_grad():
        x = sample_ddim(teacher.denoiser, torch.randn(16, 1, 8, 8), teacher.denoiser.schedule.grid(8))
    assert torch.isfinite(x).all() and x.abs().max() < 3


def test_gmm_mlp_teacher_is_fitted_once_and_cached(tmp_path):
    kw = {"std": 0.1, "fit": {"steps": 30, "batch_size": 64, "width": 16}, "cache_dir": str(tmp_path)}
    first = load_gmm([[0.5, 0.0], [-0.5, 0.0]], **kw)
    cached = list((tmp_path / "gmm_teachers").iterdir())
    assert len(cached) == 1 and (cached[0] / "training.json").exists()
    again = load_gmm([[0.5, 0.0], [-0.5, 0.0]], **kw)
    for a, b in zip(first.backbone.parameters(), again.backbone.parameters()):
        assert torch.equal(a, b)
    assert first.sample_shape == (2,) and first.mixture.num_modes == 2


def test_a_teacher_folder_is_published_whole_and_the_first_writer_wins(tmp_path):
    """Ranks that fit the same GMM teacher at once (an empty cache) must not write into each other's files: each
    builds under its own name and renames; a later writer drops its copy unless it rebuilds (``replace``)."""
    from stepdistill.teacher_training import _save_teacher
    from stepdistill.teachers import DEFAULT_SCHEDULER

    def unet(seed):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           norm_num_groups=4, layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"))

    def weights(folder):
        return next(UNet2DModel.from_pretrained(folder / "unet").parameters())

    folder = tmp_path / "teacher"
    first, second = unet(0), unet(1)
    _save_teacher(first, DEFAULT_SCHEDULER, folder, {"n": 1})
    _save_teacher(second, DEFAULT_SCHEDULER, folder, {"n": 2})
    assert torch.equal(weights(folder), next(first.parameters()))
    assert json.loads((folder / "training.json").read_text()) == {"n": 1}
    _save_teacher(second, DEFAULT_SCHEDULER, folder, {"n": 2}, replace=True)
    assert torch.equal(weights(folder), next(second.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no per-process leftovers


def test_class_conditional_unet_and_cfg():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    den = UNet2DDenoiser(unet, VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), "v")
    assert den.num_classes == 10
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5, dtype=torch.float64)
    cond = {"class_labels": torch.tensor([0, 3, 5, 9])}
    with torch.no_grad():
        c, u = den(x, t, cond), den(x, t, {"class_labels": torch.full((4,), 10)})
        g = guided(den, x, t, cond, 2.5)
        assert torch.allclose(g.x0_64, u.x0_64 + 2.5 * (c.x0_64 - u.x0_64), atol=1e-5)
        assert torch.allclose(guided(den, x, t, cond, 1.0).x0_64, c.x0_64)


def test_loop_options_bf16_accumulation_and_ema(tmp_path):
    recipe = build_recipe(gmm_recipe(**{"train.mixed_precision": "bf16", "train.grad_accum": 2,
                                        "train.ema_decay": 0.5, "train.checkpoint_every": 0}))
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    autocast = []  # every training forward of the student and the teacher runs under bf16 autocast
    for role in ("student", "teacher"):
        trainer.nets[role].register_forward_pre_hook(
            lambda mod, args: autocast.append(torch.is_autocast_enabled("cpu")))
    trainer.train()
    assert autocast and all(autocast), "a loss computed outside autocast"
    ema, student = trainer.nets["student_ema"], trainer.nets.student
    assert not any(p.requires_grad for p in ema.parameters())
    diff = [not torch.equal(a, b) for a, b in zip(ema.parameters(), student.parameters())]
    assert any(diff), "the EMA should lag the student"
    assert trainer.sampling_student() is ema
    assert (tmp_path / "run" / "checkpoints" / "step-6" / "student_ema.safetensors").exists()
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 6 and all("nan" not in r.lower() for r in rows)


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """``teachers/sd15x`` next to a ``teachers/`` folder is a local path with a typo, not the hub id of user
    "teachers": one line at once, no network retries."""
    (tmp_path / "teachers").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError, match="no such directory: teachers/sd15x"):
        load_pretrained("teachers/sd15x", family="sd15")
