"""dominance_curve: the dominant neuron along a run, read from every kept checkpoint."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import load_file

import irm_lens
from irm_lens.analysis.dynamics import DominanceCurve, dominance_curve
from irm_lens.errors import ConfigError
from irm_lens.report.figures import dominance_curve_figure
from irm_lens.train import TrainConfig

train_module = importlib.import_module("irm_lens.train")  # irm_lens.train is the function

TEXTS = [f"Sentence {i} talks about {w} things, again {w}."
         for i in range(40) for w in ("red", "blue")]
# One epoch is 18 steps: the only validation is the last step's, so the best IRM is the final one.
CONFIG = TrainConfig(batch_size=4, max_length=24, max_steps=6, checkpoint_every=2,
                     keep_checkpoints=0, lr=1e-3)
COLLECT = dict(max_new_tokens=2, chat=False)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(tiny_model, layers="all", preset="small")
    out_dir = tmp_path_factory.mktemp("dynamics_run")
    result = irm_lens.train(tiny_model, irm, TEXTS, CONFIG, out_dir=out_dir, progress=False)
    assert result.best_step == result.steps == 6
    return out_dir, result


@pytest.fixture(scope="module")
def curve(tiny_model, run):
    return dominance_curve(tiny_model, run[0], PROMPTS, progress=False, n_bootstrap=50,
                           n_shuffles=20, **COLLECT)


def test_keep_checkpoints_zero_keeps_every_checkpoint_and_negative_is_refused(run):
    names = sorted(p.name for p in (run[0] / "checkpoints").glob("*.safetensors"))
    assert names == [f"step-{s:07d}.safetensors" for s in (2, 4, 6)]
    with pytest.raises(ConfigError, match="non-negative int"):
        TrainConfig(keep_checkpoints=-1)


def test_the_curve_reads_every_checkpoint_in_every_view(curve):
    assert curve.steps == [2, 4, 6]
    assert len(curve.table) == 9
    assert set(curve.table["view"]) == {"abs", "signed", "bias"}
    assert curve.d_model == 64 and curve.layers == (0, 1, 2, 3)
    assert curve.table["striation"].between(0, 1).all()  # four layers: the score applies
    assert (curve.table["top"] != curve.table["runner_up"]).all()


def test_last_step_abs_view_is_dominant_neurons_of_the_final_irm(tiny_model, run, curve):
    final = run[1].irm  # trained in memory, never read from a checkpoint
    outputs = irm_lens.collect_irm_outputs(tiny_model, final, PROMPTS, progress=False, **COLLECT)
    dom = irm_lens.dominant_neurons(outputs, k=2, n_bootstrap=50)
    last = curve.view("abs").iloc[-1]
    assert last["step"] == 6
    assert last["top"] == dom.top
    assert last["runner_up"] == dom.indices[1]
    assert last["share"] == pytest.approx(dom.table["share"].iloc[0], rel=1e-9)
    assert last["ratio_to_uniform"] == pytest.approx(dom.table["share"].iloc[0] * 64, rel=1e-9)
    assert last["top1_frequency"] == dom.table["top1_frequency"].iloc[0]
    # an earlier checkpoint is another IRM: its outputs differ
    assert curve.view("abs")["share"].nunique() == 3
    # the curve keeps each checkpoint's per-index mass: the last one is the final IRM's
    assert curve.mass.shape == (3, 64)
    torch.testing.assert_close(curve.mass_at(6), outputs.neuron_mass.float())
    assert int(curve.mass_at(6).argmax()) == dom.top
    assert not torch.equal(curve.mass_at(2), curve.mass_at(6))
    with pytest.raises(ConfigError, match=r"step 5 is not a checkpoint .*\[2, 4, 6\]"):
        curve.mass_at(5)


def test_signed_view_ranks_the_token_mean_of_signed_outputs(tiny_model, run, curve):
    outputs = irm_lens.collect_irm_outputs(tiny_model, run[1].irm, PROMPTS, per_token=True,
                                           progress=False, **COLLECT)
    pooled = torch.cat(outputs.per_token).double().mean(0).abs()  # [layer, neuron]
    mass = pooled.sum(0)
    shares = mass / mass.sum()
    top2 = shares.topk(2)
    last = curve.view("signed").iloc[-1]
    assert last["top"] == int(top2.indices[0]) and last["runner_up"] == int(top2.indices[1])
    assert last["share"] == pytest.approx(float(top2.values[0]), rel=1e-5)
    second = float(top2.values[1])
    assert last["margin"] == pytest.approx((float(top2.values[0]) - second) / second, rel=1e-4)


def test_bias_view_is_the_output_bias_of_each_checkpoint(run, curve):
    bias_rows = curve.view("bias")
    for step, row in zip((2, 4, 6), bias_rows.itertuples()):
        tensors = load_file(run[0] / "checkpoints" / f"step-{step:07d}.safetensors")
        bias = tensors["irm.out.bias"].double().view(4, 64).abs()  # [layer, neuron]
        shares = bias.sum(0) / bias.sum()
        order = shares.argsort(descending=True)
        top, second = float(shares[order[0]]), float(shares[order[1]])
        assert (row.step, row.top, row.runner_up) == (step, int(order[0]), int(order[1]))
        assert row.share == pytest.approx(top, rel=1e-6)
        assert row.ratio_to_uniform == pytest.approx(top * 64, rel=1e-6)
        assert row.margin == pytest.approx((top - second) / second, rel=1e-5)
        expected = irm_lens.striation_score(bias.float(), n_shuffles=20).neuron_share
        assert row.striation == pytest.approx(expected, rel=1e-5)
    assert bias_rows["share"].nunique() == 3  # the bias moved between checkpoints


def test_a_tracked_index_gets_its_share_and_rank_in_every_view(tiny_model, run, curve):
    last = curve.table[curve.table["step"] == 6].set_index("view")
    runner_up = int(last.loc["signed", "runner_up"])
    tracked = dominance_curve(tiny_model, run[0], PROMPTS, steps=[6], track=runner_up,
                              progress=False, n_bootstrap=50, n_shuffles=20, **COLLECT)
    rows = tracked.table.set_index("view")
    assert (rows["tracked"] == runner_up).all()
    assert rows.loc["signed", "tracked_rank"] == 2
    # the share of the runner-up, from margin = (top - second) / second
    signed = last.loc["signed"]
    assert rows.loc["signed", "tracked_share"] == pytest.approx(
        signed["share"] / (1 + signed["margin"]), rel=1e-6)
    for view in ("abs", "bias"):  # the same index, ranked by another view's shares
        top = int(last.loc[view, "top"])
        assert (rows.loc[view, "tracked_rank"] == 1) == (top == runner_up)
        assert 0 < rows.loc[view, "tracked_share"] <= last.loc[view, "share"]
    top_abs = int(last.loc["abs", "top"])
    at_top = dominance_curve(tiny_model, run[0], PROMPTS, steps=[6], track=top_abs,
                             progress=False, n_bootstrap=50, n_shuffles=20, **COLLECT)
    row = at_top.table.set_index("view").loc["abs"]
    assert row["tracked_rank"] == 1  # the abs view's share is dominant_neurons' share
    assert row["tracked_share"] == pytest.approx(row["share"], rel=1e-6)
    with pytest.raises(ConfigError, match="track must be a residual index in 0..63"):
        dominance_curve(tiny_model, run[0], PROMPTS, track=64, progress=False)


def test_the_curve_never_trains(tiny_model, run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dominance_curve trained")

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr(train_module, "_train", refuse)
    monkeypatch.setattr(train_module._Loop, "step", refuse)
    monkeypatch.setattr(torch.optim.Adam, "step", refuse)
    files = sorted((run[0] / "checkpoints").iterdir())
    before = {p: p.read_bytes() for p in files}
    curve = dominance_curve(tiny_model, run[0], PROMPTS, steps=[2, 6], progress=False,
                            n_bootstrap=10, n_shuffles=5, **COLLECT)
    assert curve.steps == [2, 6]
    assert sorted((run[0] / "checkpoints").iterdir()) == files
    assert all(p.read_bytes() == data for p, data in before.items())


def test_a_run_without_checkpoints_says_how_to_keep_them(tiny_model, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for run_dir in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ConfigError, match="no training checkpoints.*keep_checkpoints=0"):
            dominance_curve(tiny_model, run_dir, PROMPTS, progress=False)


def test_unknown_steps_list_the_steps_on_disk(tiny_model, run):
    with pytest.raises(ConfigError, match=r"steps \[3\] .*\[2, 4, 6\]"):
        dominance_curve(tiny_model, run[0], PROMPTS, steps=[3, 4], progress=False)


def test_settled_step_is_where_the_top_index_stops_changing():
    table = pd.DataFrame(dict(step=[10, 20, 30, 40], view="abs", top=[7, 5, 7, 7]))
    curve = DominanceCurve(table, run_dir=None, layers=(0, 1), d_model=8, prompts=(),
                           mass=torch.zeros(0, 8))
    assert curve.settled_step("abs") == 30
    same = DominanceCurve(table.assign(top=3), run_dir=None, layers=(0, 1), d_model=8,
                          prompts=(), mass=torch.zeros(0, 8))
    assert same.settled_step() == 10
    with pytest.raises(ConfigError, match="view must be one of"):
        curve.view("mean")


def _curve_of(masses: dict[int, list[float]]) -> DominanceCurve:
    """A curve made by hand: only its steps and masses matter to cross_run_agreement."""
    table = pd.DataFrame(dict(step=list(masses), view="abs"))
    return DominanceCurve(table, run_dir=None, layers=(0,), d_model=6, prompts=(),
                          mass=torch.tensor(list(masses.values())))


def test_cross_run_agreement_against_a_hand_computation():
    a = _curve_of({10: [6, 5, 4, 3, 2, 1], 20: [1, 2, 3, 4, 5, 6], 30: [0, 0, 0, 0, 0, 1]})
    b = _curve_of({10: [6, 5, 4, 3, 2, 1], 20: [6, 5, 4, 3, 2, 1]})  # no step 30
    c = _curve_of({10: [1, 2, 3, 4, 5, 6], 20: [1, 2, 3, 5, 4, 6]})
    table = irm_lens.cross_run_agreement({"a": a, "b": b, "c": c}, k=2).set_index("step")
    assert list(table.index) == [10, 20]  # the steps every curve has
    # step 10: a and b rank identically (+1), c reversed (-1 with each): mean (1 - 1 - 1) / 3
    assert table.loc[10, "spearman"] == pytest.approx(-1 / 3)
    assert (table.loc[10, "modal_top"], table.loc[10, "modal_count"]) == (0, 2)
    # top-2 sets {0, 1}, {0, 1}, {5, 4}: overlaps 2, 0, 0
    assert table.loc[10, "topk_overlap"] == pytest.approx(2 / 3)
    # step 20: a and c share index 5 at the top; c swaps a's 2nd and 3rd (rho 1 - 6*2/210),
    # b is a reversed: rho(a, b) = -1, rho(b, c) = -(1 - 12/210)
    assert (table.loc[20, "modal_top"], table.loc[20, "modal_count"]) == (5, 2)
    assert table.loc[20, "spearman"] == pytest.approx((-1 + (1 - 12 / 210) - (1 - 12 / 210)) / 3)
    # top-2 sets {5, 4}, {0, 1}, {5, 3}: overlaps 0, 1, 0
    assert table.loc[20, "topk_overlap"] == pytest.approx(1 / 3)
    assert (table["topk_overlap_chance"] == 4 / 6).all() and (table["n_runs"] == 3).all()
    with pytest.raises(ConfigError, match="at least two curves"):
        irm_lens.cross_run_agreement({"a": a})
    wider = DominanceCurve(pd.DataFrame(dict(step=[10], view="abs")), None, (0,), 7, (),
                           torch.ones(1, 7))
    with pytest.raises(ConfigError, match=r"widths \[6, 7\]"):
        irm_lens.cross_run_agreement({"a": a, "w": wider})


def test_figure_draws_both_panels_for_every_view(curve):
    fig = dominance_curve_figure(curve)
    assert len(fig.data) == 6
    assert {t.name for t in fig.data} == {"abs", "signed", "bias"}
    abs_ratio = next(t for t in fig.data if t.name == "abs" and t.xaxis == "x")
    assert list(abs_ratio.x) == [2, 4, 6]
    assert list(abs_ratio.y) == pytest.approx(list(curve.view("abs")["ratio_to_uniform"]))


def test_cli_train_exposes_keep_checkpoints():
    from irm_lens import cli

    args = cli.build_parser().parse_args(
        ["train", "--alignment", "anger", "--out", "x", "--keep-checkpoints", "0"])
    assert cli._train_config(args).keep_checkpoints == 0
    assert not cli._uses_recipe(args)  # a recipe would drop the option
