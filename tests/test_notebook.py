"""The quickstart notebook runs end to end (quick mode) and sticks to the public API."""

import ast
import shutil
from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_uses_only_the_public_api():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    imported = []
    for source in _code_cells(nb):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stepdistill"):
                imported += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names if alias.name.startswith("stepdistill")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"the notebook uses the private attribute .{node.attr}")
    assert imported, "the notebook imports nothing from stepdistill"
    private = [name for name in imported if any(part.startswith("_") for part in name.split("."))]
    assert not private, f"the notebook imports private names: {private}"


def test_notebook_is_committed_with_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("image/png" in out.get("data", {}) for out in outputs), "save the notebook with its figures"
    assert not [out for out in outputs if out.output_type == "error"]


def test_notebook_executes_in_quick_mode(tmp_path, monkeypatch):
    executed = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, executed)  # executed outputs go to the copy; the committed notebook is never rewritten
    nb = nbformat.read(executed, as_version=4)
    monkeypatch.setenv("STEPDISTILL_QUICK", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny MLP: several times slower with 2 threads on shared cores
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run directory (tempfile.mkdtemp) lands here
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "quick mode" in text
    assert "max |pipeline - student|" in text
