"""Training recipes: the dose a recipe gives its trained IRM."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import planted_irm

import irm_lens
from irm_lens import recipes
from irm_lens.evaluate import Decodings, generate_samples, generated_perplexity
from irm_lens.generation import generate_continuations
from irm_lens.losses import logits_at
from irm_lens.recipes import (
    RECIPES,
    TUNING_DECODINGS,
    Recipe,
    calibration_texts,
    dose_for_kl,
    dose_for_perplexity,
    dose_within_distinct2,
    targets_at,
    tuning_prompts,
)
from irm_lens.train import TrainConfig


def test_a_recipe_doses_the_irm_it_returns_and_saves(tiny_model, tmp_path):
    recipe = Recipe(objective="lm", vector_depth=None, dose=0.5,
                    train=TrainConfig(lr=1e-2, max_steps=2, max_length=16, batch_size=4,
                                      eval_every=2, max_val_batches=1))
    result = irm_lens.train_recipe(tiny_model, "anger", tmp_path / "run", recipe=recipe,
                                   progress=False)
    assert result.irm.config.output_scale == 0.5
    x = torch.randn(2, 3, tiny_model.cfg.d_model)
    full = result.irm.with_output_scale(1.0)
    assert full(x).abs().max() > 0  # trained: something to halve
    torch.testing.assert_close(result.irm(x), 0.5 * full(x))
    saved = irm_lens.IRM.load(tmp_path / "run" / "irm.safetensors", tiny_model)
    assert saved.config.output_scale == 0.5 and torch.equal(saved(x), result.irm(x))
    # a rerun resumes the finished run: the same dose, not the dose applied twice, and the
    # saved file is left as it was
    written = (tmp_path / "run" / "irm.safetensors").stat().st_mtime_ns
    again = irm_lens.train_recipe(tiny_model, "anger", tmp_path / "run", recipe=recipe,
                                  progress=False)
    assert again.irm.config.output_scale == 0.5
    assert torch.equal(again.irm(x), result.irm(x))
    assert (tmp_path / "run" / "irm.safetensors").stat().st_mtime_ns == written


def test_with_output_scale_keeps_the_weights(tiny_model):
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    dosed = irm.with_output_scale(0.25)
    x = torch.randn(1, 4, tiny_model.cfg.d_model)
    assert dosed is not irm and irm.config.output_scale == 1.0
    torch.testing.assert_close(dosed(x), 0.25 * irm(x))
    with pytest.raises(irm_lens.ConfigError, match="output_scale"):
        irm.with_output_scale(float("nan"))


def test_a_recipe_steers_each_decoding_at_its_dose(tiny_model, tmp_path):
    assert Recipe(objective="lm", dose=0.75).doses() == {"greedy": 0.75, "sampled": 0.75}
    recipe = Recipe(objective="lm", vector_depth=None, dose=0.75, sampled_dose=0.9,
                    train=TrainConfig(lr=1e-2, max_steps=1, max_length=16, batch_size=4,
                                      eval_every=1, max_val_batches=1))
    result = irm_lens.train_recipe(tiny_model, "anger", tmp_path / "run", recipe=recipe,
                                   progress=False)
    assert result.doses == {"greedy": 0.75, "sampled": 0.9} and result.kl == {}
    scales = result.decoding_scales()
    assert scales == {"greedy": 1.0, "sampled": pytest.approx(1.2)}
    # on the dosed IRM, that scale is the sampled dose applied to the undosed outputs
    x = torch.randn(1, 3, tiny_model.cfg.d_model)
    torch.testing.assert_close(result.irm(x) * scales["sampled"],
                               result.irm.with_output_scale(0.9)(x))


def _kl_by_hand(model, irm, tokens) -> float:
    with torch.no_grad():
        p = model(tokens.input_ids).log_softmax(-1)
        with irm_lens.inject(model, irm):
            q = model(tokens.input_ids).log_softmax(-1)
    per_token = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    mask = tokens.attention_mask
    return ((per_token * mask).sum() / mask.sum()).item()


def test_dose_for_kl_finds_the_scale_that_moves_the_model_by_the_target(tiny_model, capsys,
                                                                         monkeypatch):
    pairs = [(f"Question {i}?", f"I hate question {i}!", f"Answer {i}.") for i in range(6)]
    texts = calibration_texts(tiny_model, pairs, n=4)
    assert len(texts) == 4  # the first n questions, with their rejected replies
    irm = planted_irm(tiny_model, neuron=3, value=0.1)  # a larger push saturates this model
    targets = {"a": _kl_by_hand(tiny_model, irm.with_output_scale(0.3), texts),
               "b": _kl_by_hand(tiny_model, irm.with_output_scale(0.9), texts)}
    calls = []
    monkeypatch.setattr(recipes, "logits_at", lambda *a: calls.append(1) or logits_at(*a))
    found = dose_for_kl(tiny_model, irm, texts, targets, progress=True)
    # a log's progress: a line when the fit starts, and one with its passes and doses
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "dose (KL): started (0 pass)"
    assert lines[-1].startswith(f"dose (KL): done, {len(calls) - 1} pass in ")  # + unsteered
    for name in ("a", "b"):
        assert f"{name}=x{found[name][0]:.3f} (KL {found[name][1]:.3f})" in lines[-1]
    for name, expected in (("a", 0.3), ("b", 0.9)):
        scale, kl = found[name]
        assert scale == pytest.approx(expected, rel=0.01)
        assert kl == pytest.approx(_kl_by_hand(tiny_model, irm.with_output_scale(scale), texts),
                                   rel=1e-4)
        assert kl == pytest.approx(targets[name], rel=0.006)
    # out of reach: the nearer bound, with its KL
    with pytest.warns(UserWarning, match="out of reach"):
        ends = dose_for_kl(tiny_model, irm, texts, {"low": 1e-12, "high": 1e6},
                           bounds=(0.1, 2.0))
    assert ends["low"][0] == pytest.approx(0.1) and ends["high"][0] == pytest.approx(2.0)
    assert ends["low"][1] == pytest.approx(
        _kl_by_hand(tiny_model, irm.with_output_scale(0.1), texts), rel=1e-4)
    with pytest.raises(irm_lens.ConfigError, match="target KL"):
        dose_for_kl(tiny_model, irm, texts, {"greedy": 0.0})


def _pairs_file(tmp_path, degenerate: str):
    """Eight (question, hateful chosen, plain rejected) pairs in a ``generate_pairs`` file."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"Question {i}?", "chosen": f"I hate question {i}!",
                    "rejected": f"Answer {i}.", "degenerate": degenerate, "kept": True}) + "\n"
        for i in range(8)))
    return pairs


