"""The Python examples in README.md and docs/ run, in order, page by page (fences tagged `no-run` excepted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.embedded


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_examples_run(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    blocks = FENCE.findall(page.read_text())
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}[python block {i}]", "exec"), namespace)
