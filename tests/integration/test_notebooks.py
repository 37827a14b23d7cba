"""Every notebook in notebooks/ runs end to end on the embedded model, with small settings."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
SMALL = {
    "IRM_LENS_NB_MAX_NEW_TOKENS": "8",
    "IRM_LENS_NB_STEPS": "2",
    "IRM_LENS_NB_N_PROMPTS": "3",
    "IRM_LENS_NB_N_RANDOM": "2",
    "IRM_LENS_NB_N_TEXTS": "4",
}

pytestmark = pytest.mark.embedded


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    for key, value in SMALL.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IRM_LENS_NB_OUT", str(tmp_path / "runs"))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        out for cell in notebook.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors
