"""predict_dominant and check_prediction on tiny models whose special index is known."""

from __future__ import annotations

import copy
import random
import string

import pandas as pd
import pytest
import torch

import irm_lens
from irm_lens.analysis.conditions import text_batches
from irm_lens.analysis.prediction import check_prediction, predict_dominant
from irm_lens.cli import main
from irm_lens.errors import ConfigError
from irm_lens.losses import masked_lm_loss

_rng = random.Random(0)
# single letters separated by spaces: every other target token is " "
TEXTS = [" ".join(_rng.choice(string.ascii_lowercase) for _ in range(_rng.randint(6, 14)))
         for _ in range(48)]


def test_consistency_is_the_batch_gradient_ratio_computed_by_hand(tiny_model):
    pred = predict_dominant(tiny_model, TEXTS, batch_size=8, max_length=32, progress=False)
    layer = 2
    grads = []
    for ids, _, loss_mask in text_batches(tiny_model, TEXTS, max_length=32, batch_size=8):
        seen = {}

        def keep(resid, hook):
            resid.retain_grad()
            seen["resid"] = resid

        leaf = torch.zeros(tiny_model.cfg.d_model, requires_grad=True)
        hooks = [("blocks.0.hook_resid_pre", lambda r, hook: r + leaf),
                 (f"blocks.{layer}.hook_resid_post", keep)]
        with tiny_model.hooks(fwd_hooks=hooks):
            masked_lm_loss(tiny_model(ids), ids, loss_mask).backward()
        grads.append(seen["resid"].grad.sum((0, 1)))  # a constant push gets every position's
    grads = torch.stack(grads)
    expected = grads.mean(0).abs() / grads.pow(2).mean(0).sqrt()
    torch.testing.assert_close(pred.consistency[layer], expected, rtol=1e-4, atol=1e-6)
    assert pred.n_batches == 6 and pred.consistency.max() <= 1 + 1e-6
    # the score sums the injected layers; for_layers re-scores without a forward pass
    torch.testing.assert_close(pred.for_layers([1, 3]).scores, pred.consistency[[1, 3]].sum(0))
    with pytest.raises(ConfigError, match="subset"):
        pred.for_layers([9])


def test_an_index_that_promotes_a_frequent_token_is_predicted(tiny_model):
    """Index 5 is (almost) never written, and read only by the space token's logit: a push on it
    raises p(" "), which half the targets are, so every batch's gradient wants it pushed up."""
    model = copy.deepcopy(tiny_model)
    space = model.to_single_token(" ")
    with torch.no_grad():
        model.W_U[5] = 0.0
        model.W_U[5, space] = 8.0
        model.W_E[:, 5] = 0.0
        model.W_O[..., 5] = 0.0
        model.W_out[..., 5] = 0.0
    pred = predict_dominant(model, TEXTS, batch_size=2, max_length=32, progress=False)
    last = model.cfg.n_layers - 1
    assert pred.top == 5 and pred.for_layers([last]).top == 5
    assert pred.push_sign[5] == 1
    assert "predicted dominant index 5" in pred.summary()
    unplanted = predict_dominant(tiny_model, TEXTS, batch_size=2, max_length=32, progress=False)
    assert unplanted.top != 5


def test_a_planted_massive_activation_tops_the_magnitude_baseline(tiny_model):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.W_E[:, 11] = 60.0  # every token carries a huge value at index 11
    pred = predict_dominant(model, TEXTS, batch_size=8, max_length=32, progress=False)
    assert int(pred.magnitude_scores.argmax()) == 11
    assert pred.table(3).columns.tolist()[:4] == ["rank", "neuron", "score", "x_median"]
    assert int(pred.table(model.cfg.d_model).set_index("neuron").loc[11, "magnitude_rank"]) == 1


def test_check_prediction_scores_rankings_against_observed_mass(tiny_model):
    pred = predict_dominant(tiny_model, TEXTS, batch_size=8, max_length=32, progress=False)
    perfect = pred.scores / pred.scores.sum()
    reversed_ = (pred.scores.max() - pred.scores) / (pred.scores.max() - pred.scores).sum()
    check = check_prediction({"same": pred, "opposite": pred}, {"same": perfect, "opposite": reversed_},
                             k=5, n_random=200)
    runs = check.runs.set_index(["run", "ranking"])
    assert runs.loc[("same", "predicted"), "top1"] == 1
    assert runs.loc[("same", "predicted"), "topk_overlap"] == 5
    assert runs.loc[("same", "predicted"), "spearman"] == pytest.approx(1.0)
    assert runs.loc[("opposite", "predicted"), "spearman"] == pytest.approx(-1.0)
    assert runs.loc[("opposite", "predicted"), "observed_rank_of_top"] == tiny_model.cfg.d_model
    assert runs.loc[("same", "random"), "topk_overlap"] < 2  # chance: k^2 / d_model = 0.39
    assert check.hits() == 1
    with pytest.raises(ConfigError, match="missing"):
        check_prediction({}, {"run": perfect})


def test_predict_refuses_too_few_texts_and_bad_k(tiny_model):
    with pytest.raises(ConfigError, match="at least 2 x batch_size"):
        predict_dominant(tiny_model, TEXTS[:5], progress=False)
    with pytest.raises(ConfigError, match="k must be"):
        predict_dominant(tiny_model, TEXTS, k=0, progress=False)
    with pytest.raises(irm_lens.NeuronIndexError):
        predict_dominant(tiny_model, TEXTS, layers=[7], progress=False)


def test_predict_command_and_its_validation_on_a_sweep(tiny_llama_dir, tmp_path, capsys):
    from test_analysis_cli import tiny_sweep

    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    texts = tmp_path / "texts.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(texts, index=False)
    assert main(["predict", str(tiny_llama_dir), "--device", "cpu", "--texts", str(texts),
                 "--max-length", "32", "--out", str(tmp_path / "pred")]) == 0
    assert "predicted dominant index" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "pred" / "prediction.csv")
    assert len(table) == 64 and table["rank"].tolist() == list(range(1, 65))

    sweep = tiny_sweep(model, tmp_path / "sweep", "anger", "all,q2")
    capsys.readouterr()
    assert main(["predict", *model, "--validate", str(sweep), "--alignments", "anger",
                 "--layer-sets", "all,q2", "--seeds", "0", "--n-texts", "32", "--n-prompts", "3",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "check")]) == 0
    assert "predicted top index = observed top index in" in capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "check" / "summary.csv")
    assert summary["ranking"].tolist() == ["predicted", "magnitude", "random"]
    assert (summary["n_runs"] == 2).all()
    # an unfinished sweep is refused with the command that trains it
    assert main(["predict", *model, "--validate", str(tmp_path / "empty")]) == 2
    assert "irm-lens sweep --out" in capsys.readouterr().err
