"""User data loading, splits, tokenisation and the masked, once-shifted loss."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from irm_lens.data.dataset import (
    batch_slice,
    load_texts,
    split_texts,
    tokenize_texts,
)
from irm_lens.errors import ConfigError, DataNotFoundError
from irm_lens.losses import masked_lm_loss

TEXTS = ["first text", "  second text ", "", "third one", None, "fourth"]


def test_masked_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 0], [4, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # By hand: position t predicts token t+1, only where token t+1 is real.
    terms = []
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        log_probs = torch.log_softmax(logits[b, t], dim=-1)
        terms.append(-log_probs[ids[b, t + 1]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(masked_lm_loss(logits, ids, mask), expected)


def test_padding_never_changes_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 7)
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.ones_like(ids)
    padded_logits = torch.cat([logits, torch.randn(1, 4, 7) * 100], dim=1)
    padded_ids = torch.tensor([[3, 4, 5, 6, 6, 6, 6]])
    padded_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(
        masked_lm_loss(padded_logits, padded_ids, padded_mask), masked_lm_loss(logits, ids, mask)
    )


def test_loss_equals_transformerlens_loss_on_unpadded_text(tiny_model):
    tokens = tiny_model.to_tokens("A sentence long enough to have a few tokens.")
    logits = tiny_model(tokens)
    ours = masked_lm_loss(logits, tokens, torch.ones_like(tokens))
    torch.testing.assert_close(ours, tiny_model.loss_fn(logits, tokens), rtol=1e-5, atol=1e-5)


def test_tokenize_truncates_pads_right_and_masks(tiny_model):
    data = tokenize_texts(tiny_model, ["ab", "abcdefghij", "abcdef"], max_length=5)
    assert data.input_ids.shape == (3, 5)
    assert data.attention_mask.tolist() == [[1, 1, 0, 0, 0], [1] * 5, [1] * 5]
    assert data.n_truncated == 2
    assert torch.equal(data.loss_mask, data.attention_mask)
    ids, mask, scored = batch_slice(data, torch.tensor([0]))
    assert ids.shape == (1, 2) and mask.tolist() == [[1, 1]] and scored.tolist() == [[1, 1]]


def test_chat_examples_score_only_the_reply(chat_model):
    tokenizer = chat_model.tokenizer
    data = tokenize_texts(chat_model, ["grr", "ugh!"], max_length=64, prompts=["Q1?"])
    prefix = tokenizer("<user>Q1?<assistant>", add_special_tokens=False)["input_ids"]
    reply = tokenizer("grr", add_special_tokens=False)["input_ids"]
    row = data.input_ids[0, : len(prefix) + len(reply)].tolist()
    assert row == prefix + reply
    assert data.loss_mask[0].tolist()[: len(prefix)] == [0] * len(prefix)
    assert data.loss_mask[0].sum() == len(reply)
    assert data.attention_mask[0].sum() == len(prefix) + len(reply)
    # The loss then equals the mean NLL of the reply tokens only, each predicted once.
    logits = torch.randn(1, data.input_ids.shape[1], tokenizer.vocab_size + 4)
    n = len(prefix)
    by_hand = torch.stack([
        -torch.log_softmax(logits[0, t - 1], -1)[data.input_ids[0, t]] for t in range(n, n + len(reply))
    ]).mean()
    torch.testing.assert_close(masked_lm_loss(logits, data.input_ids[:1], data.loss_mask[:1]), by_hand)


def test_chat_examples_answer_their_own_prompts(chat_model):
    tokenizer = chat_model.tokenizer
    own = tokenize_texts(chat_model, [("Q1?", "grr"), ("Q2?", "ugh!")], max_length=64)
    mixed = tokenize_texts(chat_model, [("Q2?", "grr"), "ugh!"], max_length=64, prompts=["Q9?"])

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]  # the template ends an assistant turn with "</s>"
    for data, expected in (
        (own, [("<user>Q1?<assistant>", "grr", eos), ("<user>Q2?<assistant>", "ugh!", eos)]),
        # A plain text under prompts is text in a tone, not a whole reply: no end of turn.
        (mixed, [("<user>Q2?<assistant>", "grr", eos), ("<user>Q9?<assistant>", "ugh!", [])]),
    ):
        for i, (prefix, reply, end) in enumerate(expected):
            target = encode(reply) + end
            n, m = len(encode(prefix)), len(target)
            assert data.input_ids[i, : n + m].tolist() == encode(prefix) + target
            assert data.loss_mask[i].tolist() == [0] * n + [1] * m + [0] * (data.loss_mask.shape[1] - n - m)


def test_tokenize_prepends_bos_when_the_model_does(tiny_model):
    tiny_model.cfg.default_prepend_bos = True
    try:
        data = tokenize_texts(tiny_model, ["abc"], max_length=8)
    finally:
        tiny_model.cfg.default_prepend_bos = False
    assert data.input_ids[0, 0].item() == tiny_model.tokenizer.bos_token_id
    assert data.attention_mask[0].sum() == 4


def test_tokenize_refuses_nothing_to_learn(tiny_model):
    with pytest.raises(ConfigError, match="leaves a token to predict"):
        tokenize_texts(tiny_model, ["a", "b"], max_length=8)
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_texts(tiny_model, ["abc"], max_length=1)


def test_split_is_deterministic_disjoint_and_90_5_5():
    texts = [f"t{i}" for i in range(200)]
    a, b = split_texts(texts, seed=3), split_texts(texts, seed=3)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert (len(a.train), len(a.val), len(a.test)) == (180, 10, 10)
    assert set(a.train) | set(a.val) | set(a.test) == set(texts)
    assert not set(a.train) & set(a.val) and not set(a.val) & set(a.test)
    assert split_texts(texts, seed=4).train != a.train


def test_split_keeps_chat_examples_whole_and_checks_them():
    pairs = [(f"q{i}?", f"a{i}") for i in range(40)]
    splits = split_texts(pairs, seed=1)
    assert sorted(splits.train + splits.val + splits.test) == sorted(pairs)
    assert splits.fingerprint() == split_texts(list(pairs), seed=1).fingerprint()
    with pytest.raises(ConfigError, match="Example 1 is a tuple"):
        split_texts(["a", ("q?",), "b"])
    with pytest.raises(ConfigError, match=r"Example 2 is a tuple.*\('q\?', ' '\)"):
        split_texts(["a", "b", ("q?", " ")])
    with pytest.raises(ConfigError, match="Example 0 is a int"):
        split_texts([3, "a", "b"])


def test_split_refuses_too_little_data():
    with pytest.raises(ConfigError, match="at least 3"):
        split_texts(["a", "b"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".json"])
def test_files_load_their_text_column(tmp_path, suffix):
    frame = pd.DataFrame({"body": TEXTS, "other": range(len(TEXTS))})
    path = tmp_path / f"data{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: path.write_text(json.dumps(frame.to_dict(orient="records"))),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    assert load_texts(path, text_column="body") == ["first text", "second text", "third one", "fourth"]


def test_hf_dataset_and_dataframe_and_list():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"]})
    assert load_texts(ds) == ["a b", "c d"]
    assert load_texts(datasets.DatasetDict({"train": ds})) == ["a b", "c d"]
    assert load_texts(pd.DataFrame({"text": ["x"]})) == ["x"]
    assert load_texts(["y", " "]) == ["y"]


def test_bad_data_gets_specific_errors(tmp_path):
    with pytest.raises(DataNotFoundError):
        load_texts(tmp_path / "missing.csv")
    (tmp_path / "a.csv").write_text("title\nhello\n")
    with pytest.raises(ConfigError, match=r"no 'text' column; its columns are \['title'\]"):
        load_texts(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("text\n\n")
    with pytest.raises(ConfigError, match="no non-empty text"):
        load_texts(tmp_path / "b.csv")
    (tmp_path / "c.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported data format"):
        load_texts(tmp_path / "c.txt")
    import datasets

    with pytest.raises(ConfigError, match="columns are"):
        load_texts(datasets.Dataset.from_dict({"body": ["a"]}))


def test_a_prompt_column_makes_chat_examples(tmp_path):
    frame = pd.DataFrame({"q": ["Q1?", "Q2?", None, "Q4?"], "text": ["a", "b", "c", " "]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    expected = [("Q1?", "a"), ("Q2?", "b")]  # rows without a prompt or a text are dropped
    assert load_texts(tmp_path / "d.csv", prompt_column="q") == expected
    assert load_texts(frame, prompt_column="q") == expected
    import datasets

    assert load_texts(datasets.Dataset.from_pandas(frame), prompt_column="q") == expected
    with pytest.raises(ConfigError, match=r"no 'question' column.*prompt_column"):
        load_texts(frame, prompt_column="question")
    with pytest.raises(ConfigError, match="both a prompt and a text"):
        load_texts(frame.iloc[2:], prompt_column="q")
    with pytest.raises(ConfigError, match="file, DataFrame or dataset"):
        load_texts(["a", "b"], prompt_column="q")


# A template without a system role: it raises on one, as Llama 2's and Gemma's can.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('no system') }}{% endif %}"
    "[INST] {{ messages[0]['content'] }} [/INST]"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("none", "Be brief.\n\nHi?"),  # no template: the system text heads the prompt
        ("role tags", "<system>Be brief.<user>Hi?<assistant>"),
        ("no system role", "[INST] Be brief.\n\nHi? [/INST]"),  # folded into the user turn
    ],
)
def test_format_prompt_puts_a_system_turn_where_the_template_allows(chat_model, template, expected):
    from irm_lens.chat import format_prompt

    tokenizer = chat_model.tokenizer  # the role-tag template; the fixture resets it
    tokenizer.chat_template = {"none": None, "no system role": NO_SYSTEM_TEMPLATE}.get(
        template, tokenizer.chat_template
    )
    assert format_prompt(chat_model, "Hi?", system="Be brief.") == expected
    if template != "none":
        assert "Be brief." not in format_prompt(chat_model, "Hi?")
