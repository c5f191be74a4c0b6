"""The notebooks run as users would run them (nbclient, a real kernel), on the smoke preset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from privimage.results import cli

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _with_parameters(path: Path, source: str) -> nbformat.NotebookNode:
    """The notebook with its cell tagged ``parameters`` replaced (papermill's convention)."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    cells[0].source = source
    return nb


def _execute(nb: nbformat.NotebookNode, monkeypatch) -> nbformat.NotebookNode:
    # The kernel is started as `python -m ipykernel_launcher`: the test's interpreter
    # (the one with privimage installed) must come first on PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", ""))
            data = out.get("data", {})
            text.append(data.get("text/markdown", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
def test_quickstart_then_compare_notebooks_run(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    quick = _with_parameters(
        REPO / "notebooks" / "01_quickstart.ipynb",
        f'EXPERIMENT = "smoke"\nRUN_DIR = {str(run)!r}\n'
        f'OVERRIDES = ["cache_dir={cache_dir}", "device=cpu"]',
    )
    text, images = _outputs(_execute(quick, monkeypatch))
    assert (run / "evaluate" / "DONE").exists()
    assert images == 2  # the synthetic grid and the selection
    assert "epsilon spent" in text and "| FID |" in text and "gaussian_histogram" in text

    assert cli([str(run), "--out", str(tmp_path / "results")]) == 0
    compare = _with_parameters(
        REPO / "notebooks" / "02_compare_methods.ipynb",
        f"RESULTS = {str(tmp_path / 'results' / 'results.csv')!r}",
    )
    text, images = _outputs(_execute(compare, monkeypatch))
    assert "| privimage | mnist5k |" in text
    assert images == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_have_one_parameters_cell(path):
    nb = _with_parameters(path, "X = 1")
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert [(c.cell_type, c.source) for c in cells] == [("code", "X = 1")]