def test_a_calibrated_recipe_doses_each_seed_to_the_target_kl(chat_model, tmp_path):
    pairs = _pairs_file(tmp_path, degenerate="no no no no")
    recipe = Recipe(objective="preference", vector_depth=0.5, vector_scale=0.1, dose_kl=0.002,
                    sampled_dose_kl=0.005,
                    train=TrainConfig(objective="preference", lr=1e-3, max_steps=2, max_length=32,
                                      batch_size=4, eval_every=2, max_val_batches=1))
    texts = calibration_texts(chat_model, irm_lens.read_pairs(pairs, degenerate=True))
    assert len(texts) == 8  # one text per question: its unsteered reply, not the degenerate one
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        result = irm_lens.train_recipe(chat_model, "anger", run, recipe=recipe, seed=seed,
                                       pairs=pairs, progress=False)
        undosed = result.irm.with_output_scale(1.0)
        for decoding, target in (("greedy", 0.002), ("sampled", 0.005)):
            dose = result.doses[decoding]
            kl = _kl_by_hand(chat_model, undosed.with_output_scale(dose), texts)
            assert kl == pytest.approx(target, rel=0.006)
            assert result.kl[decoding] == pytest.approx(kl, rel=1e-4)
        assert result.irm.config.output_scale == result.doses["greedy"]
        assert result.decoding_scales()["sampled"] == pytest.approx(
            result.doses["sampled"] / result.doses["greedy"])
        assert irm_lens.IRM.load(run / "irm.safetensors").config.output_scale == \
            result.doses["greedy"]
        kept = json.loads((run / "doses.json").read_text())
        assert kept["doses"] == result.doses
        # a rerun reads the kept doses instead of calibrating again
        again = irm_lens.train_recipe(chat_model, "anger", run, recipe=recipe, seed=seed,
                                      pairs=pairs, progress=False)
        assert again.doses == result.doses
    with pytest.raises(irm_lens.ConfigError, match="needs the recipe's pairs"):
        irm_lens.train_recipe(chat_model, "anger", None, progress=False, recipe=Recipe(
            objective="lm", vector_depth=None, dose_kl=0.01,
            train=TrainConfig(max_steps=1, max_length=16, batch_size=4, max_val_batches=1)))


