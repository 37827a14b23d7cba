"""``irm_lens.components``: the frozen weights in Hugging Face's memory layout and the
unembedding without its zero bias give bitwise the same logits and IRM gradients as
TransformerLens's own components, while the per-forward transposes become views; the rsqrt
RMSNorm agrees to float rounding and gives way to TransformerLens's whenever its hook points are
used."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens.components import RMSNorm, Unembed

import irm_lens
from irm_lens.components import FastRMSNorm, ZeroBiasUnembed, use_fast_components
from irm_lens.data.dataset import tokenize_texts
from irm_lens.losses import masked_lm_loss

TEXTS = ["The cat sat on the mat and looked around.", "Hi!", "Numbers: 1, 2, 3, 4."]


@pytest.fixture()
def model(tiny_llama_dir):
    return irm_lens.load_model(tiny_llama_dir, device="cpu")


def _with_tl(model, *, layout: bool = True, norm: bool = True):
    """A copy of ``model`` with TransformerLens's own weight layout and unembedding (``layout``)
    and its own RMSNorm (``norm``)."""
    plain = copy.deepcopy(model)
    if layout:
        for param in plain.parameters():
            param.data = param.data.contiguous()
        plain.unembed.__class__ = Unembed
    if norm:
        for module in plain.modules():
            if type(module) is FastRMSNorm:
                module.__class__ = RMSNorm
    return plain


def _step(model, irm, dtype=torch.float32):
    data = tokenize_texts(model, TEXTS, max_length=16)
    irm.zero_grad(set_to_none=True)
    with irm_lens.inject(model, irm):
        logits = model(data.input_ids)
    masked_lm_loss(logits, data.input_ids, data.loss_mask).backward()
    return logits.detach(), [p.grad.clone() for p in irm.parameters()]


def test_transposes_are_views(model):
    assert type(model.unembed) is ZeroBiasUnembed
    assert type(model.blocks[0].ln1) is FastRMSNorm and type(model.ln_final) is FastRMSNorm
    assert model.unembed.W_U.T.is_contiguous() and not model.unembed.W_U.is_contiguous()
    for block in model.blocks:
        for w in (block.mlp.W_gate, block.mlp.W_in, block.mlp.W_out):
            assert w.T.is_contiguous()
        # the rearranges of the attention's forward, as TransformerLens writes them
        assert block.attn.W_Q.permute(0, 2, 1).is_contiguous()
        assert block.attn._W_K.permute(0, 2, 1).is_contiguous()
        assert block.attn.W_O.permute(2, 0, 1).is_contiguous()
    before = [(n, p.shape, p.data_ptr()) for n, p in model.named_parameters()]
    use_fast_components(model)  # idempotent: nothing moves again
    assert [(n, p.shape, p.data_ptr()) for n, p in model.named_parameters()] == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_gives_bitwise_the_same_logits_and_irm_gradients(tiny_llama_dir, dtype):
    model = irm_lens.load_model(tiny_llama_dir, device="cpu", dtype=dtype)
    plain = _with_tl(model, norm=False)
    assert not plain.unembed.W_U.T.is_contiguous()
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    logits, grads = _step(model, irm)
    plain_logits, plain_grads = _step(plain, irm)
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_a_nonzero_unembedding_bias_still_counts(model):
    ids = model.to_tokens(TEXTS[0])
    with torch.no_grad():
        before = model(ids)
        model.unembed.b_U[7] = 2.5  # an in-place edit after a forward pass
        after = model(ids)
        model.unembed.b_U.zero_()
        again = model(ids)
    assert torch.allclose(after[..., 7] - before[..., 7], torch.tensor(2.5), atol=1e-5)
    assert torch.equal(torch.cat([after[..., :7], after[..., 8:]], -1),
                       torch.cat([before[..., :7], before[..., 8:]], -1))
    assert torch.equal(again, before)


def test_rsqrt_norm_agrees_with_transformer_lens_to_rounding(model):
    plain = _with_tl(model, layout=False)
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    logits, grads = _step(model, irm)
    plain_logits, plain_grads = _step(plain, irm)
    assert not torch.equal(logits, plain_logits)  # really another computation ...
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)  # ... to rounding
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_norm_hook_points_take_transformer_lens_path(model):
    plain = _with_tl(model, layout=False)
    ids = model.to_tokens(TEXTS[0])
    names = lambda name: name.endswith(("hook_scale", "hook_normalized"))  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=names)
        plain_logits, plain_cache = plain.run_with_cache(ids, names_filter=names)
        # a patch of the scale acts on the normalised value
        doubled = model.run_with_hooks(
            ids, fwd_hooks=[("ln_final.hook_scale", lambda scale, hook: 2 * scale)])
    assert torch.equal(logits, plain_logits)
    assert set(cache.keys()) == set(plain_cache.keys()) and len(cache) == 2 * (2 * model.cfg.n_layers + 1)
    for key in cache.keys():
        assert torch.equal(cache[key], plain_cache[key])
    with torch.no_grad():
        final = plain.run_with_cache(ids, names_filter="ln_final.hook_normalized")[1]
        expected = (final["ln_final.hook_normalized"] / 2 * plain.ln_final.w) @ plain.W_U + plain.b_U
    torch.testing.assert_close(doubled, expected, rtol=1e-5, atol=1e-5)
