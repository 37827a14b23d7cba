"""Shipped precomputed results (irm_lens.data.precomputed): the lookup modes, and the untrained
computations that read them (generation, perplexities, mean activations) giving exactly what
they compute, on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from irm_lens.data import precomputed
from irm_lens.data.precomputed import cached, content_key, precomputation
from irm_lens.evaluate import _perplexities
from irm_lens.generation import generate_continuations
from irm_lens.irm import IRM
from irm_lens.steering import Prompting, SteeringVector, SteeringVectorConfig, mean_activations

PROMPTS = ["How was your day?", "What is a cat?", "Name a city.", "Why is the sky blue?"]


def _counting(value: float):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.tensor([value])}

    return compute, calls


def test_each_mode_reads_computes_or_records(tmp_path, monkeypatch):
    compute, calls = _counting(1.0)
    with precomputation("read", tmp_path) as lookups:  # nothing saved: computed, not written
        assert cached("k-1", compute)["x"].item() == 1.0
    assert calls == [1] and not list(tmp_path.iterdir())
    assert [(lk.key, lk.found) for lk in lookups] == [("k-1", False)]
    with precomputation("record", tmp_path) as lookups:  # computed and saved
        cached("k-1", compute)
    assert len(calls) == 2 and (tmp_path / "k-1.safetensors").exists()
    stand_in, more = _counting(2.0)
    with precomputation("read", tmp_path) as lookups:  # read: the saved value, not computed
        assert cached("k-1", stand_in)["x"].item() == 1.0
        with precomputation() as inner:  # an inner block keeps the outer mode and directory
            assert cached("k-1", stand_in)["x"].item() == 1.0
    assert more == [] and [lk.found for lk in lookups] == [True, True] and len(inner) == 1
    with precomputation("off", tmp_path):
        assert cached("k-1", stand_in)["x"].item() == 2.0
    monkeypatch.setattr(precomputed, "PRECOMPUTED", tmp_path)
    monkeypatch.setenv(precomputed.ENV_SWITCH, "0")  # the switch outside any block: off
    assert cached("k-1", stand_in)["x"].item() == 2.0
    monkeypatch.delenv(precomputed.ENV_SWITCH)
    assert cached("k-1", stand_in)["x"].item() == 1.0
    assert cached(None, stand_in)["x"].item() == 2.0  # no key: computed
    with pytest.raises(Exception, match="'read', 'off' or 'record'"):
        with precomputation("write"):
            pass


def test_a_model_with_a_hook_attached_has_no_key(tiny_model):
    assert content_key("k", tiny_model, 1) is not None
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        assert content_key("k", tiny_model, 1) is None
    assert content_key("k", tiny_model, 1) == content_key("k", tiny_model, 1)
    assert content_key("k", tiny_model, 1) != content_key("k", tiny_model, 2)


def _vector(model, scale=2.0):
    config = SteeringVectorConfig(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers,
                                  layers=(1,), scale=scale)
    values = torch.randn(1, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return SteeringVector(config, values)


@pytest.mark.parametrize("do_sample", [False, True])
def test_untrained_interventions_read_back_the_continuations_they_generated(
        chat_model, tmp_path, do_sample):
    kwargs = dict(max_new_tokens=6, batch_size=3, do_sample=do_sample, seed=5)
    for intervention in (None, Prompting("You are terse."), _vector(chat_model)):
        with precomputation("off"):
            fresh = generate_continuations(chat_model, PROMPTS, intervention=intervention,
                                           **kwargs)
        with precomputation("record", tmp_path) as recorded:
            assert generate_continuations(chat_model, PROMPTS, intervention=intervention,
                                          **kwargs) == fresh
        with precomputation("read", tmp_path) as read:
            assert generate_continuations(chat_model, PROMPTS, intervention=intervention,
                                          **kwargs) == fresh
        assert [lk.found for lk in recorded] == [False] and [lk.found for lk in read] == [True]
    # every key differs: the interventions, and another seed, scale, batching or prompt
    with precomputation("read", tmp_path) as other:
        generate_continuations(chat_model, PROMPTS, **{**kwargs, "seed": 6})
        generate_continuations(chat_model, PROMPTS, **{**kwargs, "batch_size": 2})
        generate_continuations(chat_model, PROMPTS[:3] + ["Name a town."], **kwargs)
        generate_continuations(chat_model, PROMPTS, intervention=_vector(chat_model, 3.0),
                               **kwargs)
        generate_continuations(chat_model, PROMPTS, intervention=_vector(chat_model),
                               scale=0.5, **kwargs)
    assert len(list(tmp_path.iterdir())) == 3 and not any(lk.found for lk in other)


def test_an_irms_continuations_are_always_generated(chat_model, tmp_path):
    irm = IRM.for_model(chat_model, layers="all", preset="small")
    with precomputation("record", tmp_path) as lookups:
        generate_continuations(chat_model, PROMPTS, intervention=irm, max_new_tokens=4)
    assert lookups == [] and not list(tmp_path.iterdir())


def test_perplexities_and_mean_activations_read_back_what_they_computed(chat_model, tmp_path):
    continuations = generate_continuations(chat_model, PROMPTS, max_new_tokens=5)
    with precomputation("off"):
        fresh = (_perplexities(chat_model, continuations, 3),
                 mean_activations(chat_model, PROMPTS, [0, 2]))
    for mode in ("record", "read"):
        with precomputation(mode, tmp_path) as lookups:
            again = (_perplexities(chat_model, continuations, 3),
                     mean_activations(chat_model, PROMPTS, [0, 2]))
        assert [lk.found for lk in lookups] == [mode == "read"] * 2
        assert again[0] == fresh[0] and torch.equal(again[1], fresh[1])
    with precomputation("read", tmp_path) as lookups:  # other batching or layers: computed
        _perplexities(chat_model, continuations, 2)
        mean_activations(chat_model, PROMPTS, [0, 1])
    assert not any(lk.found for lk in lookups)
