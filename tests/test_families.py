"""The diffusers families on tiny offline models (ISSUE: real teachers): adapters against the stock pipelines, prompt
encoding and its cache, distillation runs and the export round trip through stock diffusers, bad input."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.conditioning import encode_prompts, load_or_encode, null_condition
from stepdistill.config import build_recipe
from stepdistill.denoisers import guidance_embedding, pack_latents, unpack_latents
from stepdistill.methods.base import loss_terms
from stepdistill.sampling import StudentGrid, sample_student
from stepdistill.teachers import TeacherError, load_pretrained, load_tiny
from stepdistill.train import Trainer

from ._recipes import FAMILIES, SMOKE_PROMPTS, family_dmd_recipe, family_recipe, stock_pipeline_latents


pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "a lighthouse at dusk"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


def _stock_call(teacher, pipe, noise, w, steps):
    """The stock pipeline's own sampling call for the same noise, grid and CFG scale, returning latents."""
    from diffusers import DDIMScheduler

    res = teacher.meta["resolution"]
    kw = {"height": res, "width": res, "output_type": "latent", "guidance_scale": w}
    latents = noise
    if teacher.family.flow:
        kw.update(sigmas=list(steps), max_sequence_length=teacher.encode_settings["max_sequence_length"])
        if teacher.family.name == "flux":  # "true CFG" with a negative prompt ("" is our null)
            latents = pack_latents(noise)
            kw.update(negative_prompt="", true_cfg_scale=w, guidance_scale=teacher.meta.get("guidance", 3.5))
    else:  # our deterministic grid is DDIM with trailing spacing
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, steps_offset=0, clip_sample=False)
        kw["num_inference_steps"] = len(steps)
    out = pipe(PROMPTS, latents=latents.clone(), **kw).images
    return unpack_latents(out, *noise.shape[2:]) if teacher.family.name == "flux" else out


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux", "flux-dev"])
def test_adapter_and_cfg_match_the_stock_pipeline(kind):
    """Two sampling steps with CFG w = 3 through our adapter equal the stock pipeline's own loop on the same noise:
    prompt encoding, null condition, time conversion, prediction type and guidance convention all agree."""
    teacher = load_tiny(kind)
    pipe = teacher.load_pipeline()
    cond = encode_prompts(pipe, teacher.family.name, PROMPTS, **teacher.encode_settings)
    teacher.denoiser.set_null_condition(null_condition(pipe, teacher.family.name, **teacher.encode_settings))
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    times = (1.0, 0.5)
    ours = sample_student(teacher.denoiser, noise, StudentGrid(times), cond=cond, w=3.0)
    # SD3's scheduler shifts the sigmas it is given (shift 3) exactly as our schedule maps times to sigmas
    ref = _stock_call(teacher, pipe, noise, 3.0, times)
    scale = ref.abs().mean()
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, float(scale)), (ours - ref).abs().max()


def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 3, 8, 6)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 3, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), x, rtol=0, atol=0)


def test_guidance_embedding_matches_the_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 3.5, 8.0])
    for dim in (256, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref, rtol=1e-6, atol=1e-6)


def test_prompt_cache_is_used_and_text_encoders_are_not_loaded_again(tmp_path):
    teacher = load_tiny("sd3")
    loads = []

    def loader():
        loads.append(1)
        return teacher.load_pipeline()

    args = dict(teacher_id=teacher.source, cache_dir=tmp_path / "c", settings=teacher.encode_settings)
    table, null = load_or_encode(loader, "sd3", PROMPTS, **args)
    again, null_again = load_or_encode(lambda: pytest.fail("text encoders loaded despite the cache"), "sd3",
                                       PROMPTS, **args)
    assert loads == [1]
    direct = encode_prompts(teacher.load_pipeline(), "sd3", PROMPTS, **teacher.encode_settings)
    for key in direct:
        torch.testing.assert_close(table[key], direct[key])
        torch.testing.assert_close(again[key], direct[key])
    assert set(null) == set(null_again) == {"encoder_hidden_states", "pooled_projections"}
    # another prompt list (or teacher) is another key: encoded again
    load_or_encode(loader, "sd3", PROMPTS[:1], **args)
    assert loads == [1, 1]


def test_sdxl_null_condition_is_zeros_like_the_pipeline():
    teacher = load_tiny("sdxl")
    null = null_condition(teacher.load_pipeline(), "sdxl", **teacher.encode_settings)
    assert set(null) == {"encoder_hidden_states", "text_embeds"}  # the size ids stay the sample's own
    assert all(float(v.abs().max()) == 0 for v in null.values())


