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
    sources = {p.name: p.read_text() for p in NOTEBOOKS}
    for name in ("02_training.ipynb", "03_case_of_the_dominant_neuron.ipynb"):
        assert "figures." in sources[name]  # the notebooks show the analyses' figures
    assert "circuitsvis" in sources["03_case_of_the_dominant_neuron.ipynb"]


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
    # Every cell that draws a figure shows it inline (plotly's own MIME type).
    drawing = [cell for cell in notebook.cells
               if cell.cell_type == "code" and "figures." in cell.source]
    for cell in drawing:
        assert any("application/vnd.plotly.v1+json" in out.get("data", {})
                   for out in cell.get("outputs", [])), cell.source
    # circuitsvis views render offline: their bundle inlined, nothing fetched from a CDN.
    for cell in (c for c in notebook.cells if c.cell_type == "code" and "cv." in c.source):
        html_out = [out["data"]["text/html"] for out in cell.get("outputs", [])
                    if "text/html" in out.get("data", {})]
        assert html_out and "unpkg.com" not in html_out[0], cell.source
