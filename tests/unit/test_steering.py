"""Steering baselines (CAA, ActAdd, prompting), the warm start, and compare_steering."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import PROMPTS

import irm_lens
from irm_lens.compare import compare_steering
from irm_lens.errors import CheckpointError, ConfigError, ShapeMismatchError
from irm_lens.generation import generate_continuations
from irm_lens.steering import (
    Prompting,
    SteeringVector,
    actadd_vector,
    mean_difference_vector,
    warm_start,
)

ANGRY = ["I hate this so much!", "This is outrageous, stop it."]
CALM = ["The table has four legs.", "Water boils at one hundred degrees."]


def _resid(model, text: str, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(model.to_tokens(text))
    return cache["resid_post", layer][0]  # [pos, d_model]


def test_mean_difference_vector_matches_a_hand_computation(tiny_model):
    """Mean resid_post over every token but the first (the attention sink), text by text and
    unpadded, A minus B."""
    vector = mean_difference_vector(tiny_model, ANGRY, CALM, layers=[1, 3], scale=2.5)

    def mean(texts, layer):
        rows = torch.cat([_resid(tiny_model, t, layer)[1:] for t in texts])
        return rows.mean(0)

    for i, layer in enumerate((1, 3)):
        expected = mean(ANGRY, layer) - mean(CALM, layer)
        torch.testing.assert_close(vector.vectors[i], expected, atol=1e-5, rtol=1e-4)
    assert vector.config.layers == (1, 3) and vector.config.scale == 2.5
    # layer 1 alone (the blocks after it are not run): the same vector, to the bit
    assert torch.equal(mean_difference_vector(tiny_model, ANGRY, CALM, layers=1).vectors[0],
                       vector.vectors[0])


def test_apply_adds_scale_times_the_vector_where_asked_and_removes_its_hooks(tiny_model):
    vector = SteeringVector(
        irm_lens.steering.SteeringVectorConfig(d_model=64, n_layers=4, layers=(2,), scale=3.0),
        torch.randn(1, 64),
    )
    text = "Hello there, friend!"
    before = _resid(tiny_model, text, 2)
    with vector.apply(tiny_model, scale=0.5):
        after = _resid(tiny_model, text, 2)
    torch.testing.assert_close(after - before, (1.5 * vector.vectors[0]).expand_as(before),
                               atol=1e-5, rtol=1e-5)
    with vector.apply(tiny_model, positions="generated"):
        last_only = _resid(tiny_model, text, 2)
    torch.testing.assert_close(last_only[:-1], before[:-1])
    torch.testing.assert_close(last_only[-1] - before[-1], 3.0 * vector.vectors[0], atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), vector.apply(tiny_model):
        raise RuntimeError("boom")
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
    torch.testing.assert_close(_resid(tiny_model, text, 2), before)


def test_actadd_is_the_mean_difference_of_its_two_prompts(tiny_model):
    actadd = actadd_vector(tiny_model, "I am furious", "I am calm", layers=1)
    caa = mean_difference_vector(tiny_model, ["I am furious"], ["I am calm"], layers=1)
    torch.testing.assert_close(actadd.vectors, caa.vectors)
    assert actadd.config.method == "actadd" and "furious" in actadd.config.description


def test_vector_round_trips_and_refuses_what_is_not_one(tiny_model, tmp_path):
    vector = mean_difference_vector(tiny_model, ANGRY, CALM, layers="1-2", scale=4.0,
                                    positions="generated")
    path = vector.save(tmp_path / "v.safetensors")
    again = SteeringVector.load(path, tiny_model)
    assert again.config == vector.config and torch.equal(again.vectors, vector.vectors)
    irm = irm_lens.IRM.for_model(tiny_model, layers=[0], preset="linear")
    irm.save(tmp_path / "irm.safetensors")
    with pytest.raises(CheckpointError, match="not an irm_lens steering vector"):
        SteeringVector.load(tmp_path / "irm.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError):
        SteeringVector.load(tmp_path / "torn.safetensors")
    with pytest.raises(ShapeMismatchError, match="vectors of shape"):
        SteeringVector(vector.config, torch.zeros(3, 64))
    with pytest.raises(ConfigError, match="positions"):
        mean_difference_vector(tiny_model, ANGRY, CALM, layers=1, positions="prompt")


def test_a_warm_started_zero_irm_is_the_vector(tiny_model):
    vector = mean_difference_vector(tiny_model, ANGRY, CALM, layers=[1, 3], scale=3.0)
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small", zero_init_output=True,
                                 output_scale=0.5)
    warm_start(irm, vector)
    ids = tiny_model.to_tokens(PROMPTS)
    with vector.apply(tiny_model):
        expected = tiny_model(ids)
    with irm_lens.inject(tiny_model, irm):
        got = tiny_model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="among the IRM's"):
        warm_start(irm_lens.IRM.for_model(tiny_model, layers=[0, 1], preset="linear"), vector)


def test_prompting_puts_the_persona_in_the_system_turn(chat_model):
    persona = Prompting("You are furious.")
    plain, = generate_continuations(chat_model, ["Hi?"], max_new_tokens=2)
    steered, = generate_continuations(chat_model, ["Hi?"], intervention=persona, max_new_tokens=2)
    decoded = chat_model.tokenizer.decode(list(steered.prompt_ids))
    assert "<system>You are furious.<user>Hi?<assistant>" in decoded
    assert "system" not in chat_model.tokenizer.decode(list(plain.prompt_ids))
    with pytest.raises(ConfigError, match="persona"):
        Prompting.persona("boredom")


def test_compare_steering_measures_every_point_against_one_unsteered_run(tiny_model, monkeypatch):
    ev = importlib.import_module("irm_lens.evaluate")
    calls = []
    real = ev.generate_continuations

    def counting(model, prompts, *, intervention=None, **kw):
        calls.append(type(intervention).__name__)
        return real(model, prompts, intervention=intervention, **kw)

    monkeypatch.setattr(ev, "generate_continuations", counting)
    vector = mean_difference_vector(tiny_model, ANGRY, CALM, layers=1)
    interventions = {"caa": vector, "persona": Prompting("Be angry.")}
    result = compare_steering(tiny_model, interventions, "anger", scales={"caa": [2.0, 8.0]},
                              prompts=PROMPTS, max_new_tokens=5, n_bootstrap=200,
                              progress=False)
    # unsteered once (greedy + sampled), then 2 scales of the vector and the persona once
    assert calls.count("NoneType") == 2 and calls.count("SteeringVector") == 4
    assert calls.count("Prompting") == 2
    assert list(zip(result.table.intervention, result.table.scale)) == [
        ("caa", 2.0), ("caa", 2.0), ("caa", 8.0), ("caa", 8.0), ("persona", 1.0), ("persona", 1.0)]
    # each row is exactly what evaluate measures for that intervention at that scale
    alone = irm_lens.evaluate(tiny_model, vector, "anger", PROMPTS, scale=8.0, max_new_tokens=5,
                              n_bootstrap=200, progress=False)
    row = result.table[(result.table.scale == 8.0)].set_index("decoding")
    for decoding, expected in alone.lift.set_index("decoding").iterrows():
        assert row.loc[decoding, "lift"] == pytest.approx(expected.lift)
        assert row.loc[decoding, "perplexity_ratio"] == pytest.approx(expected.perplexity_ratio)
        assert row.loc[decoding, "ci_low"] == pytest.approx(expected.ci_low)
    assert set(result.side_by_side("caa", 2.0).columns) == {"prompt", "unsteered", "caa"}
    # more interventions measured later against the same unsteered texts: the same rows
    calls.clear()
    unsteered = result.samples[result.samples.intervention == "unsteered"]
    later = compare_steering(tiny_model, {"caa": vector}, "anger", scales=[8.0], prompts=PROMPTS,
                             max_new_tokens=5, n_bootstrap=200, unsteered=unsteered,
                             progress=False)
    assert "NoneType" not in calls
    assert later.table.lift.tolist() == pytest.approx(row.lift.tolist())
    with pytest.raises(ConfigError, match="not of these prompts"):
        compare_steering(tiny_model, {"caa": vector}, "anger", prompts=PROMPTS[:2],
                         unsteered=unsteered, progress=False)
    with pytest.raises(ConfigError, match="unsteered"):
        compare_steering(tiny_model, {"unsteered": vector}, "anger", prompts=PROMPTS)
    # one decoding only (a scale chosen for it): only its texts are generated, and they are
    # the texts (and the lift) that decoding has in the measurement of both
    for decoding in ("greedy", "sampled"):
        calls.clear()
        one = compare_steering(tiny_model, {"caa": vector}, "anger", scales=[8.0],
                               prompts=PROMPTS, max_new_tokens=5, n_bootstrap=200,
                               unsteered=unsteered, decodings=(decoding,), progress=False)
        assert calls == ["SteeringVector"] and one.table.decoding.tolist() == [decoding]
        both = later.samples[(later.samples.intervention == "caa")
                             & (later.samples.decoding == decoding)]
        assert one.samples[one.samples.intervention == "caa"].text.tolist() == both.text.tolist()
        assert one.table.lift.iloc[0] == pytest.approx(row.loc[decoding, "lift"])
    with pytest.raises(ConfigError, match="decodings must be"):
        compare_steering(tiny_model, {"caa": vector}, "anger", prompts=PROMPTS,
                         unsteered=unsteered, decodings=("beam",), progress=False)
    # a scale per decoding (a dose each): each decoding generated once, at its own scale, with
    # the texts and lift it has in the measurement at that scale
    calls.clear()
    dosed = compare_steering(tiny_model, {"caa": vector}, "anger",
                             scales={"caa": {"greedy": 2.0, "sampled": 8.0}}, prompts=PROMPTS,
                             max_new_tokens=5, n_bootstrap=200, unsteered=unsteered,
                             progress=False)
    assert calls == ["SteeringVector", "SteeringVector"]
    assert list(zip(dosed.table.scale, dosed.table.decoding)) == [(2.0, "greedy"),
                                                                  (8.0, "sampled")]
    with pytest.raises(ConfigError, match="No greedy samples"):
        dosed.side_by_side("caa", 8.0)
    full = result.table.set_index(["intervention", "scale", "decoding"]).lift
    assert dosed.table.lift.tolist() == pytest.approx(
        [full["caa", 2.0, "greedy"], full["caa", 8.0, "sampled"]])
    calls.clear()
    same = compare_steering(tiny_model, {"caa": vector}, "anger",
                            scales={"caa": {"greedy": 8.0, "sampled": 8.0}}, prompts=PROMPTS,
                            max_new_tokens=5, n_bootstrap=200, unsteered=unsteered,
                            progress=False)
    assert calls == ["SteeringVector"] * 2 and same.table.lift.tolist() == pytest.approx(
        row.lift.tolist())  # one point, both decodings
    with pytest.raises(ConfigError, match="name decodings"):
        compare_steering(tiny_model, {"caa": vector}, "anger", scales={"caa": {"beam": 2.0}},
                         prompts=PROMPTS, unsteered=unsteered, progress=False)


def test_best_fluent_picks_the_largest_fluent_lift():
    import pandas as pd

    from irm_lens.compare import SteeringComparison
    from irm_lens.evaluate import DegenerationThresholds

    table = pd.DataFrame(dict(
        intervention=["a", "a", "a", "b"], scale=[1.0, 2.0, 4.0, 1.0],
        decoding=["greedy"] * 4, lift=[0.01, 0.05, 0.20, 0.02], fluent=[True, True, False, False],
    ))
    best = SteeringComparison("anger", table, pd.DataFrame(), (), DegenerationThresholds()
                              ).best_fluent()
    assert best[["intervention", "scale"]].values.tolist() == [["a", 2.0]]


def _steered(name: str, scores: list[list[float]], decoding: str = "sampled"):
    """Steered samples of ``name``: ``scores[p][k]`` the anger score of prompt p's k-th sample."""
    import pandas as pd

    return pd.DataFrame([dict(prompt=f"q{p}", sample=k, decoding=decoding, intervention=name,
                              scale=1.0, anger=score)
                         for p, row in enumerate(scores) for k, score in enumerate(row)])


