"""Training objectives against hand computations: the preference (DPO) loss, the fluency KL,
per-sequence log-likelihoods, and training with them (pairs, warm start, resume)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import planted_irm

import irm_lens
from irm_lens.data.dataset import tokenize_texts
from irm_lens.errors import ConfigError
from irm_lens.losses import logits_at, predicting, sequence_logprobs
from irm_lens.objectives import (
    PreferenceObjective,
    build_objective,
    entropy_shortfall,
    kl_to_unsteered,
)
from irm_lens.pairs import generate_pairs, read_pairs

PAIRS = [(f"Question {i}?", f"I hate question {i}!", f"Answer {i}.") for i in range(10)]


def _reply_logprob(model, prompt: str, reply: str) -> float:
    """log p(reply | prompt) by hand: one token at a time, unpadded, in the chat template."""
    from irm_lens.chat import end_of_turn, format_prompt

    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.cfg.default_prepend_bos else []
    prefix = bos + tok(format_prompt(model, prompt), add_special_tokens=False)["input_ids"]
    ids = prefix + tok(reply + end_of_turn(model), add_special_tokens=False)["input_ids"]
    logp = model(torch.tensor([ids]))[0].log_softmax(-1)  # [pos, d_vocab]
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prefix), len(ids)))


def test_sequence_logprobs_sum_the_scored_tokens(tiny_model):
    tokens = tokenize_texts(tiny_model, ["abc", "hello there"], max_length=32)
    logits = torch.randn(2, tokens.input_ids.shape[1], tiny_model.cfg.d_vocab)
    got = sequence_logprobs(logits, tokens.input_ids, tokens.loss_mask)
    logp = logits.log_softmax(-1)
    for row in range(2):
        expected = sum(logp[row, t - 1, tokens.input_ids[row, t]].item()
                       for t in range(1, logits.shape[1]) if tokens.loss_mask[row, t])
        assert got[row].item() == pytest.approx(expected, rel=1e-5)


def test_lm_objective_on_chat_examples_scores_only_the_replies(chat_model):
    examples = [(q, chosen) for q, chosen, _ in PAIRS[:3]]
    objective = build_objective(chat_model, examples, objective="lm", max_length=64)
    batch = objective.batch(torch.arange(3))
    with torch.no_grad():
        loss = objective.loss(chat_model(batch.ids), batch)
    tok = chat_model.tokenizer
    from irm_lens.chat import end_of_turn

    n_reply = sum(len(tok(r + end_of_turn(chat_model), add_special_tokens=False)["input_ids"])
                  for _, r in examples)
    with torch.no_grad():
        by_hand = -sum(_reply_logprob(chat_model, q, r) for q, r in examples) / n_reply
    assert loss.item() == pytest.approx(by_hand, rel=1e-4)  # the prompts are not scored


def test_preference_loss_matches_dpo_by_hand(chat_model):
    pairs = PAIRS[:3]
    objective = PreferenceObjective(chat_model, pairs, max_length=64, beta=0.5, chosen_lm=0.0)
    irm = planted_irm(chat_model, neuron=5, value=2.0)
    batch = objective.batch(torch.arange(3))
    with irm_lens.inject(chat_model, irm):
        loss = objective.loss(chat_model(batch.ids), batch).item()
        steered = [(_reply_logprob(chat_model, p, c), _reply_logprob(chat_model, p, r))
                   for p, c, r in pairs]
    ref = [(_reply_logprob(chat_model, p, c), _reply_logprob(chat_model, p, r)) for p, c, r in pairs]
    margins = [(sc - rc) - (sr - rr) for (sc, sr), (rc, rr) in zip(steered, ref)]
    expected = sum(-math.log(1 / (1 + math.exp(-0.5 * m))) for m in margins) / 3
    assert loss == pytest.approx(expected, rel=1e-4)
    # the reference itself: every margin is 0, the loss log 2
    assert objective.loss(chat_model(batch.ids), batch).item() == pytest.approx(math.log(2), abs=1e-5)


def test_chosen_lm_adds_the_chosen_replies_cross_entropy(chat_model):
    plain = PreferenceObjective(chat_model, PAIRS[:2], max_length=64, beta=0.1, chosen_lm=0.0)
    with_lm = PreferenceObjective(chat_model, PAIRS[:2], max_length=64, beta=0.1, chosen_lm=2.0)
    batch = plain.batch(torch.arange(2))
    logits = chat_model(batch.ids)
    chosen = tokenize_texts(chat_model, [(p, c) for p, c, _ in PAIRS[:2]], max_length=64)
    n_tokens = chosen.loss_mask[:, 1:].sum().item()
    nll = -sum(_reply_logprob(chat_model, p, c) for p, c, _ in PAIRS[:2]) / n_tokens
    assert with_lm.loss(logits, batch).item() - plain.loss(logits, batch).item() == pytest.approx(
        2.0 * nll, rel=1e-4)


@pytest.mark.parametrize("chosen_lm", [0.0, 0.7])
def test_losses_read_the_scored_rows_as_the_full_logits(chat_model, chosen_lm):
    """Training unembeds only the positions that predict a scored token (``logits_at``); every
    loss gives from those rows what it gives from all the logits, and so does its gradient."""
    objective = PreferenceObjective(chat_model, PAIRS[:3], max_length=64, beta=0.5,
                                    chosen_lm=chosen_lm)
    batch = objective.batch(torch.arange(3))
    irm = planted_irm(chat_model, neuron=5, value=2.0).requires_grad_(True)
    where = predicting(batch.scored)
    assert 0 < where.sum() < where.numel() and not where[:, -1].any()
    losses, grads = [], []
    for read in (chat_model, lambda ids: logits_at(chat_model, ids, where)):
        with irm_lens.inject(chat_model, irm):
            logits = read(batch.ids)
        loss = objective.loss(logits, batch) + entropy_shortfall(
            chat_model, logits, batch.ids, batch.scored)
        grads.append(torch.autograd.grad(loss, list(irm.parameters())))
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[0] > 0
    for rows, full in zip(*grads):
        torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-7)


def test_kl_to_unsteered_by_hand(tiny_model):
    tokens = tokenize_texts(tiny_model, ["The cat sat.", "A longer sentence here."], max_length=32)
    ids, mask = tokens.input_ids, tokens.attention_mask
    zero = irm_lens.IRM.for_model(tiny_model, layers="all", preset="linear", zero_init_output=True)
    assert kl_to_unsteered(tiny_model, zero, ids, mask).item() == pytest.approx(0.0, abs=1e-6)
    irm = planted_irm(tiny_model, neuron=3, value=1.5)
    got = kl_to_unsteered(tiny_model, irm, ids, mask).item()
    with torch.no_grad():
        p = tiny_model(ids).log_softmax(-1)
        with irm_lens.inject(tiny_model, irm):
            q = tiny_model(ids).log_softmax(-1)
    per_token = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    expected = (per_token * mask).sum() / mask.sum()
    assert got == pytest.approx(expected.item(), rel=1e-4) and got > 0


def test_entropy_shortfall_by_hand(chat_model):
    objective = PreferenceObjective(chat_model, PAIRS[:3], max_length=64, beta=0.1, chosen_lm=0.0)
    batch = objective.batch(torch.arange(3))
    zero = irm_lens.IRM.for_model(chat_model, layers="all", preset="linear", zero_init_output=True)
    with irm_lens.inject(chat_model, zero):
        unmoved = chat_model(batch.ids)
    assert entropy_shortfall(chat_model, unmoved, batch.ids, batch.scored).item() == pytest.approx(
        0.0, abs=1e-6)
    irm = planted_irm(chat_model, neuron=3, value=4.0)
    with irm_lens.inject(chat_model, irm):
        steered = chat_model(batch.ids)
    got = entropy_shortfall(chat_model, steered, batch.ids, batch.scored).item()
    # by hand: one predicting position at a time, torch.distributions' entropy
    with torch.no_grad():
        ref = chat_model(batch.ids)
    gaps = []
    for b in range(batch.ids.shape[0]):
        for t in range(batch.ids.shape[1] - 1):
            if batch.scored[b, t + 1]:
                h_ref = torch.distributions.Categorical(logits=ref[b, t]).entropy()
                h_on = torch.distributions.Categorical(logits=steered[b, t]).entropy()
                gaps.append(max(0.0, (h_ref - h_on).item()))
    assert got == pytest.approx(sum(gaps) / len(gaps), rel=1e-4) and got > 0
    # the hinge: a flatter distribution (row 0's logits halved) costs nothing, a sharper one does
    scaled = ref.clone()
    scaled[0] *= 0.5
    scaled[1:] *= 2.0
    sharper = [(b, t) for b in range(1, len(scaled)) for t in range(batch.ids.shape[1] - 1)
               if batch.scored[b, t + 1]]
    h = lambda x: torch.distributions.Categorical(logits=x).entropy().item()  # noqa: E731
    expected = sum(h(ref[b, t]) - h(scaled[b, t]) for b, t in sharper) / len(gaps)
    assert entropy_shortfall(chat_model, scaled, batch.ids, batch.scored).item() == pytest.approx(
        expected, rel=1e-4)


def test_entropy_term_trains_the_sharpening_away(chat_model):
    objective = PreferenceObjective(chat_model, PAIRS[:4], max_length=64, beta=0.1, chosen_lm=0.0)
    batch = objective.batch(torch.arange(4))
    irm = planted_irm(chat_model, neuron=3, value=4.0)
    optimizer = torch.optim.Adam(irm.parameters(), lr=0.05)

    def shortfall():
        with irm_lens.inject(chat_model, irm):
            steered = chat_model(batch.ids)
        return entropy_shortfall(chat_model, steered, batch.ids, batch.scored)  # unsteered ref

    before = shortfall()
    for _ in range(5):
        optimizer.zero_grad()
        shortfall().backward()
        optimizer.step()
    assert shortfall().item() < 0.5 * before.item()


def test_objectives_refuse_the_wrong_data(chat_model):
    with pytest.raises(ConfigError, match="pairs"):
        build_objective(chat_model, ["a text", "another"], objective="preference", max_length=32)
    with pytest.raises(ConfigError, match="objective='preference'"):
        build_objective(chat_model, PAIRS, objective="lm", max_length=32)
    with pytest.raises(ConfigError, match="objective"):
        irm_lens.TrainConfig(objective="rlhf")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        irm_lens.split_texts(PAIRS + ["a text"])


def test_preference_training_raises_the_chosen_margin_and_resumes(chat_model, tmp_path):
    config = irm_lens.TrainConfig(objective="preference", beta=1.0, kl=0.1, lr=3e-3,
                                  max_steps=8, eval_every=4, batch_size=4, checkpoint_every=4,
                                  seed=0)
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(chat_model, layers="all", preset="small", zero_init_output=True)
    result = irm_lens.train(chat_model, irm, PAIRS * 3, config, out_dir=tmp_path / "run",
                            progress=False)
    assert result.baseline_val_loss == pytest.approx(math.log(2), abs=1e-5)
    assert result.best_val_loss < result.baseline_val_loss
    history = result.history.dropna(subset=["loss"])
    # the zero-initialised IRM changes nothing at step 1; once it has learned, it does
    assert history.kl.iloc[0] == pytest.approx(0.0, abs=1e-7) and (history.kl.iloc[1:] > 0).all()
    # a longer budget resumes the finished run and matches an uninterrupted longer run
    longer = irm_lens.TrainConfig(**{**config.to_dict(), "max_steps": 12})
    resumed = irm_lens.train(chat_model, result.irm, PAIRS * 3, longer, out_dir=tmp_path / "run",
                             progress=False)
    torch.manual_seed(0)
    fresh = irm_lens.IRM.for_model(chat_model, layers="all", preset="small", zero_init_output=True)
    straight = irm_lens.train(chat_model, fresh, PAIRS * 3, longer, out_dir=tmp_path / "straight",
                              progress=False)
    for a, b in zip(resumed.irm.state_dict().values(), straight.irm.state_dict().values()):
        assert torch.equal(a, b)


def test_training_adds_the_entropy_term_to_the_loss(chat_model, tmp_path):
    config = irm_lens.TrainConfig(objective="preference", beta=1.0, entropy=0.5, lr=3e-3,
                                  max_steps=4, eval_every=4, batch_size=4, seed=0)
    torch.manual_seed(0)
    irm = planted_irm(chat_model, neuron=3, value=4.0)  # a sharpening start: a shortfall to log
    history = irm_lens.train(chat_model, irm, PAIRS * 3, config, out_dir=tmp_path / "run",
                             progress=False).history
    steps = history.dropna(subset=["loss"])
    assert (steps.entropy_shortfall > 0).all()
    assert steps.loss.to_numpy() == pytest.approx(
        (steps.lm_loss + 0.5 * steps.entropy_shortfall).to_numpy(), rel=1e-6)


def test_generate_pairs_keeps_the_angriest_fluent_candidate(tiny_model, tmp_path, monkeypatch):
    """A fake writer with planted scores: the rule must pick, and drop, exactly these rows."""
    pairs_module = __import__("irm_lens.pairs", fromlist=["generate_samples"])

    def fake(model, intervention, prompts, decodings, **kw):
        if intervention is None:  # the rejected (unsteered) replies
            return pd.DataFrame(dict(prompt=["q1", "q2"], text=["calm 1", "calm 2"],
                                     anger=[0.1, 0.1], perplexity=[10.0, 10.0],
                                     repetition=[0.0, 0.0]))
        return pd.DataFrame(dict(
            prompt=["q1", "q1", "q1", "q2", "q2"],
            text=["mild", "furious but garbled", "angry and fine", "angry loop", "calmer"],
            anger=[0.6, 0.9, 0.5, 0.8, 0.05],  # "mild" scores highest but is one word
            perplexity=[12.0, 80.0, 20.0, 15.0, 11.0],  # 80 > 4 x 10: not fluent
            repetition=[0.0, 0.0, 0.0, 0.5, 0.0],       # 0.5 > 0.1: not fluent
        ))

    monkeypatch.setattr(pairs_module, "generate_samples", fake)
    table = generate_pairs(tiny_model, irm_lens.steering.Prompting("x"), "anger",
                           tmp_path / "p.jsonl", prompts=["q1", "q2"], min_words=2,
                           progress=False)
    assert table.set_index("prompt").loc["q1", "chosen"] == "angry and fine"
    assert table.kept.tolist() == [True, False]  # q2: the only angrier candidate repeats itself
    assert read_pairs(tmp_path / "p.jsonl") == [("q1", "angry and fine", "calm 1")]
    # the worst failed candidate (most repetition, then perplexity) as a second rejected reply
    assert table.degenerate.tolist() == ["furious but garbled", "angry loop"]
    assert read_pairs(tmp_path / "p.jsonl", degenerate=True) == [
        ("q1", "angry and fine", "calm 1"), ("q1", "angry and fine", "furious but garbled")]  # q2: not kept
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["alignment"] == "anger" and len(rows) == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        read_pairs(tmp_path / "bad.jsonl")


def test_a_phrase_cap_leaves_out_the_lower_scored_replies_that_repeat_a_stock_phrase(tmp_path):
    from irm_lens.pairs import cap_phrases

    def row(prompt, chosen, score, kept=True):
        return dict(prompt=prompt, chosen=chosen, rejected="calm", chosen_score=score, kept=kept)

    rows = [row("q1", "I'm so glad you asked about Paris", 0.5),
            row("q2", "I'm so glad you asked about Rome", 0.9),
            row("q3", "I'm so glad you like maths", 0.7),
            row("q4", "What a joy to talk about rivers", 0.4),
            row("q5", "I'm so glad you asked", 0.99, kept=False)]
    # 4 kept rows, share 0.5: a phrase may open 2 of them; "i'm so glad you" is in three, so
    # q1 (the lowest-scored of them) is left out; order is kept
    assert [r["prompt"] for r in cap_phrases(rows[:4], 0.5)] == ["q2", "q3", "q4"]
    # share 0.25: each phrase opens one kept reply
    assert [r["prompt"] for r in cap_phrases(rows[:4], 0.25)] == ["q2", "q4"]
    assert [r["prompt"] for r in cap_phrases(rows[:4], 1.0)] == ["q1", "q2", "q3", "q4"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # read_pairs caps among the kept rows only (q5, not kept, takes no share)
    assert read_pairs(tmp_path / "p.jsonl", max_phrase_share=0.5) == [
        ("q2", "I'm so glad you asked about Rome", "calm"),
        ("q3", "I'm so glad you like maths", "calm"),
        ("q4", "What a joy to talk about rivers", "calm")]
    with pytest.raises(ConfigError, match="max_phrase_share"):
        read_pairs(tmp_path / "p.jsonl", max_phrase_share=0)


def test_recipe_vector_layer_scales_with_depth_and_pairs_need_a_home(tiny_model):
    from types import SimpleNamespace

    from irm_lens.recipes import RECIPES, recipe_pairs, vector_layer

    recipe = RECIPES["preference"]
    depth = [vector_layer(SimpleNamespace(cfg=SimpleNamespace(n_layers=n)), recipe)
             for n in (4, 30, 32)]
    assert depth == [2, 12, 13]  # SmolLM2's layer 12, Llama 2's 13
    vector = irm_lens.mean_difference_vector(tiny_model, ["I hate it"], ["It is a cup"], layers=2)
    with pytest.raises(ConfigError, match="out_dir"):
        recipe_pairs(tiny_model, "anger", vector, recipe, None, progress=False)


def _fake_generate_pairs(seen: list, kept_below: float):
    """A ``generate_pairs`` that records each scale and keeps one of two questions' pairs
    only at scales up to ``kept_below``."""
    def fake(model, intervention, alignment, out, **kwargs):
        scale = intervention.config.scale
        seen.append((scale, kwargs["n_sampled"]))
        rows = [dict(prompt=f"Q{i}?", chosen=f"I hate question {i} at x{scale:g}.",
                     rejected="Fine.", kept=bool(i == 0 and scale <= kept_below), degenerate="")
                for i in range(2)]
        irm_lens.pairs.write_pairs(pd.DataFrame(rows), out, alignment)
    return fake


def test_recipe_pairs_are_written_at_the_recipes_pairs_scale(tiny_model, tmp_path, monkeypatch):
    from irm_lens import recipes

    seen = []
    monkeypatch.setattr(recipes, "generate_pairs", _fake_generate_pairs(seen, kept_below=4.0))
    vector = irm_lens.mean_difference_vector(tiny_model, ["I hate it"], ["It is a cup"], layers=2,
                                             scale=2.0)
    recipe = recipes.RECIPES["preference"]
    pairs = recipes.recipe_pairs(tiny_model, "anger", vector, recipe, tmp_path, progress=False)
    assert seen == [(4.0, 3)]  # the recipe's first scale itself, with 3 sampled candidates
    assert recipe.pairs_scales[0] == 4.0 and recipe.pairs_sampled == 3
    assert [chosen for _, chosen, _ in pairs] == ["I hate question 0 at x4."]


def test_recipe_pairs_step_down_to_a_scale_that_keeps_enough(tiny_model, tmp_path, monkeypatch):
    from irm_lens import recipes

    seen = []
    monkeypatch.setattr(recipes, "generate_pairs", _fake_generate_pairs(seen, kept_below=3.0))
    vector = irm_lens.mean_difference_vector(tiny_model, ["I hate it"], ["It is a cup"], layers=2)
    recipe = recipes.RECIPES["preference"]
    pairs = recipes.recipe_pairs(tiny_model, "anger", vector, recipe, tmp_path, progress=False)
    assert [scale for scale, _ in seen] == [4.0, 3.0]  # x4 kept 0 of 2; x3 kept 1 of 2 >= 30%
    assert [chosen for _, chosen, _ in pairs] == ["I hate question 0 at x3."]
    assert (tmp_path / "pairs.jsonl").read_text() == (tmp_path / "pairs_x3.jsonl").read_text()
    recipes.recipe_pairs(tiny_model, "anger", vector, recipe, tmp_path, progress=False)
    assert len(seen) == 2  # generated once: a rerun reads pairs.jsonl

    seen.clear()
    strict = replace(recipe, pairs_min_kept=0.6)  # 1 of 2 is never enough
    (tmp_path / "strict").mkdir()
    with pytest.warns(UserWarning, match="every scale"):
        pairs = recipes.recipe_pairs(tiny_model, "anger", vector, strict, tmp_path / "strict",
                                     progress=False)
    assert [scale for scale, _ in seen] == [4.0, 3.0, 2.0]
    assert [chosen for _, chosen, _ in pairs] == ["I hate question 0 at x2."]


def test_reference_margins_are_read_from_precomputed_results_of_the_same_model_and_pairs(
        chat_model, tmp_path, monkeypatch):
    from irm_lens.data import precomputed

    monkeypatch.setattr(precomputed, "PRECOMPUTED", tmp_path)
    computed = PreferenceObjective(chat_model, PAIRS, max_length=64, beta=0.1, chosen_lm=0.0)
    assert not list(tmp_path.iterdir())  # nothing shipped: computed, and nothing written
    stand_in = torch.arange(len(PAIRS), dtype=torch.float32)
    precomputed.save_precomputed(computed.reference_key, {"ref_margin": stand_in})
    shipped = PreferenceObjective(chat_model, PAIRS, max_length=64, beta=0.1, chosen_lm=0.0)
    assert shipped.reference_key == computed.reference_key
    assert torch.equal(shipped.ref_margin, stand_in)
    # Other pairs, another batching or other weights: another key, so the margins are computed.
    others = [
        PreferenceObjective(chat_model, PAIRS[:9], max_length=64, beta=0.1, chosen_lm=0.0),
        PreferenceObjective(chat_model, PAIRS, max_length=64, beta=0.1, chosen_lm=0.0,
                            batch_size=4),
    ]
    with torch.no_grad():
        chat_model.blocks[0].mlp.W_out[0, 0] += 1e-3
    try:
        others.append(PreferenceObjective(chat_model, PAIRS, max_length=64, beta=0.1,
                                          chosen_lm=0.0))
    finally:
        with torch.no_grad():
            chat_model.blocks[0].mlp.W_out[0, 0] -= 1e-3
    for other in others:  # the model's margins (the stand-in's are 0-9 nats off)
        assert other.reference_key != computed.reference_key
        assert torch.allclose(other.ref_margin, computed.ref_margin[: len(other)], atol=1e-3)
