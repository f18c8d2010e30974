"""Vector data outside [-1, 1] (``teacher.gmm.normalize``): the stock ``DDPMPipeline`` clamps its output to [-1, 1],
so such a mixture is trained in mapped coordinates, the map travels with the export, and ``sample`` / ``eval`` report
in the data's own coordinates."""

import json

import numpy as np
import pytest
import torch
import yaml

from stepdistill.cli import main
from stepdistill.config import build_recipe
from stepdistill.mixture import DataMap, GaussianMixture, fit_data_map
from stepdistill.train import Trainer

from ._recipes import gmm_recipe
from .test_export import _consume, _expected


pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture(reach: float) -> dict:
    """Four modes at -+ reach on a square, unequal weights."""
    r = reach
    return {"means": [[r, r], [-r, r], [r, -r], [-0.5 * r, -r]], "stds": [0.05 * r, 0.08 * r, 0.06 * r, 0.05 * r],
            "weights": [0.4, 0.3, 0.2, 0.1], "denoiser": "exact"}


def test_the_fitted_map_puts_the_range_inside_and_leaves_inside_mixtures_alone():
    ring = GaussianMixture([[0.7, 0.0], [0.0, 0.7]], 0.06)  # the shipped kind: inside [-1, 1] -> the identity
    assert fit_data_map(ring).identity
    wide = GaussianMixture([[4.0, 1.0], [-2.0, 3.0]], [0.2, 0.4])
    m = fit_data_map(wide)
    inside = m.mixture(wide)
    low = (inside.means - 4 * inside.stds[:, None]).min()
    high = (inside.means + 4 * inside.stds[:, None]).max()
    assert float(low) >= -1 - 1e-9 and float(high) <= 1 + 1e-9 and max(-float(low), float(high)) == pytest.approx(1.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(m.to_data(m.to_model(x)), x)
    torch.testing.assert_close(inside.means, m.to_model(wide.means))
    assert DataMap(shift=(0.0, 0.0), scale=1.0).identity


@pytest.mark.parametrize("reach", [4.0, 40.0])
def test_a_wide_mixture_trains_exports_and_round_trips_in_data_coordinates(tmp_path, capsys, reach):
    recipe = gmm_recipe(**{"train.max_steps": 6})
    recipe["teacher"]["gmm"] = _mixture(reach)
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    teacher = trainer.teacher
    assert not teacher.data_map.identity and float(teacher.mixture.means.abs().max()) < 1
    trainer.train()
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["data_map"] == teacher.data_map.config()
    card = (folder / "README.md").read_text()
    assert "np.array(" in card and repr(teacher.data_map.scale) in card
    # the stock pipeline, in a process that never imports stepdistill, then the card's one line of numpy
    images, _ = _consume(folder, tmp_path)
    m = meta["data_map"]
    data = (2 * images.reshape(len(images), -1) - 1) * m["scale"] + np.array(m["shift"])
    ours = _expected(trainer)  # the training-time student on the pipeline's noise, in [0, 1] as the pipeline gives
    ours = (2 * ours.reshape(len(ours), -1) - 1) * m["scale"] + np.array(m["shift"])
    np.testing.assert_allclose(data, ours, rtol=0, atol=2e-5 * m["scale"])
    assert np.abs(data).max() > 1.5  # really in the data's coordinates
    if reach != 4.0:
        return
    # `sample` and `eval` of the run and of the exported pipeline report in the data's coordinates, alike
    assert main(["sample", str(tmp_path / "run"), "--num-samples", "64", "--output", str(tmp_path / "x.npy")]) == 0
    x = np.load(tmp_path / "x.npy")
    assert np.abs(x).max() > 1.5
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--num-samples", "64"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(folder), "--num-samples", "64"]) == 0
    from_pipeline = json.loads(capsys.readouterr().out)
    assert from_run["student"] == pytest.approx(from_pipeline["student"])
    # measured against the mixture as given: the exact teacher's distance scales with the data, not the model's
    model_space = trainer.teacher.mixture
    assert from_run["teacher_full"]["sliced_wasserstein"] > 2 * float(model_space.stds.max())


def test_normalize_off_with_data_outside_is_refused_unless_nothing_is_exported(tmp_path, capsys):
    recipe = gmm_recipe()
    recipe["teacher"]["gmm"] = {**_mixture(4.0), "normalize": "off"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["distill", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DDPMPipeline clamps its output to [-1, 1]" in err
    assert "teacher.gmm.normalize: auto" in err and not (tmp_path / "run").exists()
    recipe["export"] = {"pipeline": False}
    path.write_text(yaml.safe_dump({**recipe, "train": {**recipe["train"], "max_steps": 1}}))
    assert main(["distill", str(path), "--output-dir", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("gmm, match", [
    ({"means": [[0.0, float("nan")]], "std": 0.1}, "teacher.gmm.means must be finite"),
    ({"means": [[0.0, 0.0]], "stds": [float("inf")]}, "teacher.gmm.stds must be finite"),
    ({"means": [[0.0, 0.0], [0.0, 0.0]], "std": 0.0}, "stds must be positive"),
    ({"means": [[0.0, 0.0]], "std": 0.1, "normalize": "yes"}, "teacher.gmm.normalize must be 'auto' or 'off'"),
])
def test_bad_mixtures_are_one_line_and_write_nothing(tmp_path, capsys, gmm, match):
    recipe = gmm_recipe()
    recipe["teacher"]["gmm"] = {**gmm, "denoiser": "exact"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["distill", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_sum_to_one_are_said_to_be_normalised(capsys):
    from stepdistill.teachers import load_gmm

    teacher = load_gmm([[0.5, 0.0], [-0.5, 0.0]], std=0.1, weights=[2.0, 1.0], denoiser="exact")
    assert teacher.mixture.weights.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert "teacher.gmm.weights sum to 3; they are divided by that sum" in capsys.readouterr().err


def test_a_run_made_before_the_map_is_not_read_in_mapped_coordinates(tmp_path, capsys):
    """A checkpoint that records no data map was trained in the data's own coordinates (before
    ``teacher.gmm.normalize``): resuming it, or reading it back, under a recipe that would map the data is refused
    in one line that says how to continue it."""
    recipe = gmm_recipe(**{"train.max_steps": 1})
    recipe["teacher"]["gmm"] = {**_mixture(4.0), "normalize": "off"}
    recipe["export"] = {"pipeline": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["distill", str(path), "--output-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    state = tmp_path / "run" / "checkpoints" / "step-1" / "state.json"
    saved = json.loads(state.read_text())
    assert saved["data_map"] == {"scale": 1.0, "shift": [0.0, 0.0]}
    del saved["data_map"]  # as an older version wrote it
    state.write_text(json.dumps(saved))
    recipe["teacher"]["gmm"]["normalize"] = "auto"
    path.write_text(yaml.safe_dump({**recipe, "train": {**recipe["train"], "max_steps": 2}}))
    assert main(["distill", str(path), "--output-dir", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "continues with teacher.gmm.normalize: off" in err
