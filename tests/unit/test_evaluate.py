"""evaluate(): degeneration measures by hand, and the whole evaluation on a tiny model."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pandas as pd
import pytest
import torch

from irm_lens import IRM
from irm_lens.errors import ConfigError
from irm_lens.evaluate import DegenerationThresholds, evaluate, measure
from irm_lens.scoring import SCORE_COLUMNS, distinct_n, identical_share, repetition_rate


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
    real_scores = ev.emotion_scores

    def planted_scores(texts):  # the angry string scores 0.9, everything else 0.1
        frame = real_scores(texts)
        frame["anger"] = [0.9 if "I hate this" in t else 0.1 for t in texts]
        return frame

    monkeypatch.setattr(ev, "emotion_scores", planted_scores)
    irm = IRM.for_model(tiny_model, layers=[0], preset="linear")
    result = evaluate(tiny_model, irm, "anger", PROMPTS, max_new_tokens=6, n_sampled=0,
                      n_bootstrap=200, progress=False)
    row = result.lift.iloc[0]
    assert row.lift == pytest.approx(0.8) and row.ci_low == pytest.approx(0.8)
    assert not row.fluent and result.degenerate and row.identical_increase == 1.0
    assert "FAILED: the lift comes with degenerate text" in result.verdict


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


def _planted_samples(lifts, *, repeat_on: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Samples with known per-prompt anger (off 0.1, on 0.1 + lift); texts all distinct, or
    the steered ones half repeated (``repeat_on``)."""
    n = len(lifts)

    def frame(anger, texts):
        return pd.DataFrame(dict(prompt=[f"q{i}" for i in range(n)], decoding="greedy", sample=0,
                                 text=texts, n_tokens=6, perplexity=2.0, repetition=0.0,
                                 **{c: 0.0 for c in SCORE_COLUMNS if c != "anger"}, anger=anger))

    words = [f"w{i}a w{i}b w{i}c w{i}d" for i in range(n)]
    steered = [f"w{i % (n // 2)}a w{i % (n // 2)}b x{i}" for i in range(n)] if repeat_on \
        else [f"v{i}a v{i}b v{i}c v{i}d" for i in range(n)]
    return (frame([0.1] * n, words).assign(irm="off"),
            frame([0.1 + d for d in lifts], steered).assign(irm="on"))


def test_lift_and_ci_against_a_planted_effect():
    rng = np.random.default_rng(1)
    lifts = rng.normal(0.05, 0.02, size=160)
    off, on = _planted_samples(lifts)
    row = measure(off, on, "anger", n_bootstrap=4000).lift.iloc[0]
    assert row.lift == pytest.approx(lifts.mean())
    half_width = 1.96 * lifts.std(ddof=1) / np.sqrt(len(lifts))  # normal theory: ~0.003
    assert row.ci_low == pytest.approx(lifts.mean() - half_width, abs=0.15 * half_width)
    assert row.ci_high == pytest.approx(lifts.mean() + half_width, abs=0.15 * half_width)
    none = measure(*_planted_samples(rng.normal(0.0, 0.02, size=160)), "anger").lift.iloc[0]
    assert none.ci_low < 0 < none.ci_high


def test_thresholds_decide_the_verdict():
    off, on = _planted_samples(np.full(40, 0.05), repeat_on=True)
    strict = measure(off, on, "anger")
    ratio = strict.lift.iloc[0].distinct2_ratio
    assert 0.5 < ratio < 0.8  # the steered texts share half their bigrams
    assert not strict.lift.iloc[0].fluent and "aligned" not in strict.verdict
    lenient = measure(off, on, "anger", thresholds=DegenerationThresholds(min_distinct2_ratio=0.5))
    assert lenient.lift.iloc[0].fluent and "greedy: anger lift +0.050" in lenient.verdict
    assert "aligned" in lenient.verdict
