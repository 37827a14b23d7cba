"""Every notebook in notebooks/ runs end to end on the embedded model, with small settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ARTIFACTS, DRAWN_FIGURES_JS, chromium_driver

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
SMALL = {
    "IRM_LENS_NB_MAX_NEW_TOKENS": "8",
    "IRM_LENS_NB_STEPS": "2",
    "IRM_LENS_NB_N_PROMPTS": "3",
    "IRM_LENS_NB_N_RANDOM": "2",
    "IRM_LENS_NB_N_TEXTS": "4",
}

pytestmark = pytest.mark.embedded
PLOTLY = "application/vnd.plotly.v1+json"


def test_there_are_notebooks():
    assert NOTEBOOKS
    sources = {p.name: p.read_text() for p in NOTEBOOKS}
    for name, source in sources.items():
        assert "figures." in source or "px." in source, name  # every notebook draws figures
        assert "irm_lens.generation" not in source, name  # the public API only
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
               if cell.cell_type == "code" and ("figures." in cell.source or "px." in cell.source)]
    for cell in drawing:
        assert any(PLOTLY in out.get("data", {}) for out in cell.get("outputs", [])), cell.source
    # circuitsvis views render offline: their bundle inlined, nothing fetched from a CDN.
    for cell in (c for c in notebook.cells if c.cell_type == "code" and "cv." in c.source):
        html_out = [out["data"]["text/html"] for out in cell.get("outputs", [])
                    if "text/html" in out.get("data", {})]
        assert html_out and "unpkg.com" not in html_out[0], cell.source
    _screenshot_figures(path.stem, notebook)


def _screenshot_figures(name: str, notebook) -> None:
    """Every figure the notebook drew, on one offline page, drawn by headless Chromium and kept
    as a screenshot (test-artifacts/notebooks/<name>.png) with the page beside it."""
    import plotly.io as pio

    outputs = [out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])]
    figures = [data[PLOTLY] for data in outputs if PLOTLY in data]
    views = [data["text/html"] for data in outputs
             if PLOTLY not in data and "text/html" in data and "circuitsvis" in data["text/html"]]
    parts = [pio.to_html(pio.from_json(json.dumps(figure)), full_html=False,
                         include_plotlyjs=i == 0, default_height="480px")
             for i, figure in enumerate(figures)]
    page = ARTIFACTS / "notebooks" / f"{name}.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("<html><body>" + "".join(parts + views) + "</body></html>")
    driver = chromium_driver()
    try:
        driver.get(page.as_uri())
        driver.implicitly_wait(5)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 100, 16000))
        drawn = driver.execute_script(DRAWN_FIGURES_JS)
        driver.save_screenshot(str(page.with_suffix(".png")))
    finally:
        driver.quit()
    assert figures and drawn == len(figures), (name, drawn, len(figures))
