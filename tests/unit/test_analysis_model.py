"""Norm weights, activation magnitudes, logit attribution, patching and ablation on tiny
models, each against a hand computation or a property known by construction."""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest
import torch
from conftest import PROMPTS, planted_irm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens.utilities import get_act_name

import irm_lens
from irm_lens.data.dataset import tokenize_texts
from irm_lens.errors import NeuronIndexError
from irm_lens.losses import masked_lm_loss

K = 7


@pytest.fixture
def fresh_model(tiny_llama_dir):
    """A tiny model of its own, free to be modified by the test."""
    return irm_lens.load_model(tiny_llama_dir, device="cpu")


def resid(model, text: str, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(model.to_tokens(text))
    return cache[get_act_name("resid_post", layer)][0]


# --- the one neuron check -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [64, 1512, -1])
def test_out_of_range_neuron_names_d_model_and_suggests_indices(tiny_model, bad):
    with pytest.raises(NeuronIndexError, match="d_model=64") as info:
        irm_lens.ablate(tiny_model, bad)
    assert "stand out" in str(info.value)
    if bad == 1512:
        assert "d_model > 1512" in str(info.value)


@pytest.mark.parametrize("bad", [1.0, "7", True, None, torch.tensor(2.0)])
def test_non_integer_neuron_is_refused(tiny_model, bad):
    with pytest.raises(NeuronIndexError, match="an int"):
        irm_lens.ablate(tiny_model, bad)


def test_layer_outside_the_model_is_refused(tiny_model):
    with pytest.raises(NeuronIndexError, match="layers 0..3"):
        irm_lens.ablate(tiny_model, K, layers=[4])


# --- norms and magnitudes --------------------------------------------------------------------

def test_norm_profile_ranks_a_planted_final_norm_weight(fresh_model):
    with torch.no_grad():
        fresh_model.ln_final.w[K] = 10.0
    norms = irm_lens.norm_weights(fresh_model)
    profile = norms.profile(K).set_index("norm")
    final = profile.loc["ln_final"]
    w = fresh_model.ln_final.w.detach().abs()
    assert final["rank"] == 1 and final["percentile"] == 100.0
    assert final["ratio_to_median"] == pytest.approx(float(10.0 / w.median()))
    assert norms.ln1.shape == (4, 64) and len(profile) == 9
    assert K in norms.outliers(3)["neuron"].tolist()


def test_activation_magnitudes_find_a_planted_massive_activation(fresh_model):
    firsts = {int(fresh_model.to_tokens(p)[0, 0]) for p in PROMPTS}  # BOS if the model adds one
    with torch.no_grad():
        for token in firsts:
            fresh_model.embed.W_E[token, K] = 2000.0
    mags = irm_lens.activation_magnitudes(fresh_model, PROMPTS, chat=False, progress=False)
    profile = mags.profile(K)
    assert (profile["rank"] == 1).all()
    assert mags.mean_abs[0, :, K].min() > 1000  # first-token class
    assert mags.massive()["neuron"].eq(K).any()
    # Hand computation: the overall mean |resid_post| of layer 2 over every real token.
    values = torch.cat([resid(fresh_model, p, 2).abs() for p in PROMPTS])
    torch.testing.assert_close(mags.overall[2], values.mean(0), rtol=1e-4, atol=1e-4)
    assert sum(mags.n_tokens.values()) == values.shape[0]
    assert mags.n_tokens["first"] == len(PROMPTS)


# --- logit attribution -----------------------------------------------------------------------

def test_direct_effect_equals_the_norm_of_the_autograd_jacobian(tiny_model):
    attr = irm_lens.logit_attribution(tiny_model, K, prompts=PROMPTS[:2], max_new_tokens=0,
                                      progress=False)
    final = get_act_name("resid_post", tiny_model.cfg.n_layers - 1)

    def centred_logits(x):
        logits = tiny_model.unembed(tiny_model.ln_final(x[None, None]))[0, 0]
        return logits - logits.mean()

    norms = []
    for prompt in PROMPTS[:2]:
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(prompt))
        for x in cache[final][0]:
            jac = torch.autograd.functional.jacobian(centred_logits, x)  # [vocab, d_model]
            norms.append(jac.norm(dim=0))
    expected = torch.stack(norms).mean(0)
    torch.testing.assert_close(attr.direct_effect, expected, rtol=1e-3, atol=1e-5)
    promoted = attr.promoted["token_id"].iloc[0]
    w_u = tiny_model.W_U.detach()
    push = tiny_model.ln_final.w[K].item() * (w_u[K] - w_u[K].mean())
    assert promoted == int(push.argmax())


