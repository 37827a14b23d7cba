"""steering_study.py's leftover set asks nothing another measurement or the training asked."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest

from irm_lens.data.corpora import neutral_prompts
from irm_lens.recipes import SHIPPED_PAIRS, tuning_prompts

ROOT = Path(__file__).parents[2]


def _study():
    spec = importlib.util.spec_from_file_location("steering_study",
                                                  ROOT / "scripts" / "steering_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rest_set_is_disjoint_from_the_sets_the_pairs_and_the_tuning_questions():
    study = _study()
    args = types.SimpleNamespace(first_prompt=40, n_prompts=160)
    rest = study.rest_prompts(args)
    used = set(tuning_prompts(160)) | set(neutral_prompts(40, split="eval"))
    for k in range(3):
        used |= set(study._set_prompts(k, args)[0])
    for path in SHIPPED_PAIRS.glob("*.jsonl"):
        used |= {json.loads(line)["prompt"] for line in path.read_text().splitlines()}
    assert len(rest) == len(set(rest)) > 100
    assert not set(rest) & used
    # together they are every prompt there is
    every = set(neutral_prompts(None, split="eval")) | set(neutral_prompts(None, split="train"))
    assert set(rest) | used == every


def test_sets_parse_as_a_count_or_names():
    parse = _study()._parse_sets
    assert parse("3") == [0, 1, 2]
    assert parse("2,") == [2]
    assert parse("1,2,0") == [1, 2, 0]
    assert parse("rest") == ["rest"] and parse("0,rest") == [0, "rest"]
    with pytest.raises(SystemExit, match="--sets takes"):
        parse("first")
