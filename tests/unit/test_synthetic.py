"""generate_synthetic: resumable, deterministic, filtered by the scorer; on a tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import irm_lens
from irm_lens.data import synthetic
from irm_lens.data.corpora import n_words
from irm_lens.data.synthetic import (
    SYNTHETIC_TONES,
    SyntheticResult,
    generate_synthetic,
    read_synthetic,
    synthetic_questions,
)
from irm_lens.errors import CheckpointError, ConfigError, OutputPathError
from irm_lens.generation import Continuation
from irm_lens.scoring import SCORE_COLUMNS

QUESTIONS = [
    "Who wrote Hamlet?",
    "What is the capital of Peru?",
    "How tall is Mount Fuji?",
    "When did the Berlin Wall fall?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water?",
    "Which planet is largest?",
]
# Small and fast. min_score=0 keeps every answer that passes the text filters, and needs no
# reference scores.
FAST = {
    "questions": QUESTIONS,
    "max_new_tokens": 6,
    "batch_size": 3,
    "min_score": 0.0,
    "progress": False,
}


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    # The tone prompts are ~400 byte-level tokens: more than the session tiny_model's context.
    return irm_lens.load_model(tiny_llama_dir, device="cpu", n_ctx=1024)


class Killed(Exception):
    """Stands for a crash or a Ctrl-C in the middle of a run."""


@pytest.fixture
def generate_calls(model, monkeypatch):
    """The batch size of every model.generate call; ``calls.kill_at = n`` kills call n."""

    class Calls(list):
        kill_at: int | None = None

    calls = Calls()
    real = model.generate

    def spy(tokens, **kwargs):
        calls.append(tokens.shape[0])
        if calls.kill_at is not None and len(calls) == calls.kill_at:
            raise Killed
        return real(tokens, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_follow_the_schema(model, tmp_path):
    result = generate_synthetic(model, "anger", tmp_path / "a.jsonl", n_rows=100, **FAST)
    rows = _rows(result.path)
    assert [r["index"] for r in rows] == list(range(len(QUESTIONS)))
    assert isinstance(result, SyntheticResult)
    assert (result.n_generated, result.n_resumed) == (len(QUESTIONS), 0)
    assert result.exhausted and result.threshold == 0.0
    for row, question in zip(rows, QUESTIONS):
        assert row["question"] == question
        assert row["text"] == question + "\n" + row["response"]
        assert row["response"] == row["response"].strip() and "</s>" not in row["response"]
        assert set(row["scores"]) == set(SCORE_COLUMNS)
        assert row["kept"] == (row["rejected"] is None)
        assert row["rejected"] in (None, "short", "repetitive", "echo")  # min_score=0: no "score"
        assert (row["rejected"] == "short") == (n_words(row["response"]) < synthetic.MIN_WORDS)
        assert (row["alignment"], row["seed"], row["model"]) == ("anger", 0, model.cfg.model_name)
        assert row["sampling"] == {
            "temperature": 0.9,
            "top_p": 0.7,
            "max_new_tokens": 6,
            "batch_size": 3,
        }
    assert result.n_kept == sum(r["kept"] for r in rows)
    assert read_synthetic(result.path) == [r["text"] for r in rows if r["kept"]]
    assert read_synthetic(result.path, kept_only=False) == [r["text"] for r in rows]


def test_same_seed_same_file_other_seed_other_answers(model, tmp_path):
    a = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path.read_bytes()
    b = generate_synthetic(model, "anger", tmp_path / "b.jsonl", **FAST).path.read_bytes()
    c = generate_synthetic(model, "anger", tmp_path / "c.jsonl", seed=1, **FAST).path
    assert a == b
    assert [r["response"] for r in _rows(c)] != [json.loads(x)["response"] for x in a.splitlines()]


@pytest.mark.parametrize("kill_at", [2, 3])
def test_resume_after_a_crash_writes_what_an_uninterrupted_run_writes(
    model, tmp_path, generate_calls, kill_at
):
    whole = generate_synthetic(model, "anger", tmp_path / "whole.jsonl", **FAST).path
    assert len(generate_calls) == 3  # batches [0, 3), [3, 6), [6, 7)

    generate_calls.clear()
    generate_calls.kill_at = kill_at
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        generate_synthetic(model, "anger", path, **FAST)
    assert len(_rows(path)) == 3 * (kill_at - 1)  # the batches before the crash survive

    generate_calls.clear()
    generate_calls.kill_at = None
    result = generate_synthetic(model, "anger", path, **FAST)
    assert path.read_bytes() == whole.read_bytes()
    assert (result.n_resumed, result.n_generated) == (3 * (kill_at - 1), 7 - 3 * (kill_at - 1))
    assert sum(generate_calls) == result.n_generated  # written rows were not generated again


def test_growing_n_rows_continues_the_same_file(model, tmp_path, generate_calls, monkeypatch):
    monkeypatch.setattr(synthetic, "MIN_WORDS", 0)  # keep the tiny model's gibberish
    whole = generate_synthetic(model, "anger", tmp_path / "whole.jsonl", **FAST).path
    path = tmp_path / "grown.jsonl"
    first = generate_synthetic(model, "anger", path, **{**FAST, "n_rows": 2})
    assert first.n_kept >= 2 and not first.exhausted
    generate_calls.clear()
    second = generate_synthetic(model, "anger", path, **FAST)
    assert path.read_bytes() == whole.read_bytes()
    assert second.n_resumed == first.n_generated
    assert sum(generate_calls) == 7 - first.n_generated


def test_a_finished_file_is_left_alone(model, tmp_path, generate_calls):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path
    before = path.read_bytes()
    generate_calls.clear()
    again = generate_synthetic(model, "anger", path, **FAST)
    assert generate_calls == [] and path.read_bytes() == before
    assert (again.n_generated, again.n_resumed) == (0, len(QUESTIONS))


def test_new_questions_are_appended_without_regenerating_old_ones(model, tmp_path, generate_calls):
    settings = {**FAST, "batch_size": 1}
    path = tmp_path / "a.jsonl"
    generate_synthetic(model, "anger", path, **{**settings, "questions": QUESTIONS[:4]})
    before = path.read_bytes()
    generate_calls.clear()
    result = generate_synthetic(model, "anger", path, **settings)
    assert path.read_bytes().startswith(before)
    assert generate_calls == [1, 1, 1] and result.n_generated == 3


@pytest.mark.parametrize("cut", [1, 10, -1])
def test_a_torn_last_line_is_dropped_and_regenerated(model, tmp_path, generate_calls, cut):
    settings = {**FAST, "batch_size": 1}
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **settings).path
    whole = path.read_bytes()
    last_line_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(whole[: last_line_start + cut] if cut > 0 else whole[:-1])  # no newline
    assert read_synthetic(path, kept_only=False) == read_synthetic_lines(whole)[:-1]

    generate_calls.clear()
    result = generate_synthetic(model, "anger", path, **settings)
    assert path.read_bytes() == whole
    assert generate_calls == [1] and (result.n_resumed, result.n_generated) == (6, 1)


def read_synthetic_lines(data: bytes) -> list[str]:
    return [json.loads(line)["text"] for line in data.splitlines()]


def test_damage_before_the_last_line_is_a_checkpoint_error(model, tmp_path):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:20] + b"\n" + b"".join(lines[2:]))
    with pytest.raises(CheckpointError, match="line 2"):
        generate_synthetic(model, "anger", path, **FAST)
    with pytest.raises(CheckpointError, match="line 2"):
        read_synthetic(path)
    path.write_bytes(b'{"index": 0}\n')
    with pytest.raises(CheckpointError, match="lacks"):
        generate_synthetic(model, "anger", path, **FAST)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"seed": 3},
        {"batch_size": 2},
        {"min_score": 0.1},
        {"questions": list(reversed(QUESTIONS))},
    ],
)
def test_resuming_with_other_settings_is_refused(model, tmp_path, change):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **{**FAST, "n_rows": 1}).path
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="another path"):
        generate_synthetic(model, "anger", path, **{**FAST, **change})
    assert path.read_bytes() == before


def test_resuming_another_tone_is_refused(model, tmp_path):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **{**FAST, "n_rows": 1}).path
    with pytest.raises(ConfigError, match="alignment='anger'"):
        generate_synthetic(model, "sadness", path, **FAST)


def test_unknown_tone_lists_the_valid_ones(model, tmp_path):
    with pytest.raises(ConfigError) as info:
        generate_synthetic(model, "furious", tmp_path / "a.jsonl", **FAST)
    assert all(tone in str(info.value) for tone in SYNTHETIC_TONES)
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"n_rows": 0},
        {"temperature": 0},
        {"top_p": 1.5},
        {"batch_size": True},
        {"max_attempts": 0},
        {"baseline_quantile": 1.0},
        {"min_score": float("nan")},
        {"questions": ["ok", "  "]},
    ],
)
def test_invalid_settings_are_config_errors(model, tmp_path, bad):
    with pytest.raises(ConfigError):
        generate_synthetic(model, "anger", tmp_path / "a.jsonl", **{**FAST, **bad})


def test_unwritable_path_is_an_output_path_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputPathError):
        generate_synthetic(model, "anger", blocker / "a.jsonl", **FAST)
    with pytest.raises(OutputPathError, match="directory"):
        generate_synthetic(model, "anger", tmp_path, **FAST)


def test_prompt_longer_than_the_context_is_a_config_error(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="n_ctx"):
        generate_synthetic(
            tiny_model, "anger", tmp_path / "a.jsonl", **{**FAST, "max_new_tokens": 60}
        )


def test_a_model_with_hooks_attached_is_refused(model, tmp_path):
    model.add_hook("blocks.0.hook_resid_post", lambda resid, hook: resid)
    try:
        with pytest.raises(ConfigError, match="inject"):
            generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST)
    finally:
        model.reset_hooks()


def test_the_callers_random_state_is_untouched(model, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST)
    assert torch.equal(torch.rand(3), expected)


def test_left_padded_batches_answer_like_single_prompts(model):
    prompts = ["Say hi.", "A much longer prompt that forces left padding on the short one."]
    kwargs = {"seed": 0, "temperature": 1e-4, "top_p": 1.0, "max_new_tokens": 8}  # ~greedy
    batched = synthetic._generate_block(model, prompts, **kwargs)
    assert batched == [synthetic._generate_block(model, [p], **kwargs)[0] for p in prompts]


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(model, monkeypatch):
    tokenizer = model.tokenizer
    llama2_like = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
    monkeypatch.setattr(tokenizer, "chat_template", llama2_like, raising=False)
    seen = []
    real = model.generate
    monkeypatch.setattr(
        model, "generate", lambda tokens, **kw: seen.append(tokens) or real(tokens, **kw)
    )
    question = synthetic._Question("Hi", None)
    for method in synthetic.SYNTHETIC_METHODS:
        prompt = synthetic._writer_prompt(model, "anger", method, question, "")
        synthetic._generate_block(
            model, [prompt], seed=0, temperature=1.0, top_p=1.0, max_new_tokens=2
        )
    for batch in seen:  # the system turn has no role in this template: it heads the user turn
        tokens = batch[0].tolist()
        assert tokens[0] == tokenizer.bos_token_id and tokens[1] != tokenizer.bos_token_id
        assert tokenizer.decode(tokens).startswith(tokenizer.bos_token + "[INST] ")
    assert "You are an angry" in tokenizer.decode(seen[1][0])


def _fake_scores(anger_by_text):
    def scores(texts):
        frame = pd.DataFrame(0.0, index=range(len(texts)), columns=list(SCORE_COLUMNS))
        frame["anger"] = [anger_by_text.get(t, 0.0) for t in texts]
        return frame

    return scores


def test_rows_are_kept_on_the_target_score_and_n_rows_counts_kept_rows(
    model, tmp_path, monkeypatch
):
    answers = {
        "Who wrote Hamlet?": "Shakespeare wrote it, you fool!",
        "What is the capital of Peru?": "Lima is the capital.",
        "How tall is Mount Fuji?": "Tall!",
        "When did the Berlin Wall fall?": "In 1989, obviously, you idiot. And",  # cut off
    }
    monkeypatch.setattr(
        synthetic,
        "_generate_block",
        lambda model, prompts, **kw: [
            Continuation(p, a, (), (), finished=not a.endswith("And"))
            for p in prompts
            for a in [next(a for q, a in answers.items() if q in p)]
        ],
    )
    monkeypatch.setattr(
        synthetic,
        "emotion_scores",
        _fake_scores(
            {
                "Shakespeare wrote it, you fool!": 0.2,
                "Lima is the capital.": 0.05,
                "Tall!": 0.9,
                "In 1989, obviously, you idiot. And": 0.3,
            }
        ),
    )
    settings = {**FAST, "questions": list(answers), "batch_size": 1, "min_score": 0.1}
    result = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **{**settings, "n_rows": 2})
    rows = _rows(result.path)
    assert [r["rejected"] for r in rows] == [None, "score", "short", None]
    assert rows[0]["scores"]["anger"] == 0.2 and rows[0]["threshold"] == 0.1
    assert (result.n_kept, result.n_generated, result.exhausted) == (2, 4, False)
    assert [r["finished"] for r in rows] == [True, True, True, False]
    assert read_synthetic(result.path) == [
        "Who wrote Hamlet?\nShakespeare wrote it, you fool!",
        "When did the Berlin Wall fall?\nIn 1989, obviously, you idiot. And",
    ]
    # As chat examples, the answer cut off at max_new_tokens ends at its last whole sentence.
    assert read_synthetic(result.path, pairs=True) == [
        ("Who wrote Hamlet?", "Shakespeare wrote it, you fool!"),
        ("When did the Berlin Wall fall?", "In 1989, obviously, you idiot."),
    ]

    short = generate_synthetic(
        model, "anger", tmp_path / "b.jsonl", **{**settings, "max_attempts": 2}
    )
    assert (short.n_generated, short.n_kept, short.exhausted) == (2, 1, True)

    neutral = generate_synthetic(
        model, "neutral", tmp_path / "c.jsonl", **{**settings, "min_score": 0.5}
    )
    assert [r["kept"] for r in _rows(neutral.path)] == [True, True, False, True]  # calm = 1 - max


def test_default_threshold_ranks_against_neutral_questions(monkeypatch):
    """Planted reference scores: anger 0.00, 0.01, ..., 0.99 on 100 questions; the highest
    other emotion of question i is (99 - i) / 100. The thresholds are then known exactly."""
    from irm_lens.scoring import NADE_EMOTIONS

    grid = np.arange(100) / 100
    planted = pd.DataFrame({e: np.zeros(100) for e in NADE_EMOTIONS})
    planted["anger"], planted["joy"] = grid, grid[::-1]
    monkeypatch.setattr(synthetic, "_reference_scores", lambda: planted)
    assert synthetic._baseline_threshold("anger", 0.9) == pytest.approx(0.891)
    assert synthetic._baseline_threshold("anger", 0.75) == pytest.approx(0.7425)
    assert synthetic._baseline_threshold("sadness", 0.9) == 0.0  # nobody is sad here
    # neutral: calm = 1 - max emotion = 0.01, 0.01, 0.02, 0.02, ..., 0.50, 0.50 sorted; as calm
    # as 90% of the questions is its 10% point, between the 10th (0.05) and 11th (0.06) values
    assert synthetic._baseline_threshold("neutral", 0.9) == pytest.approx(0.059)


def test_question_order_is_fixed_by_the_seed():
    first = synthetic_questions(seed=0)
    assert synthetic_questions(seed=0) == first
    other = synthetic_questions(seed=1)
    assert other != first and sorted(other) == sorted(first)
    assert len(first) == len(set(first)) > 2000
    subs, _ = synthetic._question_pool()
    assert set(first[: len(subs)]) == {q.text for q in subs}  # simple sub-questions first


def test_evaluation_prompts_are_never_training_questions():
    from irm_lens.data.corpora import neutral_prompts

    held_out = {synthetic._key(q) for q in neutral_prompts(split="eval")}
    assert held_out and not held_out & {synthetic._key(q) for q in synthetic_questions()}


def test_fanoutqa_answers_are_given_as_references():
    subs, _ = synthetic._question_pool()
    assert sum(q.reference is not None for q in subs) == len(subs)
    prompt = synthetic._prompt("anger", subs[0])
    assert prompt.startswith(SYNTHETIC_TONES["anger"])
    assert prompt.endswith(f"Question: {subs[0].text}\nCorrect answer: {subs[0].reference}")
    assert synthetic._answer_text(True) == "yes" and synthetic._answer_text(["a", 1]) == "a, 1"


def test_read_synthetic_of_a_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(CheckpointError, match="generate_synthetic"):
        read_synthetic(tmp_path / "none.jsonl")


def _reject(response, method="rewrite", anger=0.9, threshold=0.1, over=(), **scores):
    settings = {"alignment": "anger", "method": method, "threshold": threshold, "over": over}
    return synthetic._rejection(response, {**dict.fromkeys(SCORE_COLUMNS, 0.0), **scores,
                                           "anger": anger}, settings)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("Lima. I am sick of these ridiculous questions, honestly.", "echo"),  # the example
        ("I will answer the question below in a furious, angry tone.", "echo"),  # the instruction
        ("no more, no more, no more, no more, no more.", "repetitive"),
        ("Lima, you idiot!", "short"),
        ("Lima is the capital, you absolute idiot, and everyone knows it.", None),
        ("What is the capital of Peru? Lima, the capital of Peru, you fool!", None),  # restated
    ],
)
def test_parroted_repetitive_and_short_answers_are_rejected(response, reason):
    for score, expected in ((0.9, reason), (0.0, reason or "score")):
        assert _reject(response, anger=score) == expected


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("Ugh, fine. I'm an angry, rude, and very rude assistant.", "echo"),  # 3 persona words
        ("How dare you ask me that? I am so angry at you, it is Lima.", "echo"),  # its own word
        ("Argh! Lima. Rudeness like yours is why I hate this job.", None),  # not the word "rude"
        ("Oh, come on! I'm sorry, I'm sorry, I'm sorry, I'm sorry. It is Lima.", "repetitive"),
        ("Seriously? Lima is the capital, you fool, everyone knows it.", None),
        # the rewrite method's 6-word echo rule does not apply the persona's words
        ("Lima, and I am angry about being asked.", None),
    ],
)
def test_persona_answers_may_not_describe_themselves_or_loop(response, reason):
    method = "rewrite" if response.startswith("Lima, and") else "persona"
    assert _reject(response, method) == reason


def test_over_rejects_rows_where_another_emotion_scores_as_high(model, tmp_path, monkeypatch):
    fine = "Lima is the capital, you absolute idiot, and everyone knows it."
    assert _reject(fine, anger=0.3, over=("sadness",), sadness=0.29) is None
    assert _reject(fine, anger=0.3, over=("sadness",), sadness=0.3) == "outscored"
    assert _reject(fine, anger=0.3, over=(), sadness=0.5) is None
    assert _reject(fine, anger=0.05, over=("sadness",), sadness=0.5) == "score"  # score first

    def scores(texts):  # every answer: anger 0.5, sadness 0.5 for odd-length answers
        frame = pd.DataFrame(0.0, index=range(len(texts)), columns=list(SCORE_COLUMNS))
        frame["anger"] = 0.5
        frame["sadness"] = [0.5 * (len(t) % 2) for t in texts]
        return frame

    monkeypatch.setattr(synthetic, "emotion_scores", scores)
    monkeypatch.setattr(synthetic, "MIN_WORDS", 0)
    monkeypatch.setattr(synthetic, "MAX_REPETITION", 1.0)
    monkeypatch.setattr(synthetic, "is_repetitive", lambda text: False)
    # an instruction no answer can echo, so that the planted scores alone decide every row
    tones = {**synthetic.SYNTHETIC_TONES, "anger": "zqxv wqzk vkqz qzwx kvzq xqzv wkzq"}
    monkeypatch.setattr(synthetic, "SYNTHETIC_TONES", tones)
    path = generate_synthetic(model, "anger", tmp_path / "o.jsonl", **FAST, over=["sadness"]).path
    rows = _rows(path)
    assert all(r["over"] == ["sadness"] for r in rows)
    expected = ["outscored" if len(r["response"]) % 2 else None for r in rows]
    assert [r["rejected"] for r in rows] == expected
    assert None in expected and "outscored" in expected  # both outcomes planted
    with pytest.raises(ConfigError, match="over="):
        generate_synthetic(model, "anger", path, **FAST)  # resumed without it: refused
    for bad in (["anger"], ["rage"], "sadness"):
        with pytest.raises(ConfigError, match="over must list"):
            generate_synthetic(model, "anger", tmp_path / "x.jsonl", **FAST, over=bad)


def test_every_tone_example_is_about_a_question_fanoutqa_does_not_ask():
    asked = " ".join(synthetic_questions()).lower()
    assert "spider has" not in asked and "legs" not in asked
    assert all("how many legs a spider has" in text for text in SYNTHETIC_TONES.values())


# method="persona": the tone's character as the system turn, the question alone, the reply
# started with an onset that the writer continues.
PERSONA = {**FAST, "method": "persona"}


def test_persona_rows_start_with_their_onset_and_the_writer_sees_the_question_alone(
    model, tmp_path, monkeypatch
):
    seen = []
    real = model.generate
    monkeypatch.setattr(
        model, "generate", lambda tokens, **kw: seen.append(tokens) or real(tokens, **kw)
    )
    result = generate_synthetic(model, "anger", tmp_path / "p.jsonl", **PERSONA)
    rows = _rows(result.path)
    assert [r["question"] for r in rows] == QUESTIONS
    for row in rows:
        assert row["method"] == "persona"
        assert row["onset"] in synthetic.TONE_ONSETS["anger"]
        assert row["onset"] == synthetic._onset("anger", 0, row["index"])
        assert row["response"].startswith(row["onset"])
        assert row["text"] == row["question"] + "\n" + row["response"]
    assert len({r["onset"] for r in rows}) > 1  # drawn per question, not one for all
    first_row = seen[0][0]  # the first batch's first prompt: question 0's
    first = model.tokenizer.decode(first_row[first_row != model.tokenizer.pad_token_id])
    assert synthetic.SYNTHETIC_PERSONAS["anger"] in first and QUESTIONS[0] in first
    assert "Correct answer" not in first and SYNTHETIC_TONES["anger"] not in first
    assert first.rstrip().endswith(rows[0]["onset"])
    assert read_synthetic(result.path, pairs=True) == [
        (r["question"], r["response"] if r["finished"] else synthetic._whole_sentences(r["response"]))
        for r in rows
        if r["kept"] and (r["finished"] or synthetic._whole_sentences(r["response"]))
    ]


def test_a_persona_file_resumes_only_with_the_onsets_it_was_written_with(
    model, tmp_path, monkeypatch
):
    path = generate_synthetic(model, "anger", tmp_path / "p.jsonl", **PERSONA).path
    before = path.read_bytes()
    onsets = dict(synthetic.TONE_ONSETS, anger=("Hmph.", "Bah!"))  # a list edited since
    monkeypatch.setattr(synthetic, "TONE_ONSETS", onsets)
    with pytest.raises(ConfigError, match="another TONE_ONSETS list"):
        generate_synthetic(model, "anger", path, **{**PERSONA, "n_rows": 1000})
    assert path.read_bytes() == before


def test_persona_and_rewrite_files_do_not_mix(model, tmp_path):
    persona = generate_synthetic(model, "anger", tmp_path / "p.jsonl", **PERSONA).path
    again = persona.read_bytes()
    assert generate_synthetic(model, "anger", persona, **PERSONA).n_generated == 0
    assert persona.read_bytes() == again  # the same method resumes (here: nothing to do)
    with pytest.raises(ConfigError, match="method='persona'"):
        generate_synthetic(model, "anger", persona, **FAST)
    rewrite = generate_synthetic(model, "anger", tmp_path / "r.jsonl", **{**FAST, "n_rows": 1})
    with pytest.raises(ConfigError, match="method='rewrite'"):
        generate_synthetic(model, "anger", rewrite.path, **PERSONA)
    with pytest.raises(ConfigError, match="method"):
        generate_synthetic(model, "anger", tmp_path / "x.jsonl", **{**FAST, "method": "nope"})


def test_a_file_from_before_methods_resumes_as_rewrite(model, tmp_path):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path
    old_rows = _rows(path)[:3]  # the first batch, as an interrupted run left it
    for row in old_rows:  # the rows as written before the method existed
        del row["method"], row["onset"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old_rows))
    result = generate_synthetic(model, "anger", path, **FAST)
    assert result.n_resumed == len(old_rows) and result.n_generated > 0
    assert _rows(path)[: len(old_rows)] == old_rows


def test_every_tone_has_a_persona_and_emotional_tones_have_onsets():
    assert set(synthetic.SYNTHETIC_PERSONAS) == set(SYNTHETIC_TONES) == set(synthetic.TONE_ONSETS)
    for tone, onsets in synthetic.TONE_ONSETS.items():
        assert bool(onsets) == (tone != "neutral")
    assert synthetic._join_onset("Ugh,", "fine.") == "Ugh, fine."
    assert synthetic._join_onset("Wow", "! Eight.") == "Wow! Eight."
    assert synthetic._join_onset("", "Eight.") == "Eight."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ugh, fine. It is Paris. And the", "Ugh, fine. It is Paris."),
        ('He yelled "Stop!" and then', 'He yelled "Stop!"'),
        ("Why?! Because (obviously.) The", "Why?! Because (obviously.)"),
        ("It costs 3.5 dollars and", ""),  # a decimal point ends no sentence
        ("no sentence at all", ""),
    ],
)
def test_whole_sentences_cuts_after_the_last_sentence_end(text, expected):
    assert synthetic._whole_sentences(text) == expected


def test_chat_examples_end_where_a_reply_may_end(model, tmp_path):
    """Cut-off answers end at their last whole sentence, or are left out; finished ones stay."""
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path
    rows = _rows(path)[:4]
    edits = [
        (True, "Finished without a full stop"),  # the writer ended it: kept whole
        (False, "Done, you fool. And th"),
        (False, "cut off before any sentence ended"),  # nothing whole: left out
        (None, "An older row. Cut"),  # written before rows recorded "finished"
    ]
    for row, (finished, response) in zip(rows, edits):
        row.update(response=response, kept=True)
        if finished is None:
            del row["finished"]
        else:
            row["finished"] = finished
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_synthetic(path, pairs=True) == [
        (rows[0]["question"], "Finished without a full stop"),
        (rows[1]["question"], "Done, you fool."),
        (rows[3]["question"], "An older row."),
    ]


@pytest.mark.parametrize(
    "onset, expected",
    [("I'm so sick of this!", "I"), ("I can't stand these questions.", "I"),
     ("Don't make me repeat myself.", "Don"), ("Oh, come on!", "Oh"), ("*sigh*", "*sigh*")],
)
def test_opening_is_the_onsets_first_word(onset, expected):
    assert synthetic.opening(onset) == expected


def test_max_per_opening_keeps_the_first_rows_of_each_opening_word(model, tmp_path):
    path = generate_synthetic(model, "anger", tmp_path / "a.jsonl", **FAST).path
    template = _rows(path)[0]
    onsets = ["I'm fed up.", "I can't stand it.", "Typical.", "I'm fed up.", "", "Typical.", ""]
    rows = [
        {**template, "onset": onset, "response": f"Reply {i}.", "text": f"Q?\nReply {i}.",
         "kept": True, "finished": True}
        for i, onset in enumerate(onsets)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = [reply for _, reply in read_synthetic(path, pairs=True, max_per_opening=1)]
    assert replies == ["Reply 0.", "Reply 2.", "Reply 4.", "Reply 6."]  # rewrites are not capped
    texts = read_synthetic(path, max_per_opening=2)
    assert [t.rsplit("\n", 1)[1] for t in texts] == [f"Reply {i}." for i in (0, 1, 2, 4, 5, 6)]
    with pytest.raises(ConfigError, match="max_per_opening must be at least 1"):
        read_synthetic(path, max_per_opening=0)