# ----------------------------------------------------------------------------------------------------------------
# Distillation runs and the export round trip.

CONSUMER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, latents, out = sys.argv[1], sys.argv[2], sys.argv[3]
    prompts = json.loads(sys.argv[4])
    call = json.load(open(folder + "/stepdistill.json"))["call"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    x = torch.from_numpy(np.load(latents))
    # the generator draws any re-noising noise (multi-step DMD2 students), as sample_student's does
    images = pipe(prompts, latents=x, output_type="latent", generator=torch.Generator().manual_seed(0), **call).images
    np.save(out, images.numpy())
    print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.scheduler.timesteps.tolist())
    assert not any(m.startswith("stepdistill") for m in sys.modules), "consumer imported stepdistill"
""")


def _first_two(trainer):
    """The first two prompts of the smoke file, fixed noise for them, and their rows of the run's prompt table."""
    prompts = open(SMOKE_PROMPTS).read().splitlines()[:2]
    noise = torch.randn(2, *trainer.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    return prompts, noise, {k: v[:2] for k, v in trainer.conditions.items()}


W_RANGE = {"method.guidance": [2.0, 4.0], "method.sample_guidance": 3.5}


@pytest.mark.parametrize("family, overrides", [(f, {}) for f in FAMILIES] + [("sd15", W_RANGE), ("flux", W_RANGE)],
                         ids=[*FAMILIES, "sd15-w-range", "flux-w-range"])
def test_distill_then_the_stock_pipeline_reproduces_the_student(tmp_path, family, overrides):
    """Three PD steps on a tiny teacher, export, and ``DiffusionPipeline.from_pretrained(dir)(prompts, **call)`` in
    a process that never imports stepdistill lands on the training-time student's latents. With a guidance range
    (guided PD) the student is w-conditioned and the stock pipeline feeds it ``guidance_scale`` itself."""
    trainer = Trainer(build_recipe(family_recipe(family, **overrides)), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["pipeline_class"] == trainer.teacher.family.pipeline and meta["num_inference_steps"] == 2
    if overrides:
        assert meta["call"]["guidance_scale"] == 3.5 and trainer.nets.student.sampling_guidance == 3.5
    assert (tmp_path / "run" / "samples" / "step-3.png").exists()

    prompts, noise, cond = _first_two(trainer)
    expected = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond)
    if overrides:  # the trained w-embedding matters: another scale gives another sample
        other = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(),
                               cond={**cond, "guidance": torch.full((2,), 2.0)})
        assert (other - expected).abs().max() > 1e-5
    fed = pack_latents(noise) if family == "flux" else noise
    got, stdout = stock_pipeline_latents(CONSUMER, folder, fed, prompts, tmp_path)
    got = unpack_latents(got, *noise.shape[2:]) if family == "flux" else got
    assert meta["pipeline_class"] in stdout
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_a_dmd2_lora_student_exports_to_the_stock_pipeline(tmp_path, base_dtype):
    """DMD2's re-noising two-step student, trained as a LoRA adapter on one frozen base (``roles.mode: lora``), is
    merged into the stock pipeline, whose generator draws the re-noising noise as ``sample_student``'s does. The bf16
    case trains on a bf16 base under bf16 autocast (the CPU counterpart of the ``gpu`` test); afterwards the base is
    upcast and accelerate's autocast wrapper removed, so the student runs in float32 on the very weights it trained
    on: the merged export must then agree to float32 precision (merging into the bf16 weights would round most of
    the trained delta away)."""
    bf16 = {"roles.teacher_dtype": "bfloat16", "train.mixed_precision": "bf16"} if base_dtype == "bfloat16" else {}
    recipe = family_dmd_recipe("sd15", **bf16)
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    base = trainer.teacher.backbone
    assert {p.dtype for n, p in base.named_parameters() if ".lora_" not in n} == {getattr(torch, base_dtype)}
    trainer.train()
    folder = trainer.export()
    trainer.accelerator.unwrap_model(base, keep_fp32_wrapper=False).float()  # in place: plain float32 forward
    prompts, noise, cond = _first_two(trainer)
    with torch.no_grad():
        expected = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond,
                                  generator=torch.Generator().manual_seed(0))
        other = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond,
                               generator=torch.Generator().manual_seed(1))
    assert (other - expected).abs().max() > 1e-2  # the re-noising draws matter, so the shared generator is tested
    got, _ = stock_pipeline_latents(CONSUMER, folder, noise, prompts, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_one_step_student_at_the_conditioning_time_exports_to_the_stock_pipeline(tmp_path, family):
    """DMD2's one-step SD students are told t = 399 while fed pure noise. StableDiffusionPipeline resets a
    scheduler's steps_offset to 1 when it is built, so the step cannot live in a DDIM config: it travels as
    ``timesteps=[399]`` in ``call`` with LCMScheduler, DMD2's own call, and the reload runs t = 399."""
    recipe = family_dmd_recipe(family, **{"method.student_steps": 1, "method.conditioning_time": 0.4})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["timesteps"] == [399] and meta["call"]["timesteps"] == [399] and meta["scheduler"] == "LCMScheduler"
    prompts, noise, cond = _first_two(trainer)
    expected = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond)
    got, stdout = stock_pipeline_latents(CONSUMER, folder, noise, prompts, tmp_path)
    assert stdout.split()[1:] == ["LCMScheduler", "[399]"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


@pytest.mark.parametrize("recipe, scheduler", [
    (lambda: family_recipe("sd15", **{"method.teacher_steps": 6, "method.final_steps": 3}), "EulerDiscreteScheduler"),
    (lambda: family_dmd_recipe("sd15", **{"method.student_steps": 3}), "LCMScheduler"),
], ids=["pd-3step", "dmd2-3step-renoise"])
def test_unevenly_spaced_grids_export_as_timesteps(tmp_path, recipe, scheduler):
    """3 steps on SD's 1000 timesteps are 999/666/332: DDIMScheduler would step 666 -> 333 and LCMScheduler's own
    3-step grid is 998/665/332, so SD pipelines get the grid as ``timesteps=``: EulerDiscreteScheduler (its Euler
    step in sigma is the DDIM step) for PD's deterministic grid, LCMScheduler for DMD2's re-noising one."""
    trainer = Trainer(build_recipe(recipe()), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["timesteps"] == meta["call"]["timesteps"] == [999, 666, 332] and meta["scheduler"] == scheduler
    assert "pass `timesteps=[999, 666, 332]`" in (folder / "README.md").read_text()
    prompts, noise, cond = _first_two(trainer)
    with torch.no_grad():
        expected = sample_student(trainer.sampling_student(), noise, trainer.method.student_grid(), cond=cond,
                                  generator=torch.Generator().manual_seed(0))
    got, stdout = stock_pipeline_latents(CONSUMER, folder, noise, prompts, tmp_path)
    assert stdout.split()[1] == scheduler
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().mean())))


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


