"""The contract every registered method keeps, checked for each one as it stands (so every new family gets it for
free): two training steps with its default settings on a tiny teacher (the exact 2-D mixture, whose roles start
fresh), an exact resume, two real processes ending with identical weights, and the exported stock pipeline
reproducing the student in a process that never imports stepdistill."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import build_recipe
from stepdistill.methods import METHODS
from stepdistill.train import Trainer

from ._contract import contract_recipe
from .test_export import _consume, _expected
from .test_multiprocess import ROOT, _launch


pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(METHODS)


def _run(out, resume=False, **train):
    trainer = Trainer(build_recipe(contract_recipe(NAME[0], **train)), out, resume=resume, show_progress=False)
    trainer.setup().train()
    return trainer


NAME = [None]


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if k != "it_per_s"}
            for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", NAMES)
def test_two_steps_resume_exactly_and_export_to_a_stock_pipeline(tmp_path, name):
    NAME[0] = name
    full = _run(tmp_path / "full")
    _run(tmp_path / "part", max_steps=1)
    _run(tmp_path / "part", resume=True)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part") and len(_rows(tmp_path / "full")) == 2
    step2 = [tmp_path / run / "checkpoints" / "step-2" for run in ("full", "part")]
    for f in step2[0].glob("*.safetensors"):
        if not f.name.startswith("rng"):
            a, b = load_file(str(f)), load_file(str(step2[1] / f.name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    for role in full.optimizers:  # every trained role left its initial weights
        assert (step2[0] / f"{role}.safetensors").exists()
    images, _ = _consume(full.export(), tmp_path)
    np.testing.assert_allclose(images, _expected(full), atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract-ddp")
    _launch([str(ROOT / "tests" / "_contract_job.py"), str(out)], out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_end_with_identical_weights(two_ranks, name):
    rank0, rank1 = (r[name] for r in two_ranks)
    assert rank0["world"] == 2 and rank0["roles"] == rank1["roles"]
    assert rank0["weights"] == rank1["weights"] and rank0["losses"] == rank1["losses"]
