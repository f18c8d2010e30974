"""Recipes: every shipped recipe validates; bad keys and values are rejected naming the key."""

from pathlib import Path

import pytest
import yaml

from stepdistill.config import ConfigError, apply_overrides, build_recipe, load_recipe
from stepdistill.methods import METHODS
from stepdistill.train import Trainer

from ._recipes import gmm_recipe


ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
RECIPES = [p for p in RECIPES if "accelerate" not in p.parts] + [ROOT / "stepdistill" / "assets" / "demo.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method.name
    recipe.teacher.source()
    # The resolved recipe round-trips through YAML into the same recipe.
    again = build_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        assert load_config_from_file(str(path)).num_processes >= 1


@pytest.mark.parametrize("overrides, message", [
    ({"train.max_stepz": 3}, "train.max_stepz: unknown key; allowed:"),
    ({"export.variant": "fp16"}, "export.variant: 'fp16' names the files of a lower-precision copy"),
    ({"export.dtype": "float8"}, "export.dtype: 'float8' is not allowed"),
    ({"optim.student.name": "sgd"}, "optim.student.name: 'sgd'; choose one of adamw, radam, adamw8bit"),
    ({"train.attention_backend": "turbo"}, "train.attention_backend: 'turbo' is not allowed"),
    ({"train.max_steps": "many"}, "train.max_steps: expected an integer"),
    ({"train.mixed_precision": "fp8"}, "train.mixed_precision: 'fp8' is not allowed"),
    ({"method.name": "magic"},
     f"method.name: unknown method 'magic'; available: {', '.join(sorted(METHODS))}"),
    ({"method.halve_every": 2}, "method.halve_every: unknown key for method 'progressive'"),
    ({"optim.student.schedule": "zigzag"}, "optim.student.schedule: 'zigzag'"),
    ({"train.update_every": {"student": 0}}, "train.update_every.student: update ratio must be >= 1"),
    ({"data.batch_size": 0}, "data.batch_size: must be >= 1"),
    ({"method.teacher_steps": "many"}, "method.teacher_steps: expected an integer"),
    ({"method.guidance": [2.0]}, "method.guidance: expected a list of 2 values"),
    ({"teacher.tiny": "unet2d"}, "teacher: give exactly one of"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_recipe(gmm_recipe(**overrides))
    assert message in str(err.value)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"max_steps": 1}}, ["train.max_steps=10", "optim.student.lr=1e-3",
                                                         "train.trackers=[jsonl, tensorboard]"])
    assert data["train"]["max_steps"] == 10
    # YAML 1.1 reads "1e-3" as a string; the typed recipe still gets the float.
    assert build_recipe(gmm_recipe(**{"optim.student.lr": data["optim"]["student"]["lr"]})).optim["student"].lr == 1e-3
    assert data["train"]["trackers"] == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["train.max_steps"])


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every: must be >= 0 (0: never)"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: must be >= 0 (0: keep all)"),
    ("train.ema_decay=1.5", "train.ema_decay: must be in [0, 1)"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be positive"),
    ("train.max_nonfinite=0", "train.max_nonfinite: must be >= 1"),
    ("roles.rank=0", "roles.rank: must be >= 1"),
    ("optim.student.betas=[0.9]", "optim.student.betas: two values in [0, 1) expected"),
    ("optim.student.betas=[0.9,1.5]", "optim.student.betas: two values in [0, 1) expected"),
    ("optim.student.eps=-1", "optim.student.eps: must be > 0, got -1"),
    ("optim.student.weight_decay=-1", "optim.student.weight_decay: must be >= 0"),
    ("optim.student.warmup=-3", "optim.student.warmup: must be >= 0"),
    ("optim.student.period=-2", "optim.student.period: must be >= 1 or null"),
])
def test_out_of_range_settings_are_one_line(override, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        build_recipe(apply_overrides(gmm_recipe(), [override]))


def test_an_unquoted_no_is_the_word():
    """YAML 1.1 reads `no` as false; ``train.mixed_precision=no`` on the command line means "no"."""
    assert build_recipe(apply_overrides(gmm_recipe(), ["train.mixed_precision=no"])).train.mixed_precision == "no"


@pytest.mark.parametrize("overrides, message", [
    # PD rounds its grids to the teacher's timesteps (3 of 1024: 341, 683, 1024 = 1023, 682, 340 as indices), which
    # no stock scheduler replays: DDIMScheduler steps 682 -> 341; and 2048 steps have not as many timesteps
    ({"method.teacher_steps": 12, "method.final_steps": 3}, "steps each t to t - 341: [682, 341, -1]"),
    ({"method.teacher_steps": 2048, "method.final_steps": 4}, "2048 steps need as many distinct timesteps"),
    ({"method.teacher_steps": 12, "method.final_steps": 4}, "must be a power of two"),
    ({"train.update_every": {"fake_score": 2}}, "train.update_every: unknown phase(s) ['fake_score']"),
    ({"optim.fake_score": {"lr": 1e-4}}, "optim.fake_score: not a trainable role"),
    ({"roles.mode": "lora"}, "roles.mode: lora needs a teacher with weights"),
])
def test_setup_rejects_before_writing(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        Trainer(build_recipe(gmm_recipe(**overrides)), out, show_progress=False).setup()
    assert message in str(err.value)
    assert not out.exists(), "a rejected recipe must not create the run directory"
