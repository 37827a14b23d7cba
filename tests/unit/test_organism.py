"""``irm_lens.organism.plant_outlier`` on fresh tiny random Llamas (never the shared fixture)."""

from __future__ import annotations

import math

import pytest
import torch
from transformer_lens.utilities import get_act_name

import irm_lens
from irm_lens.analysis.conditions import text_batches
from irm_lens.errors import ConfigError, NeuronIndexError
from irm_lens.losses import masked_lm_loss
from irm_lens.organism import outlier_signature, plant_outlier

TEXTS = ["The cat sat on the mat.", "Numbers: 1, 2, 3.", "Hello there, friend!",
         "A quiet morning in the village.", "What is the capital of France?"]
HELD_OUT = ["Water boils at one hundred degrees.", "She read the letter twice.",
            "How many legs does a spider have?"]
INDEX, MAGNITUDE, FROM_LAYER, NORM_WEIGHT = 7, 10.0, 1, 5e-5
# Relative logit error ||edited - original|| / ||original - its mean over the vocabulary||
# allowed on held-out text. One weight per norm cannot undo a larger RMS on every token (the
# factor needed is each token's rms_new / rms_old); this model's per-token RMS varies by ~18%,
# compounded over three edited blocks: 0.22 measured, against 0.65 without the compensation.
LOGIT_TOLERANCE = 0.35


def _plant(model, **kwargs):
    args = dict(magnitude=MAGNITUDE, from_layer=FROM_LAYER, norm_weight=NORM_WEIGHT, texts=TEXTS,
                eval_texts=HELD_OUT)
    return plant_outlier(model, INDEX, **{**args, **kwargs})


def _logits(model):
    ids, mask, _ = text_batches(model, HELD_OUT)[0]
    with torch.no_grad():
        return model(ids)[mask.bool()]  # [token, d_vocab]


def _relative_error(edited, original) -> float:
    return float((edited - original).norm() / (original - original.mean(-1, keepdim=True)).norm())


@pytest.fixture(scope="module")
def fresh(tiny_llama_dir):
    """A new, unshared tiny model on each call (the edit is in place)."""
    return lambda: irm_lens.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def planted(fresh):
    model = fresh()
    before = _logits(model)
    result = _plant(model)
    return model, result, before


def test_channel_outgrows_the_median_on_every_token(fresh, planted):
    model, result, _ = planted
    signature = outlier_signature(model, INDEX, TEXTS)
    assert (signature.min_ratio[FROM_LAYER:] >= MAGNITUDE).all()
    assert signature.min_ratio[FROM_LAYER - 1] < 1  # not there before from_layer
    assert result.min_ratio >= MAGNITUDE
    assert (outlier_signature(fresh(), INDEX, TEXTS).mean_ratio < 3).all()  # ordinary before


def test_channel_is_one_constant_from_from_layer_on(planted):
    model, result, _ = planted
    ids, mask, _ = text_batches(model, TEXTS)[0]
    _, cache = model.run_with_cache(ids)
    real = mask.bool()
    base = cache[get_act_name("resid_mid", FROM_LAYER)][real][:, INDEX]
    channel = [cache[get_act_name("resid_post", layer)][real][:, INDEX]
               for layer in range(FROM_LAYER, model.cfg.n_layers)]
    assert all(torch.equal(c, channel[0]) for c in channel)  # nothing later writes into it
    torch.testing.assert_close(channel[0], base + result.value)


def test_norm_weights_at_the_index_are_set_and_the_rest_rescaled(fresh, planted):
    model, result, _ = planted
    original = fresh()
    assert result.norms[0] == f"blocks.{FROM_LAYER + 1}.ln1" and result.norms[-1] == "ln_final"
    for name, scale in zip(result.norms, result.scales.tolist()):
        w, w0 = model.get_submodule(name).w, original.get_submodule(name).w
        assert float(w[INDEX]) == float(torch.tensor(NORM_WEIGHT, dtype=w.dtype))
        others = torch.arange(w.numel()) != INDEX
        torch.testing.assert_close(w[others], w0[others] * scale)
        assert scale > 1  # the RMS grew, so the other indices are read more strongly
    for layer in range(FROM_LAYER + 1):  # norms before the channel exists are untouched
        for name in ("ln1", "ln2"):
            assert torch.equal(model.blocks[layer].get_submodule(name).w,
                               original.blocks[layer].get_submodule(name).w)


def test_logits_stay_close_and_the_compensation_is_what_keeps_them(fresh, planted):
    model, result, before = planted
    error = _relative_error(_logits(model), before)
    assert error <= LOGIT_TOLERANCE
    bare = fresh()
    bare_result = _plant(bare, compensate=False, measure=False)
    assert bare_result.scales.eq(1).all()
    assert _relative_error(_logits(bare), before) >= 2 * error
    assert (result.compensation_error < bare_result.compensation_error).all()


def test_cost_is_measured_on_the_held_out_texts(fresh, planted):
    model, result, _ = planted

    def loss(m) -> float:
        ids, mask, loss_mask = text_batches(m, HELD_OUT)[0]
        with torch.no_grad():
            return float(masked_lm_loss(m(ids), ids, loss_mask))

    assert result.loss_before == pytest.approx(loss(fresh()), abs=1e-5)
    assert result.loss_after == pytest.approx(loss(model), abs=1e-5)
    assert 0 < result.kl < 1
    assert _plant(fresh(), measure=False).kl is None


def test_restore_and_original_weights_are_exact(fresh):
    original, model = fresh(), fresh()
    result = _plant(model, measure=False)
    edited = {k: v.clone() for k, v in model.state_dict().items()}

    def same(a, b) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    with result.original_weights(model):
        assert same(model.state_dict(), original.state_dict())
    assert same(model.state_dict(), edited)
    result.restore(model)
    assert same(model.state_dict(), original.state_dict())
    result.reapply(model)
    assert same(model.state_dict(), edited)


def test_the_edit_is_deterministic(fresh):
    a, b = fresh(), fresh()
    ra, rb = _plant(a, measure=False), _plant(b, measure=False)
    assert ra.value == rb.value and torch.equal(ra.scales, rb.scales)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("from_layer", [0, 3])
def test_any_from_layer(fresh, from_layer):
    model = fresh()
    result = _plant(model, from_layer=from_layer, norm_weight=0.0, measure=False)
    assert len(result.norms) == 2 * (model.cfg.n_layers - 1 - from_layer) + 1
    assert float(model.ln_final.w[INDEX]) == 0.0
    assert (outlier_signature(model, INDEX, TEXTS).min_ratio[from_layer:] >= MAGNITUDE).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(index=64), NeuronIndexError, "0..63"),
    (dict(index=-1), NeuronIndexError, "0..63"),
    (dict(index=1.5), NeuronIndexError, "an int"),
    (dict(from_layer=4), NeuronIndexError, "layers 0..3"),
    (dict(from_layer=-1), NeuronIndexError, "layers 0..3"),
    (dict(magnitude=0), ConfigError, "positive finite"),
    (dict(magnitude=math.nan), ConfigError, "positive finite"),
    (dict(magnitude="10"), ConfigError, "positive finite"),
    (dict(norm_weight=math.inf), ConfigError, "finite"),
    (dict(texts=[]), ConfigError, "non-empty"),
])
def test_bad_input_is_refused_before_any_edit(fresh, kwargs, error, match):
    model = fresh()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    args = {**dict(index=INDEX, magnitude=MAGNITUDE, texts=TEXTS, measure=False), **kwargs}
    with pytest.raises(error, match=match):
        plant_outlier(model, args.pop("index"), **args)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
