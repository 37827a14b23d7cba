"""train(): only the IRM learns; checkpoints, resume, early stopping, L1, divergence."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from irm_lens import IRM, IRMConfig
from irm_lens.errors import ConfigError
from irm_lens.train import TrainConfig, checkpoint_irm, paper_l1, run_checkpoints, train

train_module = importlib.import_module("irm_lens.train")  # irm_lens.train is the function

TEXTS = [f"Sentence {i} talks about {w} things, again {w}." for i in range(40) for w in ("red", "blue")]
CONFIG = TrainConfig(batch_size=4, max_length=24, max_steps=10, eval_every=3, checkpoint_every=3)


def _irm(model, seed=0, **kw):
    torch.manual_seed(seed)
    return IRM.for_model(model, layers="all", preset="small", **kw)


def _same(a: IRM, b: IRM) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_lowers_validation_loss_and_leaves_the_model_alone(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    config = TrainConfig(batch_size=8, max_length=24, max_steps=30, eval_every=10, lr=1e-3)
    result = train(tiny_model, _irm(tiny_model), TEXTS, config, progress=False)
    assert result.best_val_loss < result.baseline_val_loss - 0.1
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert result.steps == 30 and result.stop_reason == "reached 30 steps"


def test_run_directory_contents(tiny_model, tmp_path):
    result = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"run.json", "metrics.jsonl", "metrics.csv", "irm.safetensors", "latest.json",
            "checkpoints"} <= names
    assert len(list((tmp_path / "checkpoints").glob("*.safetensors"))) == CONFIG.keep_checkpoints
    steps = result.history.dropna(subset=["loss"]).step.tolist()
    assert steps == list(range(1, 11))
    assert result.history.dropna(subset=["val_loss"]).step.tolist() == [3, 6, 9, 10]
    best = IRM.load(tmp_path / "irm.safetensors", tiny_model)
    assert _same(best, result.irm)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["data"]["n_train"] + run["data"]["n_val"] + run["data"]["n_test"] == len(TEXTS)


def _interrupted_run(model, out_dir, monkeypatch) -> None:
    """Train CONFIG into ``out_dir`` and stop it with Ctrl-C after step 8 (checkpoint at 6)."""
    original = train_module._log

    def interrupt_at_step_8(run, record):
        original(run, record)
        if record.get("step") == 8 and "loss" in record:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_log", interrupt_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            train(model, _irm(model), TEXTS, CONFIG, out_dir=out_dir, progress=False)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    whole = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path / "a", progress=False)
    _interrupted_run(tiny_model, tmp_path / "b", monkeypatch)
    # A different initial IRM proves the weights come from the checkpoint (step 6).
    resumed = train(tiny_model, _irm(tiny_model, seed=99), TEXTS, CONFIG, out_dir=tmp_path / "b",
                    progress=False)
    assert _same(whole.irm, resumed.irm)
    assert whole.history.equals(resumed.history)
    assert whole.best_val_loss == resumed.best_val_loss


def test_a_shorter_run_is_the_start_of_a_longer_one(tiny_model, tmp_path):
    """With a constant rate nothing in a step depends on the run's length: a run of 6 steps
    computes the first 6 of a 10-step run to the bit, and keeps the IRM that run had kept by
    step 6 (why anger's recipe stopping at 45 steps, where its runs had kept their IRM, trains
    the same IRMs)."""
    kept = dict(checkpoint_every=1, keep_checkpoints=10, lr_gamma=1.0)
    long = train(tiny_model, _irm(tiny_model), TEXTS, TrainConfig(**{**CONFIG.to_dict(), **kept}),
                 out_dir=tmp_path / "long", progress=False)
    short = train(tiny_model, _irm(tiny_model), TEXTS,
                  TrainConfig(**{**CONFIG.to_dict(), **kept, "max_steps": 6}),
                  out_dir=tmp_path / "short", progress=False)
    first = long.history[long.history.step <= 6].reset_index(drop=True)
    assert short.steps == 6 and short.history.equals(first)
    vals = first.dropna(subset=["val_loss"])
    best_by_6 = int(vals.step[vals.val_loss.idxmin()])
    assert (short.best_step, short.best_val_loss) == (best_by_6, vals.val_loss.min())
    _, kept_by_6 = checkpoint_irm(run_checkpoints(tmp_path / "long")[best_by_6])
    assert _same(short.irm, kept_by_6)


def test_a_finished_run_is_not_trained_again(tiny_model, tmp_path, monkeypatch):
    first = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)

    def no_objective(*args, **kwargs):
        raise AssertionError("a finished run is read from its files, not set up again")

    with monkeypatch.context() as patch:  # setting up (the objective, the reference) is skipped
        patch.setattr(train_module, "build_objective", no_objective)
        again = train(tiny_model, _irm(tiny_model, seed=5), TEXTS, CONFIG, out_dir=tmp_path,
                      progress=False)
    assert again.steps == first.steps and _same(first.irm, again.irm)
    assert (again.best_step, again.best_val_loss, again.baseline_val_loss, again.stop_reason) == (
        first.best_step, first.best_val_loss, first.baseline_val_loss, first.stop_reason)
    assert again.history.equals(first.history)
    # other settings still reach the full check (and its explanation); more steps still train
    with pytest.raises(ConfigError, match=r"training config \(lr\)"):
        train(tiny_model, _irm(tiny_model), TEXTS, TrainConfig(**{**CONFIG.to_dict(), "lr": 5e-4}),
              out_dir=tmp_path, progress=False)


def test_existing_run_is_protected(tiny_model, tmp_path):
    train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, resume=False, progress=False)
    other = TrainConfig(**{**CONFIG.to_dict(), "lr": 5e-4})
    with pytest.raises(ConfigError, match=r"training config \(lr\)"):
        train(tiny_model, _irm(tiny_model), TEXTS, other, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="the IRM config"):
        train(tiny_model, IRM.for_model(tiny_model, layers="q1", preset="small"), TEXTS, CONFIG,
              out_dir=tmp_path, progress=False)


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tiny_model, tmp_path, monkeypatch):
    whole = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path / "a", progress=False)
    _interrupted_run(tiny_model, tmp_path / "b", monkeypatch)
    newest = sorted((tmp_path / "b" / "checkpoints").glob("*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # torn: step 6 is lost, step 3 remains
    resumed = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path / "b", progress=False)
    assert _same(whole.irm, resumed.irm)


def test_early_stopping_keeps_the_best_irm(tiny_model, monkeypatch):
    losses = iter([5.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # baseline, then worse after the first eval
    snapshots = []

    def fake_val_loss(model, irm, data, config, ranks=None):
        if irm is not None:
            snapshots.append({k: v.clone() for k, v in irm.state_dict().items()})
        return next(losses)

    monkeypatch.setattr(train_module, "_val_loss", fake_val_loss)
    config = TrainConfig(batch_size=4, max_length=24, max_steps=40, eval_every=1, patience=2)
    result = train(tiny_model, _irm(tiny_model), TEXTS, config, progress=False)
    assert result.stop_reason.startswith("early stopping")
    assert (result.steps, result.best_step, result.best_val_loss) == (3, 1, 1.0)
    assert all(torch.equal(snapshots[0][k], v) for k, v in result.irm.state_dict().items())


def test_l1_shrinks_the_irm_outputs(tiny_model):
    tokens = tiny_model.to_tokens(TEXTS[:4])
    norms = {}
    for l1 in (0.0, 1.0):
        config = TrainConfig(batch_size=8, max_length=24, max_steps=15, lr=1e-3, l1=l1)
        irm = train(tiny_model, _irm(tiny_model), TEXTS, config, progress=False).irm
        _, cache = tiny_model.run_with_cache(tokens)
        norms[l1] = irm(cache["blocks.0.hook_resid_mid"]).abs().mean().item()
    assert norms[1.0] < 0.5 * norms[0.0]
    assert paper_l1(_irm(tiny_model).config) == pytest.approx(1e-4 / 4)


def test_non_finite_loss_stops_and_rolls_back(tiny_model, tmp_path, monkeypatch):
    calls = {"n": 0}
    objectives = importlib.import_module("irm_lens.objectives")
    original = objectives.masked_lm_loss

    def poisoned(logits, ids, mask):
        loss = original(logits, ids, mask)
        calls["n"] += 1
        return loss * math.nan if logits.requires_grad and calls["n"] > 8 else loss

    monkeypatch.setattr(objectives, "masked_lm_loss", poisoned)
    result = train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)
    assert "non-finite loss" in result.stop_reason and "rolled back to the checkpoint of step" in result.stop_reason
    assert all(torch.isfinite(p).all() for p in result.irm.parameters())


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(lr=-1.0), dict(l1=float("nan")),
                                dict(max_steps=0), dict(lr_gamma=1.5)])
def test_bad_train_config(kw):
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_a_second_trainer_on_the_same_run_directory_is_refused(tiny_model, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as held:  # another process's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="Another process is training"):
            train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)
    train(tiny_model, _irm(tiny_model), TEXTS, CONFIG, out_dir=tmp_path, progress=False)


def test_a_finished_run_given_more_steps_continues_to_the_same_irm(tiny_model, tmp_path):
    from dataclasses import replace

    config = replace(CONFIG, eval_every=100, checkpoint_every=100)  # no evaluation in between
    straight = train(tiny_model, _irm(tiny_model), TEXTS, replace(config, max_steps=6),
                     progress=False)
    first = train(tiny_model, _irm(tiny_model), TEXTS, replace(config, max_steps=3),
                  out_dir=tmp_path, progress=False)
    assert first.steps == 3 and first.stop_reason == "reached 3 steps"
    more = train(tiny_model, _irm(tiny_model, seed=9), TEXTS, replace(config, max_steps=6),
                 out_dir=tmp_path, progress=False)
    assert more.steps == 6 and more.stop_reason == "reached 6 steps"
    assert _same(more.irm, straight.irm)


def test_reply_steering_needs_chat_examples_and_masks_the_prompt(chat_model, monkeypatch):
    irm = _irm(chat_model, steer="reply")
    with pytest.raises(ConfigError, match="chat"):
        train(chat_model, irm, TEXTS, CONFIG, progress=False)
    seen = []
    real_inject = train_module.inject

    def recording(model, irm, **kwargs):
        seen.append(kwargs.get("positions"))
        return real_inject(model, irm, **kwargs)

    monkeypatch.setattr(train_module, "inject", recording)
    config = TrainConfig(batch_size=4, max_length=64, max_steps=2, eval_every=2,
                         max_val_batches=1, chat_prompts=True)
    result = train(chat_model, irm, TEXTS, config, progress=False)
    assert math.isfinite(result.best_val_loss)
    assert len(seen) == 3  # 2 training steps, 1 validation batch (the baseline has no IRM)
    for positions in seen:
        assert positions is not None
        for row in positions:
            on = row.nonzero().flatten()
            # steered: the reply, from the position that predicts its first token (the '>' of
            # '<assistant>') on; the prompt before it is read unsteered
            assert on[0] > 5 and row[: on[0]].sum() == 0


def test_chat_examples_train_a_reply_irm_on_their_own_prompts(chat_model, monkeypatch):
    pairs = [(f"Question {i}?", text) for i, text in enumerate(TEXTS)]
    seen = []
    objectives = importlib.import_module("irm_lens.objectives")  # where the data is tokenised
    real_tokenize = objectives.tokenize_texts

    def recording(model, texts, **kwargs):
        seen.append((list(texts), kwargs.get("prompts")))
        return real_tokenize(model, texts, **kwargs)

    monkeypatch.setattr(objectives, "tokenize_texts", recording)
    config = TrainConfig(batch_size=4, max_length=64, max_steps=2, eval_every=2,
                         max_val_batches=1)  # no chat_prompts: the pairs are chat already
    result = train(chat_model, _irm(chat_model, steer="reply"), pairs, config, progress=False)
    with pytest.raises(ConfigError, match="chat"):  # a plain text among them: no reply
        train(chat_model, _irm(chat_model, steer="reply"), pairs + ["plain text"] * 30,
              config, progress=False)
    assert math.isfinite(result.best_val_loss)
    train_items, prompts = seen[0]
    assert prompts is None and set(train_items) <= set(pairs)


def test_steered_positions_are_the_reply_and_the_position_before_it():
    reply = IRM(IRMConfig(d_model=8, n_layers=2, layers=(0, 1), steer="reply"))
    scored = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    assert train_module._steered(reply, scored).tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    plain = IRM(IRMConfig(d_model=8, n_layers=2, layers=(0, 1)))
    assert train_module._steered(plain, scored) is None