def _cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_empty_prompt_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(family_recipe("sd15", **{"data.prompts": str(empty)})))
    code, err = _cli(["distill", str(recipe), "--output-dir", str(tmp_path / "run")], capsys)
    assert code != 0 and "data.prompts" in err and "no prompts" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_prompt_files_with_a_bom_read_clean_and_other_encodings_are_one_line(tmp_path, capsys):
    from stepdistill.conditioning import read_prompts

    bom = tmp_path / "bom.txt"
    bom.write_text("a red cat\nthe sea\n", encoding="utf-8-sig")  # as Windows editors save "UTF-8"
    assert read_prompts(str(bom)) == ["a red cat", "the sea"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(family_recipe("sd15", **{"data.prompts": str(latin)})))
    code, err = _cli(["distill", str(recipe), "--output-dir", str(tmp_path / "run")], capsys)
    assert code != 0 and f"data.prompts: {latin} is not UTF-8 text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, key", [("sd15", "time_embedding.cond_proj.weight"),
                                       ("flux", "time_text_embed.guidance_embedder.linear_2.weight")])
def test_a_new_w_embedding_starts_silent_and_trains(kind, key):
    """Guided PD's w-conditioned student from a teacher without a w input: at initialisation it equals the teacher
    whatever w is, and the new embedding gets gradients (its output layer starts at zero, not its input)."""
    teacher = load_tiny(kind)
    cond = encode_prompts(teacher.load_pipeline(), teacher.family.name, PROMPTS, **teacher.encode_settings)
    student = teacher.denoiser.guidance_conditioned(3.0)
    assert student.sampling_guidance == 3.0 and teacher.denoiser.sampling_guidance is None
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    with torch.no_grad():
        ref = teacher.denoiser(x, t, cond).x0_64
        for w in (1.0, 7.5):
            torch.testing.assert_close(student(x, t, {**cond, "guidance": torch.full((2,), w)}).x0_64, ref)
    student(x, t, {**cond, "guidance": torch.tensor([2.0, 6.0])}).x0_64.square().sum().backward()
    grad = dict(student.backbone.named_parameters())[key].grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("kind, recipe, match", [
    ("sd3", {}, "guidance-scale input .* not available for SD3Denoiser"),
    ("sd15", {"roles": {"mode": "lora"}}, "roles.mode: lora: role 'student' takes a guidance-scale input"),
])
def test_a_w_range_without_a_w_input_is_one_line(tmp_path, capsys, kind, recipe, match):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**family_recipe(kind, **W_RANGE), **recipe}))
    code, err = _cli(["distill", str(path), "--output-dir", str(tmp_path / "run")], capsys)
    ours = [line for line in err.splitlines() if line.startswith("stepdistill")]  # not the tokenizer's warnings
    assert code != 0 and len(ours) == 1 and __import__("re").search(match, ours[0]), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"data.prompts": None}, "data.prompts: a text-conditioned teacher"),
    ({"teacher.family": "sdxl"}, "teacher.family: the recipe says 'sdxl'"),
    ({"teacher.tiny": "sd4"}, "teacher.tiny: unknown kind 'sd4'"),
])
def test_family_bad_input(tmp_path, overrides, match):
    from stepdistill.config import ConfigError
    from stepdistill.train import RunError

    with pytest.raises((ConfigError, RunError), match=match):
        Trainer(build_recipe(family_recipe("sd15", **overrides)), tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family, mode", [("sd3", "lora"), ("sd15", "full")])
def test_a_kohya_file_that_cannot_be_written_is_refused_before_training(tmp_path, family, mode):
    from stepdistill.config import ConfigError

    recipe = family_recipe(family, **{"export.kohya": True, "roles.mode": mode})
    with pytest.raises(ConfigError, match=f"export.kohya: .* roles.mode {mode} and a {family} teacher"):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ode_pairs_of_a_text_teacher_carry_their_prompts(tmp_path, mode, monkeypatch):
    """DMD (v1)'s regression on a text teacher: each pair is sampled by the CFG teacher with a prompt of the table,
    whose row is stored with the pair and given back to the student; a changed prompt file makes new pairs."""
    from stepdistill.pairs import table_fingerprint
    from stepdistill.sampling import sample_ddim

    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    recipe = family_dmd_recipe("sd15", **{"method.regression_weight": 0.25, "method.student_steps": 1,
                                          "method.num_pairs": 4, "method.pair_steps": 2, "roles.mode": mode,
                                          "train.max_steps": 1})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    pairs, table = trainer.method.ode.pairs, trainer.conditions
    assert pairs["rows"].shape == (4,) and pairs["target"].shape == (4, *trainer.teacher.sample_shape)
    teacher = trainer.nets.teacher
    cond = {k: v[pairs["rows"][:1]] for k, v in table.items()}
    again = sample_ddim(teacher, pairs["noise"][:1], teacher.schedule.grid(2), cond=cond, w=3.0)
    torch.testing.assert_close(again, pairs["target"][:1], rtol=1e-4, atol=1e-4)  # the CFG teacher's (batch of 4 vs 1)
    assert any(f.name.endswith(".safetensors") and table_fingerprint(table) in f.name
               for f in (tmp_path / "cache" / "ode_pairs").iterdir())
    assert torch.isfinite(torch.tensor(trainer.train()["loss/student"]))


def test_pretrained_directory_missing_a_component_names_it(tmp_path):
    import shutil

    from stepdistill.tiny import TINY_PIPELINES

    TINY_PIPELINES["sd15"]().save_pretrained(tmp_path / "sd")
    teacher = load_pretrained(str(tmp_path / "sd"), family="sd15")  # the real loading code, local directory
    assert teacher.family.name == "sd15" and teacher.sample_shape == (4, 16, 16)  # unet sample_size x VAE scale
    with pytest.raises(TeacherError, match="teacher.family: the recipe says 'flux'"):
        load_pretrained(str(tmp_path / "sd"), family="flux")
    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(TeacherError, match="missing component 'vae'"):
        load_pretrained(str(tmp_path / "sd"))


def test_pretrained_teachers_that_would_be_read_wrong_are_refused(tmp_path):
    """A scheduler of another kind (EDM / flow matching on an SD UNet would read as DDPM's default betas), a VAE with
    latents_mean/std, a resolution the backbone's patches do not tile, and a pipeline class no family handles."""
    import json

    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    from stepdistill.tiny import TINY_PIPELINES

    sdxl = TINY_PIPELINES["sdxl"]()
    sdxl.save_pretrained(tmp_path / "ok")
    for name, scheduler in [("edm", EDMEulerScheduler()), ("flow", FlowMatchEulerDiscreteScheduler())]:
        sdxl.scheduler = scheduler
        sdxl.save_pretrained(tmp_path / name)
        with pytest.raises(TeacherError, match=f"need a DDPM-family scheduler.*{type(scheduler).__name__}"):
            load_pretrained(str(tmp_path / name))
    config = tmp_path / "ok" / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "latents_mean": [0.0] * 4,
                                  "latents_std": [1.0] * 4}))
    with pytest.raises(TeacherError, match="latents_mean / latents_std"):
        load_pretrained(str(tmp_path / "ok"))
    TINY_PIPELINES["flux"]().save_pretrained(tmp_path / "flux")  # 1x VAE, 2x2 packing
    with pytest.raises(TeacherError, match="teacher.resolution: 15 px is not a multiple of 2"):
        load_pretrained(str(tmp_path / "flux"), resolution=15)
    TINY_PIPELINES["sd3"]().save_pretrained(tmp_path / "sd3")  # 2x VAE, patch 1
    with pytest.raises(TeacherError, match="teacher.resolution: 33 px is not a multiple of 2"):
        load_pretrained(str(tmp_path / "sd3"), resolution=33)
    index = tmp_path / "sd3" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusion3InpaintPipeline"}))
    with pytest.raises(TeacherError, match="is a StableDiffusion3InpaintPipeline; supported: StableDiffusionPipeline"):
        load_pretrained(str(tmp_path / "sd3"))


