"""The embedded SmolLM2-135M-Instruct: conversion, its cache, and injection on a real model."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

import irm_lens
from irm_lens import IRM, inject, models
from irm_lens.data.dataset import split_texts
from irm_lens.data.precomputed import PRECOMPUTED, precomputation
from irm_lens.evaluate import _perplexities, eval_prompts
from irm_lens.generation import compare_generations, generate_continuations
from irm_lens.investigate import (InvestigationSettings, main_job_baselines,
                                  main_job_comparison)
from irm_lens.recipes import RECIPES, shipped_recipe_pairs, unsteered_calibration
from irm_lens.train import split_objectives

pytestmark = pytest.mark.embedded


def test_embedded_model_shape(embedded_model):
    cfg = embedded_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.rotary_base) == (1536, 49152, 100000.0)
    assert cfg.model_name == irm_lens.EMBEDDED_MODEL_NAME


def test_embedded_logits_match_transformers_from_the_same_gguf(embedded_model):
    from transformers import AutoModelForCausalLM

    path = models.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokens = embedded_model.to_tokens("The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        ours, theirs = embedded_model(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_second_load_comes_from_the_cache(embedded_model, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this GGUF")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = irm_lens.load_model(device="cpu")
    assert torch.equal(again.W_E, embedded_model.W_E)


def test_corrupt_cache_is_rebuilt(embedded_model, tmp_path, monkeypatch):
    entry = models.cache_dir() / "models" / models.file_sha256(models.embedded_gguf_path())[:32]
    assert (entry / "model.safetensors").is_file()
    monkeypatch.setenv("IRM_LENS_CACHE", str(tmp_path))
    copy = tmp_path / "models" / entry.name
    shutil.copytree(entry, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rebuilt = irm_lens.load_model(device="cpu")
    assert torch.equal(rebuilt.W_E, embedded_model.W_E)
    assert weights.stat().st_size > 1000


def test_kv_cache_on_and_off_agree_under_injection(embedded_model):
    torch.manual_seed(0)
    irm = IRM.for_model(embedded_model, layers="every4", preset="small")
    tokens = embedded_model.to_tokens("The weather today is")
    outs = []
    for use_cache in (True, False):
        with inject(embedded_model, irm, scale=0.05):
            outs.append(
                embedded_model.generate(
                    tokens, max_new_tokens=12, do_sample=False, use_past_kv_cache=use_cache,
                    stop_at_eos=False, verbose=False,
                )
            )
    assert torch.equal(outs[0], outs[1])


def test_a_strong_irm_changes_generations(embedded_model):
    torch.manual_seed(0)
    irm = IRM.for_model(embedded_model, layers="q2", preset="small", output_scale=4.0)
    (g,) = compare_generations(embedded_model, irm, ["Describe the weather today."],
                               max_new_tokens=8, progress=False)
    assert g.unsteered and g.steered != g.unsteered


def test_the_main_jobs_reference_margins_are_shipped_and_match_the_model(embedded_model):
    """The default recipe's anger pairs, split as seed 0 trains on them: their reference margins
    come from irm_lens/data/precomputed (scripts/precompute.py), and equal the model's own."""
    recipe = RECIPES["preference"].for_alignment("anger")
    pairs = shipped_recipe_pairs("anger", recipe)
    config = replace(recipe.train, seed=0)
    for objective in split_objectives(embedded_model, split_texts(pairs, seed=0), config):
        assert (PRECOMPUTED / f"{objective.reference_key}.safetensors").exists()
        computed = objective.reference_margins(embedded_model, stop=16)
        # Sums of 40-80 float32 log-probabilities: another CPU's kernels round them apart by up
        # to 2e-4 (an AMD AVX2 machine against the Intel AMX one that wrote them); a wrong model
        # or split is off by whole nats.
        assert torch.allclose(objective.ref_margin[:16], computed, atol=1e-3)


def test_the_main_jobs_baselines_are_shipped_and_match_the_model(embedded_model):
    """What the main job computes beside its IRM (the CAA vector's means, the calibration's
    unsteered replies, the baselines' evaluation) is read from irm_lens/data/precomputed
    (scripts/precompute.py), and the unsteered greedy replies and their perplexities read
    there are the model's own (all but at most two replies, for another CPU's rounding)."""
    settings = InvestigationSettings()
    recipe = RECIPES[settings.recipe]
    with precomputation() as lookups:
        unsteered_calibration(embedded_model, recipe.for_alignment(settings.alignment))
        baselines = main_job_baselines(embedded_model, settings.alignment, recipe)
        main_job_comparison(embedded_model, baselines, settings, progress=False)
    assert len(lookups) == 16 and all(lookup.found for lookup in lookups)
    prompts = eval_prompts(None, settings.eval_prompts, 0)
    kwargs = dict(max_new_tokens=settings.eval_new_tokens, batch_size=40)  # compare_steering's
    with precomputation("read") as read:
        shipped = generate_continuations(embedded_model, prompts, **kwargs)
        shipped_perplexities = _perplexities(embedded_model, shipped, 40)
    with precomputation("off"):
        computed = generate_continuations(embedded_model, prompts, **kwargs)
        computed_perplexities = _perplexities(embedded_model, computed, 40)
    assert [lookup.found for lookup in read] == [True, True]
    # Written on a machine of this kind; another CPU's float rounding may flip a near-tie token.
    same = [i for i, (a, b) in enumerate(zip(shipped, computed)) if a == b]
    assert len(same) >= len(prompts) - 2
    assert [computed_perplexities[i] for i in same] == pytest.approx(
        [shipped_perplexities[i] for i in same], rel=1e-4)