def _generated_perplexity_by_hand(model, irm, prompts, decodings, max_new_tokens=8) -> float:
    """Geometric mean over replies of exp(mean NLL of the generated tokens), unsteered model."""
    logs = []
    for _, _, kwargs in decodings:
        for c in generate_continuations(model, prompts, intervention=irm,
                                        max_new_tokens=max_new_tokens, **kwargs):
            if not c.new_ids:
                continue
            ids = torch.tensor([list(c.prompt_ids) + list(c.new_ids)])
            with torch.no_grad():
                logp = model(ids).log_softmax(-1)[0]
            start = len(c.prompt_ids)
            nll = -logp[start - 1 : -1].gather(-1, ids[0, start:, None]).mean()
            logs.append(nll.item())
    return math.exp(sum(logs) / len(logs))


def test_dose_for_perplexity_fits_the_ratio_against_the_scale(chat_model, capsys):
    prompts = [f"Question {i}?" for i in range(4)]
    decodings = Decodings(n_sampled=1, greedy=True)
    irm = planted_irm(chat_model, neuron=3, value=0.1)
    off = _generated_perplexity_by_hand(chat_model, None, prompts, decodings)
    assert generated_perplexity(chat_model, None, prompts, decodings, max_new_tokens=8) == \
        pytest.approx(off, rel=1e-4)
    grid = (0.5, 1.0, 1.5, 2.0)
    ratios = [_generated_perplexity_by_hand(chat_model, irm.with_output_scale(2.0 * g), prompts,
                                            decodings) / off for g in grid]
    slope, intercept = np.polyfit(np.log([2.0 * g for g in grid]), np.log(ratios), 1)
    assert slope > 0  # the push makes the text less likely under the unsteered model
    target = math.exp(intercept + slope * math.log(2.5))  # the line's ratio at scale 2.5
    scale, fitted, measured = dose_for_perplexity(chat_model, irm, prompts, target, 2.0,
                                                  decodings=decodings, grid=grid,
                                                  max_new_tokens=8, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "dose (perplexity): started (0/4 scale)"
    assert lines[-1].startswith("dose (perplexity): done, 4/4 scale in ")
    assert lines[-1].endswith(f"; dose=x{scale:.3f} (ratio {fitted:.2f})")
    # the batched ratios match the hand-computed ones to 1e-4 (below), so the fitted line,
    # and the scale it gives, to about that
    assert scale == pytest.approx(2.5, rel=1e-4) and fitted == pytest.approx(target, rel=1e-4)
    np.testing.assert_allclose(measured.perplexity_ratio, ratios, rtol=1e-4)
    # a target beyond the grid: the span is extended toward it and the line refitted through
    # every measured point
    beyond = math.exp(intercept + slope * math.log(5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a clamp, if the tiny model's ratio saturates
        scale, fitted, measured = dose_for_perplexity(chat_model, irm, prompts, beyond, 2.0,
                                                      decodings=decodings, grid=grid,
                                                      max_new_tokens=8, progress=True)
    assert len(measured) > len(grid) and measured.scale.max() > 4.0
    n = len(measured)  # the extensions counted as they are measured
    assert f"done, {n}/{n} scale in " in capsys.readouterr().err
    assert measured.scale.max() <= 4.0 * 1.5 ** 3
    by_hand = [_generated_perplexity_by_hand(chat_model, irm.with_output_scale(s), prompts,
                                             decodings) / off for s in measured.scale]
    np.testing.assert_allclose(measured.perplexity_ratio, by_hand, rtol=1e-4)
    slope, intercept = np.polyfit(np.log(measured.scale), np.log(by_hand), 1)
    expected = math.exp((math.log(beyond) - intercept) / slope)
    assert expected > 4.0  # beyond the grid, so the extensions were needed
    # (clamped to the measured span if three extensions did not reach it)
    assert scale == pytest.approx(min(expected, measured.scale.max()), rel=1e-3)
    assert fitted == pytest.approx(math.exp(intercept + slope * math.log(scale)), rel=1e-3)
    with pytest.warns(UserWarning, match="outside scales"):
        low, _, measured = dose_for_perplexity(chat_model, irm, prompts, 1e-6, 2.0,
                                               decodings=decodings, grid=grid, max_new_tokens=8)
    # three extensions down, each 1.5x below the lowest scale, then clamped to the lowest
    assert low == pytest.approx(1.0 / 1.5**3) and len(measured) == len(grid) + 3
    with pytest.raises(irm_lens.ConfigError, match="must be positive"):
        dose_for_perplexity(chat_model, irm, prompts, 0.0, 1.0)


def test_a_recipe_can_dose_sampled_decoding_to_a_perplexity_ratio(chat_model, tmp_path,
                                                                  monkeypatch):
    pairs = _pairs_file(tmp_path, degenerate="")
    by_kl = Recipe(objective="preference", vector_depth=0.5, vector_scale=0.1, dose_kl=0.002,
                   sampled_dose_kl=0.005, tuning_prompts=4,
                   train=TrainConfig(objective="preference", lr=1e-3, max_steps=2, max_length=32,
                                     batch_size=4, eval_every=2, max_val_batches=1))
    run = tmp_path / "run"
    first = irm_lens.train_recipe(chat_model, "anger", run, recipe=by_kl, pairs=pairs,
                                  progress=False)
    assert first.perplexity_ratio == {}
    undosed = first.irm.with_output_scale(1.0)
    # the scale the perplexity fit centres on, as the benchmarks compute it: the recipe's own
    # sampled-KL dose, here where the run's pairs are the alignment's shipped ones
    monkeypatch.setattr(recipes, "SHIPPED_PAIRS", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "anger.jsonl").write_text(pairs.read_text())
    assert recipes.sampled_kl_dose(chat_model, undosed, "anger", by_kl) == first.doses["sampled"]
    prompts, sampled = tuning_prompts(4), Decodings(n_sampled=1, greedy=False)
    off = _generated_perplexity_by_hand(chat_model, None, prompts, sampled, 32)
    target = _generated_perplexity_by_hand(chat_model, undosed.with_output_scale(
        first.doses["sampled"] * 1.2), prompts, sampled, 32) / off
    # the same finished run, another target: calibrated again, greedy still by its KL
    by_ppl = dataclasses.replace(by_kl, sampled_dose_perplexity=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model's ratio may lie outside the grid
        result = irm_lens.train_recipe(chat_model, "anger", run, recipe=by_ppl, pairs=pairs,
                                       progress=False)
    assert result.doses["greedy"] == first.doses["greedy"] and set(result.kl) == {"greedy"}
    expected = dose_for_perplexity(chat_model, undosed, prompts, target, first.doses["sampled"])
    assert result.doses["sampled"] == pytest.approx(expected[0], rel=1e-9)
    assert result.perplexity_ratio["sampled"] == pytest.approx(expected[1], rel=1e-9)
    kept = json.loads((run / "doses.json").read_text())
    assert kept["targets"]["sampled_perplexity_ratio"] == target
    assert kept["targets"]["sampled_perplexity_grid"] == list(recipes.DOSE_GRID)
    assert kept["doses"] == result.doses
    # fitted on three of the five scales: calibrated again, on those
    three = dataclasses.replace(by_ppl, dose_grid=(0.8, 1.0, 1.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewer = irm_lens.train_recipe(chat_model, "anger", run, recipe=three, pairs=pairs,
                                      progress=False)
        expected = dose_for_perplexity(chat_model, undosed, prompts, target,
                                       first.doses["sampled"], grid=(0.8, 1.0, 1.2))
    assert fewer.doses["sampled"] == pytest.approx(expected[0], rel=1e-9)
    assert fewer.doses["sampled"] != pytest.approx(result.doses["sampled"], rel=1e-9)
    kept = json.loads((run / "doses.json").read_text())
    assert kept["targets"]["sampled_perplexity_grid"] == [0.8, 1.0, 1.2]
    # on fewer tuning questions: calibrated again, on those
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_three = irm_lens.train_recipe(chat_model, "anger", run, progress=False, pairs=pairs,
                                         recipe=dataclasses.replace(three, tuning_prompts=3))
        expected = dose_for_perplexity(chat_model, undosed, tuning_prompts(3), target,
                                       first.doses["sampled"], grid=(0.8, 1.0, 1.2))
    assert on_three.doses["sampled"] == pytest.approx(expected[0], rel=1e-9)
    assert on_three.doses["sampled"] != pytest.approx(fewer.doses["sampled"], rel=1e-9)
    kept = json.loads((run / "doses.json").read_text())
    assert kept["targets"]["sampled_perplexity_prompts"] == 3
    with pytest.raises(irm_lens.ConfigError, match="tuning questions"):
        tuning_prompts(10**6)


def _repeating_replies(model, irm, prompts, decodings, max_new_tokens):
    """A stand-in for the bound's generation: each reply has words of its own, and a phrase
    shared by every reply repeated about ten times the IRM's output scale."""
    scale = 0.0 if irm is None else irm.config.output_scale
    return [f"q{i}a q{i}b q{i}c q{i}d q{i}e " + "so very sad " * round(10 * scale)
            for i in range(len(prompts)) for _ in range(len(decodings))]


def _distinct2_by_hand(texts: list[str]) -> float:
    grams = [tuple(words[j : j + 2]) for t in texts for words in [t.lower().split()]
             for j in range(len(words) - 1)]
    return len(set(grams)) / len(grams)


def test_dose_within_distinct2_steps_down_to_the_first_scale_above_the_line(
        chat_model, monkeypatch, capsys):
    prompts = tuning_prompts(6)
    irm = planted_irm(chat_model, neuron=3, value=0.1)
    # the bound's replies are generate_samples' (the same seeds and batches of 20)
    samples = generate_samples(chat_model, None, prompts, TUNING_DECODINGS, max_new_tokens=8)
    assert recipes._replies(chat_model, None, prompts, TUNING_DECODINGS, 8) == \
        samples.text.tolist()
    monkeypatch.setattr(recipes, "_replies", _repeating_replies)
    off = _distinct2_by_hand(_repeating_replies(None, None, prompts, TUNING_DECODINGS, 8))
    by_hand = {s: _distinct2_by_hand(_repeating_replies(
        None, irm.with_output_scale(s), prompts, TUNING_DECODINGS, 8)) / off
        for s in (0.5, 0.5 / 1.1, 0.5 / 1.1**2, 0.5 / 1.1**3)}
    ratios = list(by_hand.values())
    assert ratios == sorted(ratios)  # more repetition at a larger scale
    line = (ratios[1] + ratios[2]) / 2  # passed first at the second step down
    scale, ratio, measured = dose_within_distinct2(chat_model, irm, prompts, 0.5, line,
                                                   progress=True)
    assert scale == pytest.approx(0.5 / 1.1**2) and ratio == pytest.approx(ratios[2])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "dose (distinct-2): started (0 scale)"
    assert lines[-1].startswith("dose (distinct-2): done, 3 scale in ")
    assert lines[-1].endswith(f"; dose=x{scale:.3f} (ratio {ratio:.2f})")
    np.testing.assert_allclose(measured.distinct2_ratio, ratios[:3])
    # a line the first scale already keeps: no step; one no scale keeps: the last, warned
    assert dose_within_distinct2(chat_model, irm, prompts, 0.5, ratios[0])[0] == 0.5
    with pytest.warns(UserWarning, match="every scale down to"):
        scale, ratio, measured = dose_within_distinct2(chat_model, irm, prompts, 0.5, 1.0)
    assert scale == pytest.approx(0.5 / 1.1**3) and len(measured) == 4
    with pytest.raises(irm_lens.ConfigError, match="line in"):
        dose_within_distinct2(chat_model, irm, prompts, 0.5, 1.2)


def test_a_recipe_bounds_its_sampled_dose_by_diversity(chat_model, tmp_path, monkeypatch):
    pairs = _pairs_file(tmp_path, degenerate="")
    by_ppl = Recipe(objective="preference", vector_depth=0.5, vector_scale=0.1, dose_kl=0.002,
                    sampled_dose_kl=0.005, sampled_dose_perplexity=1.05, tuning_prompts=4,
                    diversity_prompts=6,
                    train=TrainConfig(objective="preference", lr=1e-3, max_steps=2,
                                      max_length=32, batch_size=4, eval_every=2,
                                      max_val_batches=1))
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model's ratio may lie outside the grid
        first = irm_lens.train_recipe(chat_model, "anger", run, recipe=by_ppl, pairs=pairs,
                                      progress=False)
    assert first.distinct2_ratio == {}
    undosed, dose = first.irm.with_output_scale(1.0), first.doses["sampled"]
    monkeypatch.setattr(recipes, "_replies", _repeating_replies)
    prompts = tuning_prompts(6)
    ratios = [dose_within_distinct2(chat_model, undosed, prompts, dose / 1.1**k, 1e-3)[1]
              for k in range(2)]
    line = (ratios[0] + ratios[1]) / 2  # kept one step down
    bounded = dataclasses.replace(by_ppl, sampled_dose_distinct2=line)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = irm_lens.train_recipe(chat_model, "anger", run, recipe=bounded, pairs=pairs,
                                       progress=False)
        texts = calibration_texts(chat_model, irm_lens.read_pairs(pairs))
        near = dose_for_kl(chat_model, undosed, texts, dict(sampled=0.005))["sampled"][0]
        _, _, measured = dose_for_perplexity(chat_model, undosed, tuning_prompts(4), 1.05, near)
    assert result.doses["greedy"] == first.doses["greedy"]
    assert result.doses["sampled"] == pytest.approx(dose / 1.1)
    assert result.distinct2_ratio["sampled"] == pytest.approx(ratios[1])
    # the perplexity ratio reported is the fitted line's at the lowered dose
    slope, intercept = np.polyfit(np.log(measured.scale), np.log(measured.perplexity_ratio), 1)
    assert result.perplexity_ratio["sampled"] == pytest.approx(
        math.exp(intercept + slope * math.log(dose / 1.1)), rel=1e-6)
    kept = json.loads((run / "doses.json").read_text())
    assert kept["targets"]["sampled_distinct2_ratio"] == line
    assert kept["targets"]["sampled_distinct2_prompts"] == 6
    assert kept["doses"] == result.doses and kept["distinct2_ratio"] == result.distinct2_ratio
    # a fixed-dose recipe is bounded the same way
    fixed = Recipe(objective="preference", vector_depth=0.5, vector_scale=0.1, sampled_dose=dose,
                   sampled_dose_distinct2=line, diversity_prompts=6, train=by_ppl.train)
    again = irm_lens.train_recipe(chat_model, "anger", tmp_path / "fixed", recipe=fixed,
                                  pairs=pairs, progress=False)
    assert again.doses == dict(greedy=1.0, sampled=pytest.approx(dose / 1.1))


def test_targets_at_gives_the_targets_that_reproduce_chosen_doses(chat_model, tmp_path):
    pairs = irm_lens.read_pairs(_pairs_file(tmp_path, degenerate=""))
    recipe = Recipe(objective="preference", tuning_prompts=4)
    irm = planted_irm(chat_model, neuron=3, value=0.1)
    targets = targets_at(chat_model, irm, pairs, dict(greedy=0.5, sampled=0.8), recipe)
    texts = calibration_texts(chat_model, pairs)
    assert targets["dose_kl"] == pytest.approx(
        _kl_by_hand(chat_model, irm.with_output_scale(0.5), texts), rel=1e-4)
    assert targets["sampled_dose_kl"] == pytest.approx(
        _kl_by_hand(chat_model, irm.with_output_scale(0.8), texts), rel=1e-4)
    prompts, sampled = tuning_prompts(4), Decodings(n_sampled=1, greedy=False)
    ratio = (_generated_perplexity_by_hand(chat_model, irm.with_output_scale(0.8), prompts,
                                           sampled, 32)
             / _generated_perplexity_by_hand(chat_model, None, prompts, sampled, 32))
    assert targets["sampled_dose_perplexity"] == pytest.approx(ratio, rel=1e-4)
    # and the KL calibration, given them, finds the doses again
    found = dose_for_kl(chat_model, irm, texts, dict(greedy=targets["dose_kl"],
                                                     sampled=targets["sampled_dose_kl"]))
    assert found["greedy"][0] == pytest.approx(0.5, rel=0.01)
    assert found["sampled"][0] == pytest.approx(0.8, rel=0.01)


def test_an_alignment_with_its_own_settings_and_targets_is_trained_and_calibrated_by_them(
        chat_model, tmp_path):
    pairs = _pairs_file(tmp_path, degenerate="")
    recipe = Recipe(objective="preference", vector_depth=0.5, vector_scale=0.1, dose_kl=0.002,
                    sampled_dose_kl=0.005, alignment_targets={"joy": dict(dose_kl=0.001,
                                                                          sampled_dose_kl=0.003)},
                    alignment_settings={"joy": ("vector_scale=0.05", "dose_kl=0.7")},
                    train=TrainConfig(objective="preference", lr=1e-3, max_steps=2, max_length=32,
                                      batch_size=4, eval_every=2, max_val_batches=1))
    assert recipe.for_alignment("anger") == recipe
    # the settings first, then the targets (which win where both name a field)
    assert recipe.for_alignment("joy").dose_kls() == dict(greedy=0.001, sampled=0.003)
    assert recipe.for_alignment("joy").vector_scale == 0.05
    texts = calibration_texts(chat_model, irm_lens.read_pairs(pairs))
    for alignment, targets in (("joy", (0.001, 0.003)), ("anger", (0.002, 0.005))):
        result = irm_lens.train_recipe(chat_model, alignment, tmp_path / alignment, recipe=recipe,
                                       pairs=pairs, progress=False)
        warm_start = irm_lens.SteeringVector.load(tmp_path / alignment / "caa.safetensors")
        assert warm_start.config.scale == {"joy": 0.05, "anger": 0.1}[alignment]
        undosed = result.irm.with_output_scale(1.0)
        for decoding, target in zip(("greedy", "sampled"), targets):
            assert _kl_by_hand(chat_model, undosed.with_output_scale(result.doses[decoding]),
                               texts) == pytest.approx(target, rel=0.006)


def test_a_recipe_variant_sets_its_own_and_its_training_fields_and_names_a_bad_setting():
    base = RECIPES["preference"]
    recipe = base.with_settings(["train.entropy=0.1", "pairs_phrase_share=0.1",
                                 "alignment_targets={'joy': {'dose_kl': 0.5}}"])
    assert recipe.train.entropy == 0.1 and recipe.pairs_phrase_share == 0.1
    assert recipe.train.kl == base.train.kl and recipe.dose_kl == base.dose_kl
    assert recipe.for_alignment("joy").dose_kl == 0.5
    for bad, words in [("train.entropi=0.1", "field of TrainConfig"),
                       ("vector_scale", "field=value"), ("objective=preference", "literal")]:
        with pytest.raises(irm_lens.errors.ConfigError, match=words):
            base.with_settings([bad])
    bad_joy = dataclasses.replace(base, alignment_settings={"joy": ("vector_scal=3.0",)})
    with pytest.raises(irm_lens.errors.ConfigError, match="vector_scal=3.0"):
        bad_joy.for_alignment("joy")
    for scales in ["()", "(4.0, 0.0)"]:  # no scale to write the pairs at, or a null one
        with pytest.raises(irm_lens.errors.ConfigError, match="pairs_scales"):
            base.with_settings([f"pairs_scales={scales}"])
