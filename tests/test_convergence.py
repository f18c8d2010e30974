"""Convergence checks (``-m slow``; minutes on CPU): the shipped PD recipes meet the foundation issue's bars."""

import pytest

from stepdistill.config import load_recipe
from stepdistill.evaluate import evaluate
from stepdistill.train import Trainer

from .test_config import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gmm", "gmm16"])
def test_progressive_gmm_meets_the_bars(tmp_path, name):
    recipe = load_recipe(ROOT / "recipes" / "progressive" / f"{name}.yaml")
    trainer = Trainer(recipe, tmp_path / name, show_progress=False).setup()
    trainer.train()
    m = evaluate(trainer.sampling_student(), trainer.method.student_grid(), trainer.teacher,
                 num_samples=recipe.eval.num_samples)
    s, same, full = m["student"], m["teacher_same_nfe"], m["teacher_full"]
    assert s["modes_covered"] == s["num_modes"]
    assert s["sliced_wasserstein"] <= 1.5 * full["sliced_wasserstein"]
    assert s["sliced_wasserstein"] < same["sliced_wasserstein"]