def test_the_caches_key_on_the_teacher_files_not_only_its_name(tmp_path):
    """Replacing a local teacher's text encoder or VAE changes what the prompt and latent caches key on."""
    import os

    from stepdistill.tiny import TINY_PIPELINES

    TINY_PIPELINES["sd15"]().save_pretrained(tmp_path / "sd")
    first = load_pretrained(str(tmp_path / "sd")).cache_id
    assert load_pretrained(str(tmp_path / "sd")).cache_id == first
    weights = next((tmp_path / "sd" / "vae").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_pretrained(str(tmp_path / "sd")).cache_id != first


def test_flux_schnell_prompts_default_to_256_t5_tokens(tmp_path):
    """FLUX.1-schnell (no guidance input) was trained with 256 T5 tokens, FLUX.1-dev with 512."""
    from stepdistill.tiny import TINY_PIPELINES

    for kind, length in [("flux", 256), ("flux-dev", 512)]:
        TINY_PIPELINES[kind]().save_pretrained(tmp_path / kind)
        teacher = load_pretrained(str(tmp_path / kind))
        assert teacher.encode_settings["max_sequence_length"] == length
        assert ("guidance" in teacher.meta) == (kind == "flux-dev")


def test_sd3_dynamic_shift_counts_patches_of_the_backbone():
    """StableDiffusion3Pipeline counts ``(h // patch_size) * (w // patch_size)`` tokens; the tiny SD3 model has patch
    size 1, so assuming FLUX's 2 would shift less."""
    import math

    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from stepdistill.families import FAMILIES, family_denoiser

    teacher = load_tiny("sd3")
    assert teacher.backbone.config.patch_size == 1
    cfg = {**teacher.scheduler_config, "use_dynamic_shifting": True, "base_image_seq_len": 64,
           "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    h, w = teacher.sample_shape[1:]
    schedule = family_denoiser(FAMILIES["sd3"], teacher.backbone, cfg, (h, w)).schedule
    assert schedule.shift == pytest.approx(math.exp(calculate_shift(h * w, 64, 4096, 0.5, 1.15)), rel=1e-12)


def test_xformers_asked_for_but_absent_is_one_line(tmp_path, capsys):
    from diffusers.utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed here")
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(family_recipe("sd15", **{"train.attention_backend": "xformers"})))
    code, err = _cli(["distill", str(recipe), "--output-dir", str(tmp_path / "run")], capsys)
    assert code != 0 and "train.attention_backend: xformers is not installed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_pretrained_lora_base_is_loaded_in_bf16_and_its_adapters_train_in_float32(tmp_path):
    """A frozen bf16 base is loaded as bf16 (FLUX in float32 first would take 48 GB of host memory); full copies
    start from the float32 weights."""
    from stepdistill.tiny import TINY_PIPELINES

    TINY_PIPELINES["sd15"]().save_pretrained(tmp_path / "sd")
    loaded = load_pretrained(str(tmp_path / "sd"), dtype="bfloat16").backbone
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    reference = load_pretrained(str(tmp_path / "sd")).backbone.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    pretrained = {"teacher.tiny": None, "teacher.pretrained": str(tmp_path / "sd"), "roles.teacher_dtype": "bfloat16"}
    trainer = Trainer(build_recipe(family_dmd_recipe("sd15", **pretrained)), tmp_path / "run", show_progress=False)
    trainer.setup().train()
    base = trainer.teacher.backbone
    assert {p.dtype for n, p in base.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in base.named_parameters() if ".lora_" in n} == {torch.float32}
    full = Trainer(build_recipe(family_recipe("sd15", **pretrained)), tmp_path / "full", show_progress=False).setup()
    fp32 = load_pretrained(str(tmp_path / "sd")).backbone.state_dict()
    assert all(torch.equal(v, fp32[k]) for k, v in full.nets.student.backbone.state_dict().items())  # not rounded


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bf16_teacher_trains_a_float32_student(tmp_path, mode):
    overrides = {"roles.teacher_dtype": "bfloat16"}
    recipe = family_recipe("sd15", **overrides) if mode == "full" else family_dmd_recipe("sd15", **overrides)
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    teacher_dtypes = {p.dtype for n, p in trainer.teacher.backbone.named_parameters() if ".lora_" not in n}
    assert teacher_dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.nets.student.trainable_parameters()} == {torch.float32}
    before = [p.detach().clone() for p in trainer.nets.student.trainable_parameters()]
    trainer.train()
    after = list(trainer.nets.student.trainable_parameters())
    assert all(torch.isfinite(p).all() for p in after) and any((a - b).abs().max() > 0 for a, b in zip(after, before))


