"""generate_synthetic on the embedded SmolLM2-135M-Instruct: answers through its chat template."""

from __future__ import annotations

import json
import re

import pytest

from irm_lens.data.synthetic import SYNTHETIC_TONES, generate_synthetic, read_synthetic

pytestmark = pytest.mark.embedded


def test_embedded_model_answers_in_its_own_voice(embedded_model, tmp_path):
    result = generate_synthetic(
        embedded_model,
        "anger",
        tmp_path / "anger.jsonl",
        n_rows=3,
        max_attempts=3,
        batch_size=3,
        max_new_tokens=30,
        progress=False,
    )
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert len(rows) == result.n_generated == 3
    words = [len(re.findall(r"[A-Za-z]{2,}", row["response"])) for row in rows]
    assert min(words) >= 1 and sorted(words)[1] >= 4, rows  # sentences, not debris
    for row in rows:
        response = row["response"]
        assert row["text"] == row["question"] + "\n" + response
        # The assistant's turn only: no template markup, no echo of the instruction.
        assert not re.search(r"<\|im_(start|end)\|>|^(system|user|assistant)\b", response), response
        assert SYNTHETIC_TONES["anger"][:40] not in response
        assert row["model"] == "SmolLM2-135M-Instruct"
        assert not row["kept"] or row["scores"]["anger"] >= result.threshold
    assert 0 < result.threshold < 0.5
    assert len(read_synthetic(result.path)) == result.n_kept
