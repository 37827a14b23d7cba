"""evaluate(): degeneration measures by hand, and the whole evaluation on a tiny model."""

from __future__ import annotations

import dataclasses
import importlib

import pandas as pd
import pytest
import torch

from irm_lens import IRM
from irm_lens.errors import ConfigError
from irm_lens.evaluate import DegenerationThresholds, evaluate
from irm_lens.scoring import distinct_n, identical_share, repetition_rate


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> {a, b, c} / 6; bigrams: ab ba ab ac -> {ab, ba, ac} / 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0


def test_repetition_rate_by_hand():
    assert repetition_rate("x y z x y z x y z") == pytest.approx(4 / 7)
    assert repetition_rate("all different words here") == 0.0
    assert repetition_rate("short") == 0.0


def test_identical_share_by_hand():
    assert identical_share(["a", "b", "a ", "c"]) == 0.5
    assert identical_share(["a", "b"]) == 0.0
    assert identical_share([]) == 0.0


PROMPTS = ["Tell me a fact.", "Say something.", "Name a colour.", "Describe a chair."]


def test_evaluate_on_a_tiny_model(tiny_model):
    torch.manual_seed(0)
    irm = IRM.for_model(tiny_model, layers="all", preset="small", output_scale=3.0)
    result = evaluate(tiny_model, irm, "anger", PROMPTS, max_new_tokens=6, n_sampled=2,
                      n_bootstrap=200, progress=False)
    samples = result.samples
    assert len(samples) == len(PROMPTS) * 3 * 2  # (greedy + 2 sampled) x (off, on)
    assert set(samples.decoding) == {"greedy", "sampled"} and set(samples.irm) == {"off", "on"}
    assert {"anger", "joy", "valence", "perplexity", "repetition"} <= set(samples.columns)
    assert (samples.perplexity.dropna() > 1).all()
    assert list(result.lift.decoding) == ["greedy", "sampled"]
    row = result.lift.iloc[0]
    assert row.ci_low <= row.lift <= row.ci_high
    greedy = samples[samples.decoding == "greedy"]
    by_hand = (greedy[greedy.irm == "on"].set_index("prompt").anger
               - greedy[greedy.irm == "off"].set_index("prompt").anger).mean()
    assert row.lift == pytest.approx(by_hand)
    assert isinstance(result.side_by_side(), pd.DataFrame) and len(result.side_by_side()) == 4
    assert "greedy: anger" in result.verdict


def test_degenerate_lift_is_called_a_failure(tiny_model, monkeypatch):
    """A steered model that says one angry string for every prompt must fail the verdict."""
    ev = importlib.import_module("irm_lens.evaluate")  # the attribute is the function

    real = ev.generate_continuations

    def fake(model, prompts, *, intervention=None, **kw):
        out = real(model, prompts, intervention=intervention, **kw)
        if intervention is None:
            return out
        return [dataclasses.replace(c, text="I hate this, I hate this, I hate this!") for c in out]

    monkeypatch.setattr(ev, "generate_continuations", fake)
    irm = IRM.for_model(tiny_model, layers=[0], preset="linear")
    result = evaluate(tiny_model, irm, "anger", PROMPTS, max_new_tokens=6, n_sampled=0,
                      n_bootstrap=200, progress=False)
    row = result.lift.iloc[0]
    assert row.lift > 0 and not row.fluent and result.degenerate
    assert row.identical_increase == 1.0
    assert ("FAILED" if row.ci_low > 0 else "no measurable lift") in result.verdict
    assert "aligned" not in result.verdict


def test_first_prompt_starts_further_into_the_held_out_prompts(tiny_model):
    from irm_lens.data.corpora import neutral_prompts

    irm = IRM.for_model(tiny_model, layers=[0], preset="linear")
    result = evaluate(tiny_model, irm, "anger", n_prompts=2, first_prompt=3, max_new_tokens=2,
                      n_sampled=0, n_bootstrap=50, progress=False)
    assert list(dict.fromkeys(result.samples.prompt)) == neutral_prompts(5)[3:]
    with pytest.raises(ConfigError, match="cannot go with prompts"):
        evaluate(tiny_model, irm, "anger", PROMPTS, first_prompt=1)
    with pytest.raises(ConfigError, match="first_prompt must be a non-negative integer"):
        evaluate(tiny_model, irm, "anger", first_prompt=-1)


def test_unknown_alignment(tiny_model):
    with pytest.raises(ConfigError, match="Cannot measure alignment"):
        evaluate(tiny_model, IRM.for_model(tiny_model, layers=[0]), "rage", PROMPTS)


def test_thresholds_are_configurable():
    assert DegenerationThresholds(min_distinct2_ratio=0.5).min_distinct2_ratio == 0.5