def test_image_folder_latents_are_cached(tmp_path, monkeypatch):
    from PIL import Image

    from stepdistill.data import latent_table

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    teacher = load_tiny("sd15")
    latents = latent_table(str(tmp_path), teacher, tmp_path / "c")
    assert latents.shape == (3, *teacher.sample_shape)
    monkeypatch.setattr(teacher.vae, "encode", lambda *a, **k: pytest.fail("VAE used despite the cache"))
    torch.testing.assert_close(latent_table(str(tmp_path), teacher, tmp_path / "c"), latents, rtol=0, atol=0)
    # the same folder as a run's data: latents of the teacher's shape, paired with prompt-table rows per batch
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in tmp_path.glob("*.png"):
        p.rename(imgs / p.name)
    recipe = family_recipe("sd15", **{"data.source": "image_folder", "data.path": str(imgs)})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    batch = trainer.data.next(torch.Generator().manual_seed(0))
    assert batch.x0.shape == (2, *teacher.sample_shape) and batch.cond["encoder_hidden_states"].shape[0] == 2


def _random_images(folder, n, captions=None):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        if captions is not None and i < captions:
            (folder / f"{i}.txt").write_text(f"caption number {i}\n")
    return folder


def test_the_gan_classifies_each_real_image_with_its_own_caption(tmp_path):
    """DMD2 shows the GAN each real image with its caption (``name.txt`` beside ``name.png``) and each fake with
    its prompt; prompts are drawn independently of the images."""
    images = _random_images(tmp_path / "images", 4, captions=4)
    recipe = family_dmd_recipe("sd15", **{"method.gan_weight": 1e-2, "data.source": "image_folder",
                                          "data.path": str(images), "optim.discriminator.lr": 1e-3})
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    data = trainer.data
    encoded = trainer.conditions["encoder_hidden_states"]
    table = data.captions["encoder_hidden_states"]
    assert table.shape[0] == 4 and not torch.equal(table[0], table[1])
    batch = data.next(torch.Generator().manual_seed(0))
    for x0, own in zip(batch.x0, batch.x0_cond["encoder_hidden_states"]):
        j = next(j for j in range(4) if torch.equal(data.tensor[j], x0))
        assert torch.equal(own, table[j])  # the drawn image's own caption
    assert any(torch.equal(c, e) for c in batch.cond["encoder_hidden_states"] for e in encoded)

    seen = {}
    features = trainer.nets["fake_score"].features

    def spy(x, t, cond, layers=None):
        seen["cond"] = cond
        return features(x, t, cond, layers)

    trainer.nets["fake_score"].features = spy
    batch.generator = torch.Generator().manual_seed(1)
    next(iter(loss_terms(trainer.method("fake_score", trainer.nets, batch))))
    fakes, reals = seen["cond"]["encoder_hidden_states"].chunk(2)
    assert torch.equal(fakes, batch.cond["encoder_hidden_states"])
    assert torch.equal(reals, batch.x0_cond["encoder_hidden_states"])


