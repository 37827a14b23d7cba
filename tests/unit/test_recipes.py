"""Training recipes: the dose a recipe gives its trained IRM."""

from __future__ import annotations

import pytest
import torch

import irm_lens
from irm_lens.recipes import Recipe
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


def test_decoding_scales_steer_sampling_at_its_own_dose(tiny_model):
    assert Recipe(objective="lm", dose=0.75).decoding_scales() == {"greedy": 1.0, "sampled": 1.0}
    scales = Recipe(objective="lm", dose=0.75, sampled_dose=0.9).decoding_scales()
    assert scales == {"greedy": 1.0, "sampled": pytest.approx(1.2)}
    # on the dosed IRM, that scale is the sampled dose applied to the undosed outputs
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    x = torch.randn(1, 3, tiny_model.cfg.d_model)
    dosed = irm.with_output_scale(0.75)
    torch.testing.assert_close(dosed(x) * scales["sampled"], irm.with_output_scale(0.9)(x))
