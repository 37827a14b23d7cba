"""inject(): the IRM's outputs reach the residual stream exactly, in every kind of forward pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens.utilities import get_act_name

from irm_lens import IRM, ConfigError, ShapeMismatchError, inject

TEXT = "The quick brown fox jumps over the lazy dog."


def _irm(model, layers="all", seed=0, **kw):
    torch.manual_seed(seed)
    return IRM.for_model(model, layers=layers, preset="small", **kw)


def test_zero_irm_leaves_logits_unchanged(tiny_model):
    tokens = tiny_model.to_tokens(TEXT)
    base = tiny_model(tokens)
    with inject(tiny_model, _irm(tiny_model, zero_init_output=True)):
        steered = tiny_model(tokens)
    assert torch.equal(base, steered)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), step=st.integers(1, 4))
def test_zero_scale_is_the_identity(tiny_model, seed, step):
    tokens = tiny_model.to_tokens(TEXT)
    with inject(tiny_model, _irm(tiny_model, layers=f"every{step}", seed=seed), scale=0.0):
        steered = tiny_model(tokens)
    assert torch.equal(tiny_model(tokens), steered)


def test_injection_equals_adding_the_delta_by_hand(tiny_model):
    irm = _irm(tiny_model, layers=[0, 2, 3], n_hidden_layers=0)  # affine: delta = W x + b
    tokens = tiny_model.to_tokens(TEXT)
    W, b = irm.out.weight.detach(), irm.out.bias.detach()
    d_model = tiny_model.cfg.d_model
    state = {}

    def read(resid, hook):
        state["delta"] = (resid @ W.T + b).reshape(*resid.shape[:2], 3, d_model)

    def add(i):
        return lambda resid, hook: resid + state["delta"][:, :, i]

    hooks = [("blocks.0.hook_resid_mid", read)] + [
        (get_act_name("resid_post", layer), add(i)) for i, layer in enumerate([0, 2, 3])
    ]
    by_hand = tiny_model.run_with_hooks(tokens, fwd_hooks=hooks)
    with inject(tiny_model, irm):
        steered = tiny_model(tokens)
    assert not torch.allclose(steered, tiny_model(tokens), atol=1e-3)
    torch.testing.assert_close(steered, by_hand, rtol=0, atol=1e-5)


def test_run_with_cache_sees_the_injection(tiny_model):
    irm = _irm(tiny_model, layers=[0, 1])
    tokens = tiny_model.to_tokens(TEXT)
    _, clean = tiny_model.run_with_cache(tokens)
    with inject(tiny_model, irm):
        # residual hooks only, as the analyses cache: the same (fused) attention as a plain call
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
        plain = tiny_model(tokens)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    delta = irm(clean["blocks.0.hook_resid_mid"])  # [batch, pos, 2, d_model]
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_post"] - clean["blocks.0.hook_resid_post"],
        delta[:, :, 0],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid"])
def test_other_injection_sites(tiny_model, site):
    irm = _irm(tiny_model, layers=[1, 2], inject_site=site)
    tokens = tiny_model.to_tokens(TEXT)
    _, clean = tiny_model.run_with_cache(tokens)
    with inject(tiny_model, irm):
        _, cache = tiny_model.run_with_cache(tokens)
    delta = irm(clean["blocks.0.hook_resid_mid"])
    hook = get_act_name(site, 1)
    torch.testing.assert_close(cache[hook] - clean[hook], delta[:, :, 0], rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_on_exit_even_after_an_exception(tiny_model):
    irm = _irm(tiny_model)
    tokens = tiny_model.to_tokens(TEXT)
    base = tiny_model(tokens)
    with pytest.raises(KeyError):
        with inject(tiny_model, irm):
            raise KeyError("boom")
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())
    assert torch.equal(tiny_model(tokens), base)


def test_other_hooks_survive_and_reset_hooks_does_not_remove_the_injection(tiny_model):
    irm = _irm(tiny_model)
    tokens = tiny_model.to_tokens(TEXT)
    with inject(tiny_model, irm):
        expected = tiny_model(tokens)
    seen = []
    point = tiny_model.hook_dict["blocks.1.hook_resid_post"]
    point.add_hook(lambda x, hook: seen.append(1), is_permanent=True)
    try:
        with inject(tiny_model, irm):
            tiny_model.reset_hooks()  # removes non-permanent hooks only
            assert torch.equal(tiny_model(tokens), expected)
        assert len(point.fwd_hooks) == 1
    finally:
        tiny_model.reset_hooks(including_permanent=True)
    assert seen


def test_nested_injections_stack(tiny_model):
    a, b = _irm(tiny_model, layers=[1], seed=1), _irm(tiny_model, layers=[1], seed=2)
    tokens = tiny_model.to_tokens(TEXT)
    _, clean = tiny_model.run_with_cache(tokens)
    with inject(tiny_model, a), inject(tiny_model, b):
        _, cache = tiny_model.run_with_cache(tokens)
    x = clean["blocks.0.hook_resid_mid"]
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"] - clean["blocks.1.hook_resid_post"],
        (a(x) + b(x))[:, :, 0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_padded_batches_match_single_prompts(tiny_model):
    irm = _irm(tiny_model)
    prompts = ["Hello there, how are you doing today?", "Hi."]
    with inject(tiny_model, irm):
        for side in ("left", "right"):
            batch = tiny_model.to_tokens(prompts, padding_side=side)
            logits = tiny_model(batch, padding_side=side)
            for i, prompt in enumerate(prompts):
                single = tiny_model(tiny_model.to_tokens(prompt))[0]
                n = single.shape[0]
                rows = logits[i, -n:] if side == "left" else logits[i, :n]
                torch.testing.assert_close(rows, single, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_irm_only(tiny_model):
    irm = _irm(tiny_model)
    tokens = tiny_model.to_tokens(TEXT)
    with inject(tiny_model, irm):
        loss = tiny_model(tokens, return_type="loss")
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in irm.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.parameters())


def test_kv_cache_and_no_cache_generate_the_same_tokens(tiny_model):
    irm = _irm(tiny_model, output_scale=3.0)
    tokens = tiny_model.to_tokens(TEXT)
    outs = {}
    for use_cache in (True, False):
        with inject(tiny_model, irm):
            outs[use_cache] = tiny_model.generate(
                tokens, max_new_tokens=12, do_sample=False, use_past_kv_cache=use_cache,
                stop_at_eos=False, verbose=False,
            )
    plain = tiny_model.generate(
        tokens, max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False
    )
    assert torch.equal(outs[True], outs[False])
    assert not torch.equal(outs[True], plain)  # the injection was active during generation


def test_start_at_layer_past_the_read_site_is_explained(tiny_model):
    irm = _irm(tiny_model, layers=[2])
    resid = torch.zeros(1, 3, tiny_model.cfg.d_model)
    with inject(tiny_model, irm), pytest.raises(RuntimeError, match="without the IRM's input"):
        tiny_model(resid, start_at_layer=1)


def test_mismatched_irm_is_refused_before_any_hook(tiny_model):
    from irm_lens import IRMConfig, ShapeMismatchError

    irm = IRM(IRMConfig(d_model=32, n_layers=4, layers=(0,)))
    with pytest.raises(ShapeMismatchError, match="d_model=32"):
        with inject(tiny_model, irm):
            pass
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())


def test_bfloat16_model_with_float32_irm(tiny_llama_dir):
    import irm_lens

    model = irm_lens.load_model(tiny_llama_dir, dtype=torch.bfloat16, device="cpu")
    irm = _irm(model)
    tokens = model.to_tokens(TEXT)
    with inject(model, irm):
        loss = model(tokens, return_type="loss")
    loss.backward()
    assert irm.out.weight.grad.dtype == torch.float32
    assert model.W_E.dtype == torch.bfloat16


def test_positions_mask_steers_only_the_chosen_positions(tiny_model):
    irm = _irm(tiny_model, layers=[1, 3])
    tokens = tiny_model.to_tokens([TEXT, TEXT])
    positions = torch.zeros(tokens.shape)
    positions[0, 5:] = 1.0
    positions[1, -2:] = 1.0
    names = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    _, clean = tiny_model.run_with_cache(tokens, names_filter=names)
    with inject(tiny_model, irm):
        _, every = tiny_model.run_with_cache(tokens, names_filter=names)
    with inject(tiny_model, irm, positions=positions):
        _, masked = tiny_model.run_with_cache(tokens, names_filter=names)
    # Layer 1 is the first injection: exactly the clean residual off the mask, the fully
    # steered one on it (later layers also see the changed keys and values, as they should).
    hook = "blocks.1.hook_resid_post"
    off = positions == 0
    torch.testing.assert_close(masked[hook][off], clean[hook][off], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[hook][~off], every[hook][~off], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked[hook][~off], clean[hook][~off], atol=1e-3)
    with pytest.raises(ShapeMismatchError, match=r"\[batch, pos\]"), inject(
        tiny_model, irm, positions=positions[:, 1:]
    ):
        tiny_model(tokens)
    with pytest.raises(ConfigError, match="positions"), inject(tiny_model, irm, positions="x"):
        pass


def test_generated_positions_read_the_prompt_unsteered(tiny_model):
    irm = _irm(tiny_model, layers=[0, 2])
    tokens = tiny_model.to_tokens("Tell me about the weather")
    prompt_len = tokens.shape[1]
    with inject(tiny_model, irm, positions="generated"):
        out = tiny_model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False,
                                  stop_at_eos=False)
    assert out.shape[1] > prompt_len
    # The same continuation by hand, without the cache: steer from the last prompt position on.
    positions = torch.zeros(out.shape)
    positions[:, prompt_len - 1 :] = 1.0
    with inject(tiny_model, irm, positions=positions):
        logits = tiny_model(out)
    assert torch.equal(logits[0, prompt_len - 1 : -1].argmax(-1), out[0, prompt_len:])
    with inject(tiny_model, irm, positions="generated"):  # a prompt pass: only its last position
        last = tiny_model(tokens)[0, -1]
        with_prompt = tiny_model(tokens[:, :-1])
    torch.testing.assert_close(last, logits[0, prompt_len - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_prompt[0, :-1], tiny_model(tokens[:, :-1])[0, :-1])