@pytest.mark.parametrize("captions, match", [
    (0, "the GAN term .* pairs each real image with its caption, and the images under .* have none"),
    (3, "1 of 4 images have no caption file"),
])
def test_gan_reals_without_captions_are_refused_before_training(tmp_path, captions, match):
    from stepdistill.config import ConfigError

    images = _random_images(tmp_path / "images", 4, captions=captions)
    recipe = family_dmd_recipe("sd15", **{"method.gan_weight": 1e-2, "data.source": "image_folder",
                                          "data.path": str(images)})
    with pytest.raises(ConfigError, match=match):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()


FAMILY_RECIPES = sorted(p for folder in ("progressive", "dmd2", "lcm", "lcm_lora", "pcm", "tcd", "scm", "rcm", "sid",
                                          "sida", "phased_dmd", "add", "ladd", "lightning")
                        for p in (Path(__file__).resolve().parents[1] / "recipes" / folder).glob("*.yaml")
                        if p.stem in FAMILIES)


def _tiny_overrides(path: Path, tmp_path: Path, family: str) -> list[str]:
    """Overrides that run a recipe written for real weights on its tiny model: only the teacher, data and budget
    change (captioned random images where the recipe reads an image folder)."""
    from PIL import Image

    from stepdistill.config import load_recipe
    from stepdistill.methods import method_class, method_parameters

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a random picture number {i}")  # DMD2's GAN shows reals with captions
    real = load_recipe(path).data.source == "image_folder"
    overrides = ["teacher.pretrained=null", f"teacher.tiny={family}", "teacher.resolution=null",
                 "teacher.max_sequence_length=null", f"data.prompts={SMOKE_PROMPTS}", "data.batch_size=2",
                 f"data.path={images}" if real else "data.path=null",
                 *([] if real else ["data.source=gaussian"]),
                 "train.max_steps=2", "train.mixed_precision='no'", "train.sample_every=0", "train.checkpoint_every=0",
                 "train.num_sample_images=2"]
    if method_class(load_recipe(path).method.name).teacher_grad:  # bf16 teacher gradients need autocast, off here
        overrides.append("roles.teacher_dtype=float32")
    method = load_recipe(path).method
    if method.params.get("source", method_parameters(method.name).get("source", (None, None))[1]) == "dino":
        overrides.append("method.dino_tiny=true")  # no DINOv2 weights offline: a random tiny one
    if method.name == "ladd":  # the teacher's samples, the reals: a handful, on a short grid
        overrides += ["method.num_pairs=4", "method.pair_steps=2"]
    if load_recipe(path).method.name == "progressive":
        overrides += ["method.teacher_steps=8", "method.final_steps=4", "method.steps_per_stage=1"]
    if method.name == "lightning":  # one step of each stage: regression, MSE, adversarial
        overrides += ["method.teacher_steps=8", "method.stages=[4, 2]", "method.steps_per_stage=1",
                      "method.relaxed_steps=0", "method.disc_warmup=0",
                      "method.regression_steps=1", "train.max_steps=3"]
        if "regression_steps" in load_recipe(path).method.params:  # SD1.5/SDXL: one regression step, one halving
            overrides.append("method.regression_steps=1")
    return overrides