def test_irm_logit_share_goes_to_the_only_index_it_pushes(tiny_model):
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="linear", zero_init_output=True)
    with torch.no_grad():
        irm.out.bias.view(4, 64)[:, K] = 2.0
    attr = irm_lens.logit_attribution(tiny_model, K, irm, PROMPTS[:2], max_new_tokens=2,
                                      progress=False)
    assert attr.irm_share[K] == pytest.approx(1.0, abs=1e-4)
    assert attr.irm_share_rank == 1
    comps = attr.components.set_index("component")
    assert "irm" in comps.index and "embed" in comps.index
    # Only index K carries the IRM, so all of its attribution goes through K ...
    assert comps.loc["irm", "at_neuron"] == pytest.approx(comps.loc["irm", "attribution"], rel=1e-4)
    # ... and the tokens it promotes most are those K's (centred) unembedding row favours.
    w_u = tiny_model.W_U.detach()
    push = tiny_model.ln_final.w[K].item() * (w_u[K] - w_u[K].mean())
    assert attr.irm_promoted["token_id"].tolist()[:3] == push.topk(3).indices.tolist()


def test_attribution_reads_the_sequences_it_is_given(tiny_model):
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    outputs = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=3,
                                           progress=False)
    kwargs = dict(max_new_tokens=3, progress=False)
    own = irm_lens.logit_attribution(tiny_model, K, irm, PROMPTS, **kwargs)
    given = irm_lens.logit_attribution(tiny_model, K, irm, PROMPTS, sequences=outputs.sequences,
                                       **kwargs)
    assert torch.equal(own.direct_effect, given.direct_effect)
    assert torch.equal(own.irm_share, given.irm_share)
    pd.testing.assert_frame_equal(own.components, given.components)
    prompts_only = [(p, []) for p, _ in outputs.sequences]
    other = irm_lens.logit_attribution(tiny_model, K, irm, PROMPTS, sequences=prompts_only, **kwargs)
    assert not torch.equal(other.direct_effect, own.direct_effect)
    with pytest.raises(irm_lens.errors.ConfigError, match="3 prompts"):
        irm_lens.logit_attribution(tiny_model, K, irm, PROMPTS, sequences=outputs.sequences[:1],
                                   **kwargs)


# --- patching --------------------------------------------------------------------------------

