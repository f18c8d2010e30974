"""The wheel: ``pip install .`` (not editable) ships the recipes, assets and pipelines, so ``stepdistill ls`` and
``stepdistill distill <shipped recipe name>`` work from any directory."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-1500:])
    return proc.stdout


@pytest.mark.usefixtures("one_thread")
def test_the_wheel_installs_into_a_fresh_environment_and_runs_a_shipped_recipe(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "wheel"), str(ROOT)], cwd=tmp_path)
    [wheel] = (tmp_path / "wheel").glob("stepdistill-*.whl")
    env = tmp_path / "venv"  # the dependencies come from this interpreter's site-packages; stepdistill from the wheel
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], cwd=tmp_path)
    python = env / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import stepdistill; print(stepdistill.__file__)"], cwd=elsewhere)
    assert str(env) in where  # the installed copy, not the source tree
    listing = _run([str(env / "bin" / "stepdistill"), "ls"], cwd=elsewhere)
    assert "progressive/gmm" in listing and "dmd2/digits" in listing and str(env) in listing
    out = _run([str(env / "bin" / "stepdistill"), "distill", "progressive/gmm", "--output-dir", "run",
                "teacher.gmm.denoiser=exact", "train.max_steps=2", "train.checkpoint_every=0",
                "train.sample_every=0", "data.batch_size=16"], cwd=elsewhere)
    assert (elsewhere / "run" / "pipeline" / "model_index.json").is_file() and "pipeline:" in out
    shipped = _run([str(python), "-c", "from stepdistill.export import PIPELINES; print(PIPELINES / 'flow_map.py')"],
                   cwd=elsewhere).strip()
    assert str(env) in shipped and Path(shipped).is_file()  # the single-file pipelines ship with the wheel
    bundled = _run([str(python), "-c", "from stepdistill.cli import EVAL_PROMPTS as P, RECIPES; print(RECIPES / P)"],
                   cwd=elsewhere).strip()
    assert str(env) in bundled and Path(bundled).is_file()  # `eval`'s default prompt list ships too