@pytest.mark.parametrize("path", FAMILY_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_family_recipes_run_offline_on_their_tiny_model(tmp_path, path):
    """Each SD-family recipe (written for the real weights) runs for real on its tiny model: the recipe's own method,
    roles, guidance and schedule settings, with only the teacher, data and budget swapped, then exports."""
    from stepdistill.config import load_recipe

    recipe = load_recipe(path, _tiny_overrides(path, tmp_path, path.stem))
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    trainer.train()
    meta = json.loads((trainer.export() / "stepdistill.json").read_text())
    stock = trainer.teacher.family.pipeline  # a student of several experts: its pipelines/experts.py counterpart
    assert meta["pipeline_class"] == (stock if len(trainer.run.grid.roles()) == 1 else f"Experts{stock}")
    if trainer.writes_lora():
        assert (trainer.export_lora(kohya=recipe.export.kohya) / "pytorch_lora_weights.safetensors").exists()


def test_dmd2_sd15_stage_two_recipe_continues_stage_one(tmp_path):
    """recipes/dmd2/sd15_stage2.yaml on the tiny model: stage 1's student and fake score (its latest checkpoint), the
    GAN head new, the GAN term on."""
    from stepdistill.config import load_recipe

    folder = Path(__file__).resolve().parents[1] / "recipes" / "dmd2"
    one = load_recipe(folder / "sd15.yaml", [*_tiny_overrides(folder / "sd15.yaml", tmp_path, "sd15"),
                                              "train.checkpoint_every=2"])
    Trainer(one, tmp_path / "stage1", show_progress=False).setup().train()
    two = load_recipe(folder / "sd15_stage2.yaml", [*_tiny_overrides(folder / "sd15_stage2.yaml", tmp_path, "sd15"),
                                                     f"train.init_from={tmp_path / 'stage1'}"])
    trainer = Trainer(two, tmp_path / "stage2", show_progress=False).setup()
    saved = load_file(str(tmp_path / "stage1" / "checkpoints" / "step-2" / "student.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in trainer.nets.student.role_state_dict().items())
    assert trainer.step == 0
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert trainer.step == 2 and any(k.startswith("loss_gan") for row in rows for k in row)


@pytest.mark.parametrize("tiny", ["sd15", "sd3", "flux"])
def test_feature_maps_of_every_family_stop_early_and_match_the_whole_pass(tiny):
    """``Denoiser.features``: a map ``[B, C, h, w]`` per block (UNets: down and mid blocks; SD3/FLUX: each block's
    image tokens on the latent grid of patches), several at once, with the forward cut after the deepest one asked
    for; values equal the whole pass's. A GAN head reads any of them (DMD2's on a transformer's middle block)."""
    from stepdistill.nets.gan_head import GANHead
    from stepdistill.teachers import load_tiny

    teacher = load_tiny(tiny)
    den = teacher.denoiser
    cond = encode_prompts(teacher.load_pipeline(), tiny, ["a", "b"], **teacher.encode_settings)
    modules = den.feature_modules()
    channels = den.feature_channels()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    layers = (0, den.bottleneck)
    ran = []
    hooks = [m.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, m in enumerate(modules)]
    cut = den.features(x, t, cond, layers)
    assert max(ran) == den.bottleneck  # nothing after the deepest requested block ran
    ran.clear()
    _, whole = den.with_features(x, t, cond, layers)
    assert max(ran) == len(modules) - 1
    for h in hooks:
        h.remove()
    for i, a, b in zip(layers, cut, whole):
        torch.testing.assert_close(a, b)
        assert a.shape[:2] == (2, channels[i]) and a.ndim == 4
    if tiny != "sd15":  # SD3 patchifies by its patch size, FLUX packs 2x2
        assert cut[0].shape[2:] == (x.shape[2] // den.patch, x.shape[3] // den.patch)
    head = GANHead.for_denoiser(den, layers)
    assert head(cut).shape == (2, 2)


def test_cli_sample_on_a_family_run(tmp_path, capsys):
    trainer = Trainer(build_recipe(family_recipe("sd15")), tmp_path / "run", show_progress=False).setup()
    trainer.train()
    trainer.export()
    run = str(tmp_path / "run")
    assert main(["sample", run, "--num-samples", "3", "--output", str(tmp_path / "grid.png")]) == 0
    assert main(["sample", run, "--num-samples", "3", "--output", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (3, *trainer.teacher.sample_shape)  # latents, prompt i for sample i
    capsys.readouterr()  # (`eval` of family runs: tests/test_eval_t2i.py)
    code, err = _cli(["sample", f"{run}/pipeline", "--output", str(tmp_path / "p.png")], capsys)
    assert code != 0 and "an exported StableDiffusionPipeline" in err and len(err.splitlines()) == 1


def test_a_hub_teachers_cache_key_is_its_snapshot_commit(tmp_path, monkeypatch):
    """Hub snapshots are downloaded piecemeal (the text encoders only when prompts are first encoded): the key is the
    commit, so the first and later runs share the prompt and latent caches."""
    import huggingface_hub

    from stepdistill.teachers import _weights_identity

    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, revision=None: str(snapshot / name))
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    first = _weights_identity("org/model", revision=None, variant=None, index=index)
    (snapshot / "text_encoder").mkdir()
    (snapshot / "text_encoder" / "model.safetensors").write_bytes(b"x")
    assert _weights_identity("org/model", revision="main", variant=None, index=index) == first
    assert _weights_identity("org/model", revision=None, variant="fp16", index=index) != first
