"""The fused attention path (``irm_lens.attention``) against TransformerLens's explicit one, on a
tiny grouped-query Llama: same logits and gradients, the fused kernel really used, and the
explicit path taken whenever the attention scores or pattern are hooked."""

from __future__ import annotations

import pytest
import torch

import irm_lens
from irm_lens.attention import attention_kind, set_attention
from irm_lens.errors import ConfigError

TEXTS = ["The cat sat on the mat and looked around.", "Hi!", "Numbers: 1, 2, 3, 4."]


@pytest.fixture()
def model(tiny_llama_dir):
    return irm_lens.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture()
def sdpa_calls(monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _logits_both(model, *args, **kwargs):
    set_attention(model, "eager")
    eager = model(*args, **kwargs)
    set_attention(model, "sdpa")
    return eager, model(*args, **kwargs)


def test_default_is_sdpa_and_eager_can_be_chosen(tiny_llama_dir, model):
    assert model.cfg.n_key_value_heads < model.cfg.n_heads  # the grouped-query case
    assert attention_kind(model) == "sdpa"
    assert attention_kind(irm_lens.load_model(tiny_llama_dir, device="cpu", attention="eager")) == "eager"
    with pytest.raises(ConfigError, match="'sdpa' or 'eager'"):
        irm_lens.load_model(tiny_llama_dir, device="cpu", attention="flash")
    with pytest.raises(ConfigError, match="'sdpa' or 'eager'"):
        set_attention(model, "flash")


def test_right_padded_batch_matches_and_uses_the_fused_kernel(model, sdpa_calls):
    tokens = model.to_tokens(TEXTS, padding_side="right")
    eager, fused = _logits_both(model, tokens)
    assert len(sdpa_calls) == model.cfg.n_layers  # only the sdpa forward called it
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_left_padding_mask_matches_including_all_padding_rows(model):
    tokens = model.to_tokens(TEXTS, padding_side="left")
    mask = (tokens != model.tokenizer.pad_token_id).long()
    assert (mask == 0).any()  # queries at padded positions attend to nothing
    eager, fused = _logits_both(model, tokens, attention_mask=mask)
    assert not torch.isnan(fused).any()
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_gradients_through_an_injected_irm_match(model):
    tokens = model.to_tokens(TEXTS, padding_side="right")
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    grads = {}
    for kind in ("eager", "sdpa"):
        set_attention(model, kind)
        irm.zero_grad()
        with irm_lens.inject(model, irm):
            model(tokens).logsumexp(-1).mean().backward()
        grads[kind] = [p.grad.clone() for p in irm.parameters()]
    for eager, fused in zip(grads["eager"], grads["sdpa"]):
        torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)


def test_generation_with_the_key_value_cache_matches(model):
    outs = {}
    for kind in ("eager", "sdpa"):
        set_attention(model, kind)
        outs[kind] = model.generate("The cat", max_new_tokens=8, do_sample=False, verbose=False)
    assert outs["sdpa"] == outs["eager"]


def test_hooked_pattern_falls_back_to_the_explicit_path(model, sdpa_calls):
    tokens = model.to_tokens(TEXTS[:1])
    set_attention(model, "eager")
    _, eager_cache = model.run_with_cache(tokens)
    set_attention(model, "sdpa")
    _, cache = model.run_with_cache(tokens)  # every hook point cached, patterns included
    assert sdpa_calls == []
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"],
                               eager_cache["blocks.1.attn.hook_pattern"])

    def uniform(pattern, hook):  # an edit that only the explicit path can honour
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    hooks = [("blocks.2.attn.hook_pattern", uniform)]
    set_attention(model, "eager")
    eager = model.run_with_hooks(tokens, fwd_hooks=hooks)
    set_attention(model, "sdpa")
    fused = model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert len(sdpa_calls) == model.cfg.n_layers - 1  # only the hooked block fell back
    assert not torch.allclose(fused, model(tokens), atol=1e-3)  # the edit did something
    assert len(sdpa_calls) == 2 * model.cfg.n_layers - 1  # ... and once unhooked, fused again