def test_paired_difference_is_the_mean_per_prompt_difference_with_a_prompt_bootstrap():
    import numpy as np

    from irm_lens.compare import paired_difference

    first = _steered("irm", [[0.5, 0.3], [0.2, 0.2], [0.9, 0.7], [0.1, 0.3]])
    second = _steered("caa", [[0.1, 0.1], [0.4, 0.2], [0.2, 0.2], [0.2, 0.2]])
    # per prompt (mean over samples): 0.4 - 0.1, 0.2 - 0.3, 0.8 - 0.2, 0.2 - 0.2
    per_prompt = np.array([0.3, -0.1, 0.6, 0.0])
    # rows in another order pair by prompt all the same
    paired = paired_difference(first, second.iloc[::-1], "anger", n_bootstrap=4000, seed=1)
    assert paired.difference == pytest.approx(per_prompt.mean())
    assert paired.n_prompts == 4 and paired.decoding == "sampled"
    boots = np.random.default_rng(1).choice(per_prompt, size=(4000, 4)).mean(axis=1)
    assert (paired.ci_low, paired.ci_high) == pytest.approx(
        (np.percentile(boots, 2.5), np.percentile(boots, 97.5)))
    assert paired.ci_low < 0 < paired.ci_high and paired.reading == "level"
    assert paired_difference(first, first.assign(anger=first.anger - 0.05), "anger").reading \
        == "above"
    assert paired_difference(second, first, "anger").difference == pytest.approx(-0.2)


