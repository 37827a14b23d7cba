"""IRM output collection, striation score, dominant neurons, cross-run comparison, sweeps."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import PROMPTS, planted_irm

import irm_lens
from irm_lens.errors import ConfigError


def test_striation_score_is_one_for_constant_columns_and_zero_for_constant_rows():
    cols = torch.rand(64).repeat(6, 1)  # every layer the same profile over neurons
    rows = torch.rand(6)[:, None].repeat(1, 64)
    s_cols = irm_lens.striation_score(cols, n_shuffles=50)
    s_rows = irm_lens.striation_score(rows, n_shuffles=50)
    assert s_cols.neuron_share == pytest.approx(1.0, abs=1e-9)
    assert s_cols.p_value == pytest.approx(1 / 51)
    assert s_rows.neuron_share == pytest.approx(0.0, abs=1e-9)
    assert s_rows.layer_share == pytest.approx(1.0, abs=1e-9)


def test_striation_score_of_noise_sits_in_its_null():
    noise = torch.rand(8, 64, generator=torch.Generator().manual_seed(1))
    s = irm_lens.striation_score(noise, n_shuffles=200)
    assert s.p_value > 0.01
    assert abs(s.neuron_share - s.null_mean) < 4 * s.null_std
    assert s.neuron_share + s.layer_share + s.residual_share == pytest.approx(1.0)


def test_striation_score_refuses_one_layer_and_constant_matrices():
    with pytest.raises(ConfigError, match="two injected layers"):
        irm_lens.striation_score(torch.rand(1, 10))
    with pytest.raises(ConfigError, match="constant"):
        irm_lens.striation_score(torch.ones(3, 10))


def test_collect_irm_outputs_matches_the_irm_applied_by_hand(tiny_model):
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    out = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=0,
                                       progress=False, per_token=True)
    site = irm.config.read_site
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny_model.to_tokens(prompt)
        _, cache = tiny_model.run_with_cache(tokens, names_filter=site)
        expected = irm(cache[site])[0].detach()  # [pos, layer, neuron]
        assert out.n_tokens[i] == tokens.shape[1]
        torch.testing.assert_close(out.per_token[i], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.per_prompt_mean_abs[i], expected.abs().mean(0))
    weights = torch.tensor(out.n_tokens, dtype=torch.float32)
    manual = (out.per_prompt_mean_abs * (weights / weights.sum())[:, None, None]).sum(0)
    torch.testing.assert_close(out.mean_abs, manual)


def test_collect_irm_outputs_token_sets(tiny_model):
    irm = planted_irm(tiny_model, 7)
    both = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=4, progress=False)
    prompt = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=4,
                                          tokens="prompt", progress=False)
    generated = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=4,
                                             tokens="generated", progress=False)
    assert [a + b for a, b in zip(prompt.n_tokens, generated.n_tokens)] == list(both.n_tokens)
    assert all(n <= 4 for n in generated.n_tokens)
    with pytest.raises(ConfigError):
        irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, tokens="words")


def test_dominant_neurons_find_the_planted_index_with_its_exact_share(tiny_model):
    irm = planted_irm(tiny_model, 7)
    out = irm_lens.collect_irm_outputs(tiny_model, irm, PROMPTS, max_new_tokens=0, progress=False)
    dom = irm_lens.dominant_neurons(out, k=3, n_bootstrap=50)
    bias = irm.out.bias.detach().view(irm.config.n_injected, -1).abs()
    expected_share = float(bias[:, 7].sum() / bias.sum())
    assert dom.top == 7
    assert dom.table["share"].iloc[0] == pytest.approx(expected_share, rel=1e-5)
    assert dom.table["top1_frequency"].iloc[0] == 1.0
    assert dom.indices[1] == 8
    s = irm_lens.striation_score(out, n_shuffles=50)
    assert s.neuron_share > 0.9 and s.p_value < 0.05


def test_compare_runs_says_whether_the_same_index_wins(tiny_model):
    outs = {
        name: irm_lens.collect_irm_outputs(tiny_model, planted_irm(tiny_model, n, layers),
                                           PROMPTS[:2], max_new_tokens=0, progress=False)
        for name, n, layers in [("a", 7, "all"), ("b", 7, "q2"), ("c", 30, "all")]
    }
    same = irm_lens.compare_runs({k: outs[k] for k in ("a", "b")}, k=2)
    assert same.same_top1 and same.pairs["topk_overlap"].iloc[0] == 1.0
    diff = irm_lens.compare_runs(outs, k=2)
    assert not diff.same_top1
    assert diff.consensus.iloc[0].to_dict() == {"top1": 7, "n_runs": 2}
    with pytest.raises(ConfigError):
        irm_lens.compare_runs({"a": outs["a"]})


def test_sweep_runs_grid_names_and_shards(tmp_path):
    runs = irm_lens.sweep_runs(tmp_path, ["anger", "joy"], ["all", "q1"], [False, True], [0, 1])
    assert len(runs) == 16 and len({r.name for r in runs}) == 16
    assert runs[0].name == "anger-all-nol1-s0" and runs[-1].name == "joy-q1-l1-s1"
    sweeps = importlib.import_module("irm_lens.sweeps")
    with pytest.raises(ConfigError, match="shard"):
        sweeps.run_sweep(None, tmp_path, shard=(2, 2))


def test_run_sweep_trains_each_shard_once_and_reuses_finished_runs(tiny_model, tmp_path):
    config = irm_lens.TrainConfig(lr=1e-3, max_steps=2, max_length=16, eval_every=2,
                                  max_val_batches=1, batch_size=4)
    kwargs = dict(alignments=["anger"], layer_sets=["all", "q1"], seeds=[0], config=config,
                  progress=False)
    runs = irm_lens.run_sweep(tiny_model, tmp_path, shard=(0, 2), **kwargs)
    assert [r.done for r in runs] == [True, False]
    runs = irm_lens.run_sweep(tiny_model, tmp_path, shard=(1, 2), **kwargs)
    assert all(r.done for r in runs)
    stamp = runs[0].irm_path.stat().st_mtime_ns
    irm_lens.run_sweep(tiny_model, tmp_path, **kwargs)
    assert runs[0].irm_path.stat().st_mtime_ns == stamp
    assert runs[1].load_irm(tiny_model).config.layers == (0,)
