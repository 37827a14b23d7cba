"""The norm-scale split on tiny models: the paths add up to the total, match a first-order
(forward-mode autograd) split at a small push, vanish where they must, and bad inputs are
refused with messages that say what to give."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import PROMPTS, planted_irm
from transformer_lens.utilities import get_act_name

import irm_lens
from irm_lens.analysis import normscale
from irm_lens.analysis.conditions import text_batches
from irm_lens.analysis.normscale import NormScaleSplit, norm_scale_split
from irm_lens.components import FastRMSNorm
from irm_lens.errors import ConfigError, NeuronIndexError
from irm_lens.hooks import permanent_hooks
from irm_lens.losses import masked_lm_loss

K = 7
LAYER = 1
QUIET = dict(progress=False)


def planted_channel(model, index: int, value: float, weight: float | None = None):
    """Give ``index`` a large value on every token (through the embedding) and, when given,
    the RMSNorm weight ``weight`` in every norm."""
    with torch.no_grad():
        model.embed.W_E[:, index] = value
        if weight is not None:
            for block in model.blocks:
                block.ln1.w[index] = weight
                block.ln2.w[index] = weight
            model.ln_final.w[index] = weight
    return model


@pytest.fixture
def fresh_model(tiny_llama_dir):
    return irm_lens.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def eager_channel_model(tiny_llama_dir):
    """Eager attention (forward-mode autograd has no fused-attention rule) and, at K, a channel
    like Llama-2-7B's 1512: ~50x the typical value, read faintly by every norm (weight 0.05),
    so that both paths of a push on K are sizeable."""
    model = irm_lens.load_model(tiny_llama_dir, device="cpu", attention="eager")
    return planted_channel(model, K, 8.0, weight=0.05)


def one_batch(model):
    ids, _, loss_mask = text_batches(model, PROMPTS, batch_size=len(PROMPTS))[0]
    return ids, loss_mask


def plain_loss(model, ids, loss_mask, *hooks):
    """The mean next-token loss of an ordinary forward pass (no scale hooks: FastRMSNorm's own
    computation) under ``hooks``."""
    with torch.no_grad(), permanent_hooks(model, list(hooks)):
        return float(masked_lm_loss(model(ids), ids, loss_mask))


def rows(table, index, path):
    return table[(table["index"] == index) & (table["path"] == path)].iloc[0]


# --- the split adds up -----------------------------------------------------------------------

@pytest.mark.parametrize("delta", [0.05, 1.0, 4.0])
def test_paths_add_up_to_the_total_and_the_total_is_the_plain_pushed_run(tiny_model, delta):
    split = norm_scale_split(tiny_model, K, PROMPTS, layer=LAYER, delta=delta, n_random=2, **QUIET)
    table = split.table
    for index in table["index"].unique():
        parts = {p: rows(table, index, p) for p in normscale.PATHS}
        total = parts["total"]
        summed = sum(parts[p]["delta_loss"] for p in ("direct", "norm_scale", "remainder"))
        assert summed == pytest.approx(total["delta_loss"], rel=1e-12, abs=1e-15)
        shares = sum(parts[p]["logit_share"] for p in ("direct", "norm_scale", "remainder"))
        assert shares == pytest.approx(1.0, abs=1e-9)
        assert total["logit_share"] == pytest.approx(1.0, abs=1e-12)
    # The total is what an ordinary forward pass under the same push does.
    ids, loss_mask = one_batch(tiny_model)
    hook = (get_act_name("resid_post", LAYER), _push_hook(K, delta), False)
    expected = plain_loss(tiny_model, ids, loss_mask, hook) - plain_loss(tiny_model, ids, loss_mask)
    assert rows(table, K, "total")["delta_loss"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert split.loss_clean == pytest.approx(plain_loss(tiny_model, ids, loss_mask), rel=1e-5)
    assert rows(table, K, "total")["logit_change"] > 0


def _push_hook(index, delta):
    def hook(resid, hook):
        resid = resid.clone()
        resid[..., index] += delta * resid.pow(2).mean(-1).sqrt()
        return resid
    return hook


def test_the_remainder_is_second_order(tiny_model):
    small, large = (norm_scale_split(tiny_model, K, PROMPTS, layer=0, delta=d, n_random=0,
                                     **QUIET).table for d in (0.01, 2.0))
    # logit_change scales with the push; the remainder with its square: its share shrinks ~delta
    share_small = abs(rows(small, K, "remainder")["logit_share"])
    share_large = abs(rows(large, K, "remainder")["logit_share"])
    assert share_large > 1e-3
    assert share_small < share_large / 20


# --- against autograd ------------------------------------------------------------------------

def first_order_changes(model, ids, loss_mask, index, layer):
    """d/d(eps) of the centred scored logits and of the loss for a push of eps x RMS at
    ``index``, along the total path F(p, S(p)), the direct path F(p, S(0)) and the norm-scale
    path F(0, S(p)), by forward-mode autograd (the scales a run uses held through hook_scale)."""
    names = normscale._scale_names(model)
    resid_name = get_act_name("resid_post", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[resid_name, *names])
    rms = cache[resid_name].pow(2).mean(-1).sqrt()  # [batch, pos]
    clean_scales = {name: cache[name] for name in names}

    def push(eps):
        def hook(resid, hook):
            resid = resid.clone()
            resid[..., index] = resid[..., index] + eps * rms
            return resid
        return (resid_name, hook)

    def run(eps, held=None, pushed=True):
        """Logits and the scales used, the push on (or not), the scales held (or free)."""
        used = {}

        def scale_hook(scale, hook):
            used[hook.name] = scale if held is None else held[hook.name]
            return used[hook.name]
        hooks = [push(eps)] if pushed else []
        hooks += [(name, scale_hook) for name in names]
        return model.run_with_hooks(ids, fwd_hooks=hooks), used

    out = {}
    with fwAD.dual_level():
        eps = fwAD.make_dual(torch.tensor(0.0), torch.tensor(1.0))
        total, pushed_scales = run(eps)
        direct, _ = run(eps, held=clean_scales)
        norm_scale, _ = run(eps, held=pushed_scales, pushed=False)
        for path, logits in (("total", total), ("direct", direct), ("norm_scale", norm_scale)):
            loss = masked_lm_loss(logits, ids, loss_mask)
            scored = logits[:, :-1][loss_mask[:, 1:].bool()]
            tangent = fwAD.unpack_dual(scored).tangent.double()
            out[path] = (tangent - tangent.mean(-1, keepdim=True),
                         float(fwAD.unpack_dual(loss).tangent))
    return out


def test_first_order_paths_sum_to_the_total(eager_channel_model):
    """The chain rule through the scales: every norm's scale is among the hooked ones, so the
    direct and norm-scale tangents add up to the total one (and both are far from zero)."""
    ids, loss_mask = one_batch(eager_channel_model)
    d = first_order_changes(eager_channel_model, ids, loss_mask, K, LAYER)
    torch.testing.assert_close(d["direct"][0] + d["norm_scale"][0], d["total"][0],
                               rtol=1e-4, atol=1e-5)
    assert d["direct"][1] + d["norm_scale"][1] == pytest.approx(d["total"][1], rel=1e-4)
    scale = d["total"][0].norm()
    assert d["direct"][0].norm() > 0.1 * scale and d["norm_scale"][0].norm() > 0.1 * scale


def test_hook_split_at_a_small_push_matches_autograd(eager_channel_model):
    model, delta = eager_channel_model, 1e-2
    ids, loss_mask = one_batch(model)
    d = first_order_changes(model, ids, loss_mask, K, LAYER)
    clean_logits, clean_scales = normscale._scale_run(model, ids)
    clean, _ = normscale._scored(clean_logits, ids, loss_mask)
    push = lambda: normscale._resid_push(model, K, LAYER, delta)  # noqa: E731
    runs = normscale._path_runs(model, ids, push, clean_scales)
    changes = normscale._path_changes(
        clean, {k: normscale._scored(v, ids, loss_mask)[0] for k, v in runs.items()})
    for path in ("total", "direct", "norm_scale"):
        torch.testing.assert_close(changes[path] / delta, d[path][0], rtol=0.02, atol=2e-3)
    # The public entry point's shares are those of the first-order split.
    split = norm_scale_split(model, K, PROMPTS, layer=LAYER, delta=delta, n_random=0,
                             batch_size=len(PROMPTS), **QUIET)
    total = d["total"][0]
    for path in ("direct", "norm_scale"):
        expected = float((d[path][0] * total).sum() / (total * total).sum())
        assert rows(split.table, K, path)["logit_share"] == pytest.approx(expected, abs=0.01)
    assert split.norm_scale_share > 0.5  # a channel like 1512 steers through the normaliser
    assert rows(split.table, K, "total")["delta_loss"] / delta == pytest.approx(
        d["total"][1], rel=0.05, abs=1e-3)


# --- where the paths vanish ------------------------------------------------------------------

def test_holding_the_clean_scales_without_a_push_changes_nothing(fresh_model):
    assert any(isinstance(m, FastRMSNorm) for m in fresh_model.modules())
    ids, _ = one_batch(fresh_model)
    clean, scales = normscale._scale_run(fresh_model, ids)
    held, _ = normscale._scale_run(fresh_model, ids, held=scales)
    assert torch.equal(held, clean)
    # ... and the hold acts (the hooks fire in FastRMSNorm): doubled scales change the logits.
    doubled, used = normscale._scale_run(fresh_model, ids,
                                         held={k: 2 * v for k, v in scales.items()})
    assert not torch.allclose(doubled, clean, atol=1e-3)
    assert torch.equal(used["ln_final.hook_scale"], 2 * scales["ln_final.hook_scale"])
    split = norm_scale_split(fresh_model, K, PROMPTS, delta=0.0, n_random=1, **QUIET)
    assert (split.table[["delta_loss", "logit_change"]] == 0).all().all()


def test_an_index_no_norm_reads_acts_only_through_the_scales(fresh_model):
    planted_channel(fresh_model, K, 6.0, weight=0.0)
    split = norm_scale_split(fresh_model, K, PROMPTS, layer=0, delta=2.0, n_random=4, **QUIET)
    table = split.table
    for column in ("delta_loss", "logit_change"):
        assert rows(table, K, "direct")[column] == 0.0
        assert rows(table, K, "remainder")[column] == 0.0
        assert rows(table, K, "norm_scale")[column] == rows(table, K, "total")[column]
    assert rows(table, K, "total")["logit_change"] > 0.01
    assert split.norm_scale_share == pytest.approx(1.0, abs=1e-12)
    summary = split.summary().set_index("path")
    assert summary.loc["norm_scale", "random_share_max"] < 0.5
    assert summary.loc["norm_scale", "random_at_least_target"] == 0
    assert "steers through the normaliser" in split.finding()
    assert split.ln_final_w == 0.0


def test_a_push_by_the_irm_is_its_output_at_the_index(fresh_model):
    irm = planted_irm(fresh_model, K, value=2.0)
    with torch.no_grad():  # only K: the planted IRM's extra push at K+1 on layer 0 is removed
        irm.out.bias.view(irm.config.n_injected, -1)[0, K + 1] = 0.0
    split = norm_scale_split(fresh_model, K, PROMPTS, irm=irm, n_random=1, **QUIET)
    assert split.pushed_by == "irm" and split.layers == tuple(irm.config.layers)
    ids, loss_mask = one_batch(fresh_model)
    with torch.no_grad(), irm_lens.inject(fresh_model, irm):
        steered = float(masked_lm_loss(fresh_model(ids), ids, loss_mask))
    expected = steered - plain_loss(fresh_model, ids, loss_mask)
    assert rows(split.table, K, "total")["delta_loss"] == pytest.approx(expected, rel=1e-3)
    random = split.table[split.table["kind"] == "random"]
    assert (random["logit_change"] == 0).all()  # the IRM pushes nothing there
    assert random["logit_share"].isna().all()
    one = norm_scale_split(fresh_model, K, PROMPTS, irm=irm, layer=2, n_random=0, **QUIET)
    assert one.layers == (2,)
    assert 0 < rows(one.table, K, "total")["logit_change"] < rows(split.table, K, "total")[
        "logit_change"]


# --- bad input -------------------------------------------------------------------------------

def test_bad_neuron_and_layer_are_refused_with_the_valid_range(tiny_model):
    with pytest.raises(NeuronIndexError, match=r"valid indices are 0\.\.63 \(d_model=64\)"):
        norm_scale_split(tiny_model, 64, PROMPTS, **QUIET)
    with pytest.raises(NeuronIndexError, match="an int"):
        norm_scale_split(tiny_model, 1.5, PROMPTS, **QUIET)
    with pytest.raises(NeuronIndexError, match=r"layers 0\.\.3"):
        norm_scale_split(tiny_model, K, PROMPTS, layer=4, **QUIET)
    with pytest.raises(NeuronIndexError, match="Layers are ints"):
        norm_scale_split(tiny_model, K, PROMPTS, layer="1", **QUIET)
    irm = irm_lens.IRM.for_model(tiny_model, layers=[0, 1], preset="linear")
    with pytest.raises(ConfigError, match=r"injects at layers \[0, 1\].*layer=None"):
        norm_scale_split(tiny_model, K, PROMPTS, irm=irm, layer=3, **QUIET)
    with pytest.raises(ConfigError, match="finite number"):
        norm_scale_split(tiny_model, K, PROMPTS, delta=math.nan, **QUIET)
    with pytest.raises(ConfigError, match="0 or more"):
        norm_scale_split(tiny_model, K, PROMPTS, n_random=-1, **QUIET)


def test_a_push_that_diverges_with_the_scales_held_is_refused_not_averaged(tiny_model,
                                                                            capsys):
    # 1e38 RMS: the pushed run renormalises it, the run with the clean scales held overflows
    with pytest.raises(ConfigError, match=r"direct run .* non-finite logits.*smaller delta"):
        norm_scale_split(tiny_model, K, PROMPTS, delta=1e38, n_random=0, progress=True)
    # a log says where it stopped (the clean pass of the first batch), not that it is done
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("norm-scale split: stopped at 1/") and "(DivergentPush)" in last


# --- in the dossier --------------------------------------------------------------------------

def test_explain_says_whether_the_index_steers_through_the_normaliser(fresh_model):
    planted_channel(fresh_model, K, 6.0, weight=0.0)
    dossier = irm_lens.explain(fresh_model, K, prompts=PROMPTS, n_random=3, max_new_tokens=0,
                               **QUIET)
    assert isinstance(dossier.norm_scale, NormScaleSplit)
    summary = dossier.summary()
    assert summary["norm_scale_share"] == pytest.approx(1.0, abs=1e-9)
    assert summary["norm_scale_random_share_max"] < 0.5
    assert "steers through the normaliser" in summary["norm_scale_finding"]
    assert "3 random indices" in summary["norm_scale_finding"]
    plain = irm_lens.explain(fresh_model, 3, prompts=PROMPTS, n_random=2, max_new_tokens=0,
                             norm_scale=False, **QUIET)
    assert plain.norm_scale is None and "norm_scale_share" not in plain.summary()


def test_split_losses_are_cross_entropies_of_the_scored_tokens(tiny_model):
    ids, loss_mask = one_batch(tiny_model)
    logits, _ = normscale._scale_run(tiny_model, ids)
    scored, targets = normscale._scored(logits, ids, loss_mask)
    assert float(F.cross_entropy(scored, targets)) == pytest.approx(
        float(masked_lm_loss(logits, ids, loss_mask)), rel=1e-6)


def test_the_dossier_retries_a_divergent_push_smaller(tiny_model, monkeypatch):
    from irm_lens.analysis import dossier

    tried = []

    def split(model, neuron, *, delta, **kwargs):
        tried.append(delta)
        if delta > 0.005:
            raise normscale.DivergentPush("grew without bound")
        return norm_scale_split(model, neuron, PROMPTS, layer=0, delta=delta, n_random=1, **QUIET)

    monkeypatch.setattr(dossier, "norm_scale_split", split)
    result = dossier._finite_split(tiny_model, K, texts=PROMPTS)
    assert tried == [0.1, 0.01, 0.001] and result.delta == 0.001
    assert "pushed by 0.001 RMS at layer 0" in result.finding()