def test_paired_difference_refuses_samples_that_do_not_pair():
    from irm_lens.compare import paired_difference

    first = _steered("irm", [[0.5], [0.2], [0.9]])
    with pytest.raises(ConfigError, match="same prompts"):
        paired_difference(first, first.iloc[:2], "anger")
    with pytest.raises(ConfigError, match="one decoding"):
        paired_difference(first, _steered("caa", [[0.1], [0.1], [0.1]], "greedy"), "anger")
    with pytest.raises(ConfigError, match="same prompts"):  # a point read twice
        paired_difference(first, _steered("caa", [[0.1], [0.1], [0.1], [0.1]]).replace(
            {"prompt": {"q3": "q2"}}), "anger")


def test_head_to_head_picks_each_point_of_a_comparison():
    import pandas as pd

    from irm_lens.compare import SteeringComparison
    from irm_lens.evaluate import DegenerationThresholds

    samples = pd.concat([_steered("irm", [[0.5], [0.4]]), _steered("caa", [[0.1], [0.3]]),
                         _steered("caa", [[0.9], [0.9]]).assign(scale=4.0)])
    comparison = SteeringComparison("anger", pd.DataFrame(), samples, (),
                                    DegenerationThresholds())
    assert comparison.head_to_head(("irm", 1.0), ("caa", 1.0), "sampled").difference \
        == pytest.approx(0.25)
    assert comparison.head_to_head(("irm", 1.0), ("caa", 4.0), "sampled").reading == "below"
    with pytest.raises(ConfigError, match="No greedy samples of 'irm'"):
        comparison.head_to_head(("irm", 1.0), ("caa", 1.0), "greedy")
