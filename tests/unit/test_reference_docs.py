"""docs/api.md and docs/cli.md are what scripts/gen_reference.py writes today."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("page", ["docs/api.md", "docs/cli.md"])
def test_reference_page_is_current(page, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    module = runpy.run_path(str(ROOT / "scripts" / "gen_reference.py"))
    expected = module["PAGES"][page]()
    assert (ROOT / page).read_text() == expected, (
        f"{page} is stale: run python scripts/gen_reference.py and commit the result."
    )