def test_patching_the_only_pushed_index_restores_all_and_random_ones_nothing(tiny_model):
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="linear", zero_init_output=True)
    with torch.no_grad():
        irm.out.bias.view(4, 64)[:, K] = 3.0
    result = irm_lens.patch_neuron(tiny_model, irm, K, PROMPTS, target="irm", n_random=3,
                                   progress=False)
    table = result.table
    target_all = table[(table["kind"] == "target") & (table["layer"] == -1)]
    assert target_all["effect"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    rand = table[table["kind"] == "random"]
    assert rand["effect"].abs().max() < 1e-5
    per_layer = table[(table["kind"] == "target") & (table["layer"] >= 0)]
    assert len(per_layer) == 2 * 4
    summary = result.summary()
    assert (summary["random_at_least_target"] == 0).all()


def test_resid_patching_at_the_last_layer_is_exact_when_only_that_index_differs(tiny_model):
    last = tiny_model.cfg.n_layers - 1
    irm = irm_lens.IRM.for_model(tiny_model, layers=[last], preset="linear", zero_init_output=True)
    with torch.no_grad():
        irm.out.bias[K] = 3.0
    result = irm_lens.patch_neuron(tiny_model, irm, K, PROMPTS, target="resid", layers=[last],
                                   n_random=2, progress=False)
    table = result.table
    target = table[(table["kind"] == "target") & (table["layer"] == last)]
    assert target["effect"].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert table[table["kind"] == "random"]["effect"].abs().max() < 1e-4


@pytest.mark.parametrize("target", ["irm", "resid"])
def test_single_layer_patches_from_their_layer_equal_whole_model_runs(tiny_model, target):
    """The per-layer fast path (start from the cached residual, unembed the scored rows) against
    the same patches run through the whole model under inject / hook conditions: the same
    log-probabilities to float rounding (the ends bitwise), and the patches really differ from
    each other and from the two ends of the gap."""
    from irm_lens.analysis import patching
    from irm_lens.analysis.conditions import score_conditions, text_batches

    torch.manual_seed(1)
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    with torch.no_grad():
        irm.out.bias.normal_(0, 0.5)
    batches = text_batches(tiny_model, PROMPTS * 3, batch_size=4)  # two batches, the last short
    layers = range(tiny_model.cfg.n_layers)
    patches = [(d, layer, i) for d in patching.DIRECTIONS for layer in layers for i in (K, 3)]
    fast = patching._single_layer_scores(tiny_model, irm, batches, patches, target, False)
    make = patching._irm_patch if target == "irm" else patching._resid_patch
    conditions = {f"{d}/{layer}/{i}": make(tiny_model, irm, i, (layer,), d) for d, layer, i in patches}
    conditions["unsteered"] = lambda ids: contextlib.nullcontext()
    conditions["steered"] = lambda ids: irm_lens.inject(tiny_model, irm)
    slow = score_conditions(tiny_model, batches, conditions, progress=False)
    slow = slow.set_index("condition")["logprob"].to_dict()
    assert fast.keys() == slow.keys()
    assert [fast[k] for k in ("unsteered", "steered")] == [slow[k] for k in ("unsteered", "steered")]
    assert fast == {k: pytest.approx(v, rel=1e-6, abs=1e-7) for k, v in slow.items()}
    assert len(set(fast.values())) == len(patches) + 2
    gaps = sorted(abs(fast[k] - slow[k]) for k in fast)
    assert gaps[-1] < 1e-6 < min(abs(a - b) for a in fast.values() for b in fast.values() if a != b)


# --- ablation --------------------------------------------------------------------------------

def test_zero_ablation_at_one_layer_changes_only_that_index_there(tiny_model):
    text = PROMPTS[0]
    clean = resid(tiny_model, text, 1)
    with irm_lens.ablate(tiny_model, K, layers=[1]):
        ablated = resid(tiny_model, text, 1)
        earlier = resid(tiny_model, text, 0)
    assert (ablated[:, K] == 0).all()
    others = [i for i in range(64) if i != K]
    torch.testing.assert_close(ablated[:, others], clean[:, others])
    torch.testing.assert_close(earlier, resid(tiny_model, text, 0))
    torch.testing.assert_close(resid(tiny_model, text, 1), clean)  # hooks gone on exit


def test_mean_and_resample_ablation_use_the_reference_values(tiny_model):
    reference = PROMPTS
    pool = torch.cat([resid(tiny_model, t, 2)[:, K] for t in reference])
    with irm_lens.ablate(tiny_model, K, layers=[2], mode="mean", reference=reference):
        meaned = resid(tiny_model, "Something else entirely.", 2)
    torch.testing.assert_close(meaned[:, K], torch.full_like(meaned[:, K], float(pool.mean())))
    with irm_lens.ablate(tiny_model, K, layers=[2], mode="resample", reference=reference):
        drawn = resid(tiny_model, "Something else entirely.", 2)[:, K]
    assert all(torch.isclose(pool, v, atol=1e-5).any() for v in drawn)


def test_ablation_survives_run_with_cache_and_is_removed_after_an_exception(tiny_model):
    tokens = tiny_model.to_tokens(PROMPTS[1])
    name = get_act_name("resid_post", 3)
    with pytest.raises(RuntimeError, match="boom"):
        with irm_lens.ablate(tiny_model, K):
            _, cache = tiny_model.run_with_cache(tokens, names_filter=name)
            assert (cache[name][..., K] == 0).all()
            raise RuntimeError("boom")
    assert all(not tiny_model.hook_dict[n].fwd_hooks for n in tiny_model.hook_dict)


def test_ablation_entered_before_inject_still_removes_the_irms_push(tiny_model):
    irm = planted_irm(tiny_model, K)
    with irm_lens.ablate(tiny_model, K, layers=[1]), irm_lens.inject(tiny_model, irm):
        ablated = resid(tiny_model, PROMPTS[0], 1)
    assert (ablated[:, K] == 0).all()


def _hand_loss(model, texts, *contexts) -> float:
    """Token-weighted mean loss of ``texts``, one text at a time, inside ``contexts``."""
    data = tokenize_texts(model, texts, max_length=64)
    total, count = 0.0, 0.0
    with contextlib.ExitStack() as stack, torch.no_grad():
        for context in contexts:
            stack.enter_context(context)
        for i in range(len(data)):
            n = int(data.attention_mask[i].sum())
            ids, mask = data.input_ids[i : i + 1, :n], data.loss_mask[i : i + 1, :n]
            w = float(mask[:, 1:].sum())
            total += float(masked_lm_loss(model(ids), ids, mask)) * w
            count += w
    return total / count


def test_measured_ablation_matches_a_hand_computed_loss(tiny_model):
    result = irm_lens.measure_ablation(tiny_model, K, texts=PROMPTS, n_random=3, progress=False)
    clean = _hand_loss(tiny_model, PROMPTS)
    ablated = _hand_loss(tiny_model, PROMPTS, irm_lens.ablate(tiny_model, K))
    target = result.table.iloc[0]
    assert target["kind"] == "target" and target["index"] == K
    assert result.baseline["loss"] == pytest.approx(clean, rel=1e-5)
    assert target["delta_loss"] == pytest.approx(ablated - clean, rel=1e-4, abs=1e-6)
    assert (result.table["kl"] >= -1e-7).all() and target["kl"] > 0
    assert len(result.table) == 4 and set(result.summary()["measure"]) == {"delta_loss", "kl"}


def test_measured_ablation_under_an_irm_reports_the_gain_undone(tiny_model):
    irm = planted_irm(tiny_model, K)
    result = irm_lens.measure_ablation(tiny_model, K, texts=PROMPTS, irm=irm, n_random=2,
                                       progress=False)
    clean = _hand_loss(tiny_model, PROMPTS)
    steered = _hand_loss(tiny_model, PROMPTS, irm_lens.inject(tiny_model, irm))
    both = _hand_loss(tiny_model, PROMPTS, irm_lens.inject(tiny_model, irm),
                      irm_lens.ablate(tiny_model, K))
    target = result.table.iloc[0]
    assert result.baseline["irm_loss"] == pytest.approx(steered, rel=1e-5)
    assert target["irm_loss"] == pytest.approx(both, rel=1e-5)
    assert target["irm_delta_loss"] == pytest.approx(both - steered, rel=1e-4, abs=1e-6)
    assert target["irm_gain_undone"] == pytest.approx((both - steered) / (clean - steered),
                                                      rel=1e-3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(neuron=st.integers(0, 63), layer=st.integers(0, 3), mode=st.sampled_from(["zero", "mean"]))
def test_ablation_touches_only_the_chosen_index_at_the_chosen_layer(tiny_model, neuron, layer, mode):
    text = PROMPTS[2]
    clean = resid(tiny_model, text, layer)
    with irm_lens.ablate(tiny_model, neuron, layers=[layer], mode=mode, reference=PROMPTS[:2]):
        ablated = resid(tiny_model, text, layer)
    others = [i for i in range(64) if i != neuron]
    torch.testing.assert_close(ablated[:, others], clean[:, others])
    assert ablated[:, neuron].unique().numel() == 1  # one constant: 0 or the reference mean


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100), shift=st.floats(-5, 5))
def test_striation_score_ignores_scale_and_shift(seed, scale, shift):
    m = torch.rand(5, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = irm_lens.striation_score(m, n_shuffles=5)
    b = irm_lens.striation_score(m * scale + shift, n_shuffles=5)
    assert b.neuron_share == pytest.approx(a.neuron_share, rel=1e-6)
    assert b.layer_share == pytest.approx(a.layer_share, rel=1e-6, abs=1e-9)


def test_measured_ablation_scores_the_emotion_of_steered_generations(tiny_model, monkeypatch):
    from irm_lens.analysis import ablation as ablation_module
    from irm_lens.generation import generate_continuations

    def planted_scores(texts):  # a deterministic "anger" of each text, read off its letters
        return pd.DataFrame({"anger": [sum(map(ord, t)) % 97 / 97 for t in texts]})

    monkeypatch.setattr(ablation_module, "emotion_scores", planted_scores)
    irm = planted_irm(tiny_model, K)
    result = irm_lens.measure_ablation(tiny_model, K, texts=PROMPTS, irm=irm, alignment="anger",
                                       n_random=2, generate=True, n_prompts=3, max_new_tokens=4,
                                       progress=False)
    prompts = irm_lens.neutral_prompts(3)

    def anger(*contexts) -> float:  # the same generations, by hand
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            conts = generate_continuations(tiny_model, prompts, intervention=irm,
                                           max_new_tokens=4, seed=0)
        return float(planted_scores([c.text for c in conts])["anger"].mean())

    assert result.baseline["emotion"] == pytest.approx(anger())
    for row in result.table.itertuples():
        expected = anger(irm_lens.ablate(tiny_model, row.index))
        assert row.emotion == pytest.approx(expected)
        assert row.delta_emotion == pytest.approx(expected - anger())
    assert "delta_emotion" in set(result.summary()["measure"])
    with pytest.raises(irm_lens.ConfigError, match="generate=True needs"):
        irm_lens.measure_ablation(tiny_model, K, texts=PROMPTS, generate=True)
