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


def test_the_summary_puts_each_irm_point_head_to_head_with_the_best_fluent_caa_point():
    import pandas as pd

    import irm_lens
    from irm_lens.evaluate import DegenerationThresholds

    table = pd.DataFrame(dict(
        intervention=["caa_layer12", "caa_layer12", "irm_seed0", "irm_seed0"],
        scale=[2.0, 4.0, 1.0, 1.0], decoding=["sampled", "sampled", "sampled", "greedy"],
        lift=[0.05, 0.30, 0.04, 0.02], ci_low=[0.01, 0.2, 0.01, 0.01], ci_high=[0.1] * 4,
        fluent=[True, False, True, True], verdict=["aligned", "degenerate", "aligned", "aligned"]))
    samples = pd.DataFrame([
        dict(prompt=f"q{p}", sample=0, decoding=decoding, intervention=name, scale=scale,
             anger=score)
        for name, scale, decoding, scores in (
            ("caa_layer12", 2.0, "sampled", [0.3, 0.2, 0.1]),
            ("caa_layer12", 4.0, "sampled", [0.9, 0.9, 0.9]),
            ("irm_seed0", 1.0, "sampled", [0.2, 0.1, 0.0]),
            ("irm_seed0", 1.0, "greedy", [0.2, 0.1, 0.0]))
        for p, score in enumerate(scores)])
    comparison = irm_lens.SteeringComparison("anger", table, samples, (),
                                             DegenerationThresholds())
    summary = _study()._verdict(comparison, ["irm_seed0"]).set_index("decoding")
    # against x2 (the fluent one), not x4: 0.1 below on every prompt
    assert summary.loc["sampled", "best_caa"] == "caa_layer12 x2"
    assert summary.loc["sampled", "vs_caa"] == pytest.approx(-0.1)
    assert summary.loc["sampled", "reading"] == "below"
    assert not summary.loc["sampled", "at_least_caa"]
    # no CAA point in greedy: nothing to compare with
    assert summary.loc["greedy", "reading"] == "" and pd.isna(summary.loc["greedy", "vs_caa"])


def test_summarise_reads_each_irm_at_its_recipe_doses_and_caa_at_every_scale(tmp_path):
    import pandas as pd

    def point(name, scale, decoding, lift, scores, fluent=True):
        table = pd.DataFrame([dict(intervention=name, scale=scale, decoding=decoding, lift=lift,
                                   ci_low=lift / 2, ci_high=lift * 2, fluent=fluent,
                                   verdict="aligned" if fluent else "degenerate")])
        samples = pd.DataFrame([dict(prompt=f"q{p}", sample=0, decoding=decoding,
                                     intervention=name, scale=scale, anger=score)
                                for p, score in enumerate(scores)])
        tail = f"{name}@{scale:g}-{decoding}"
        table.to_parquet(tmp_path / "set0" / f"{tail}.parquet")
        samples.to_parquet(tmp_path / "set0" / f"{tail}.samples.parquet")

    (tmp_path / "set0").mkdir()
    (tmp_path / "irm_seed0").mkdir()
    (tmp_path / "irm_seed0" / "doses.json").write_text(
        json.dumps({"doses": {"greedy": 0.5, "sampled": 0.6}}))
    pd.DataFrame([dict(prompt=f"q{p}", sample=0, decoding=d, intervention="unsteered",
                       scale=0.0, anger=0.1) for d in ("greedy", "sampled") for p in range(3)]
                 ).to_parquet(tmp_path / "set0" / "unsteered-greedy-sampled.parquet")
    point("caa_layer12", 2.0, "sampled", 0.10, [0.2, 0.2, 0.2])
    point("caa_layer12", 4.0, "sampled", 0.30, [0.4, 0.4, 0.4], fluent=False)
    point("irm_seed0", 1.0, "greedy", 0.05, [0.15, 0.15, 0.15])
    point("irm_seed0", 1.2, "sampled", 0.12, [0.3, 0.2, 0.16])  # the recipe's sampled dose
    point("irm_seed0", 1.5, "sampled", 0.20, [0.3, 0.3, 0.3])  # another dose: left out
    args = types.SimpleNamespace(out=str(tmp_path), alignment="anger", sets=[0],
                                 first_prompt=40, n_prompts=160)
    summary = _study()._summarise(args, [0]).set_index("decoding")
    assert sorted(summary.index) == ["greedy", "sampled"]
    assert summary.loc["sampled", "scale"] == pytest.approx(1.2)
    assert summary.loc["sampled", "best_caa"] == "caa_layer12 x2"
    assert summary.loc["sampled", "vs_caa"] == pytest.approx((0.1 + 0.0 - 0.04) / 3)
    assert summary.loc["sampled", "prompts"] == "prompts 40-199"
    with pytest.raises(SystemExit, match="no measured point"):
        _study()._summarise(types.SimpleNamespace(**{**vars(args), "sets": [1]}), [0])
    with pytest.raises(SystemExit, match="irm_seed1.*doses.json is missing"):
        _study()._summarise(args, [0, 1])
