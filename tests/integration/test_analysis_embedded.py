"""The analyses on the embedded SmolLM2-135M-Instruct (model-only parts, small settings)."""

from __future__ import annotations

import pytest
import torch

import irm_lens
from irm_lens.errors import NeuronIndexError

pytestmark = pytest.mark.embedded

PROMPTS = ["What is the capital of France?", "Name a planet in the solar system."]


def test_ablate_1512_explains_that_the_index_belongs_to_bigger_models(embedded_model):
    with pytest.raises(NeuronIndexError, match="d_model=576") as info:
        irm_lens.ablate(embedded_model, neuron=1512)
    message = str(info.value)
    assert "0..575" in message and "d_model > 1512" in message


def test_model_only_analyses_run_on_the_embedded_model(embedded_model):
    norms = irm_lens.norm_weights(embedded_model)
    assert norms.ln1.shape == (30, 576) and norms.ln_final.shape == (576,)
    mags = irm_lens.activation_magnitudes(embedded_model, PROMPTS, progress=False)
    assert torch.isfinite(mags.overall).all() and mags.n_tokens["first"] == len(PROMPTS)
    top = mags.top_indices(3)
    assert len(mags.profile(top[0])) == 30
    attr = irm_lens.logit_attribution(embedded_model, top[0], prompts=PROMPTS, max_new_tokens=0,
                                      progress=False)
    assert attr.direct_effect.shape == (576,)
    # SmolLM2's index 507: the massive first-token (attention-sink) channel, the loudest index
    # and the smallest final-norm weight; zeroing it wrecks the model, a random index does not.
    assert top[0] == 507 and int(norms.ln_final.abs().argmin()) == 507
    result = irm_lens.measure_ablation(embedded_model, top[0], texts=PROMPTS, n_random=2,
                                       progress=False)
    target, rand = result.table.iloc[0], result.table.iloc[1:]
    assert target["delta_loss"] > 1.0 > 20 * rand["delta_loss"].abs().max()
    assert target["kl"] > 10 * rand["kl"].max()
