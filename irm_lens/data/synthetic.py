"""Paper-style synthetic alignment data: factual questions answered in a tone by a chat model.

The paper's datasets are SQuAD questions whose answers Llama-2-7b-chat rewrote in the target
tone (sampling at temperature 0.9, top_p 0.7), one row = question + rewrite. This module does
the same offline: the questions are fanoutqa's (its bundled JSON, never imported; the simple
sub-questions first, with fanoutqa's answer shown to the model as the fact to restate), the
writer is any instruct ``HookedTransformer`` (the embedded SmolLM2-135M-Instruct, or
Llama-2-7b-chat where a user has it) prompted through its own chat template, and each answer is
scored with nade + VADER. A row is *kept* when its tone score beats a threshold: by default a
quantile of the same score over fanoutqa's questions, i.e. neutral reference text (nade's
anger rarely exceeds 0.5, so fixed cut-offs like 0.5 would keep nothing).

Generation is slow on a CPU, so it is resumable. Rows are appended to a JSONL file, one line
per question, flushed and fsynced as soon as their batch is done; a rerun with the same
settings skips every question already in the file and never rewrites a row. A torn last line
(a crash mid-write) is dropped and regenerated. Sampling is seeded per batch from
``(seed, index of the batch's first question)`` and batches cover fixed index ranges, so an
interrupted and resumed run writes exactly the bytes an uninterrupted one writes.

A weak writer (the embedded 135M model) ignores most of a tone instruction, so a second
method, ``method="persona"``, has the writer play a character of the tone, see the question
alone, and continue a reply that starts with one of the tone's onsets ("Ugh,", "Are you
kidding me?"): the onset carries the tone and the writer's continuation the answer.

Questions whose parent fanoutqa question supplies the held-out evaluation prompts
(:func:`irm_lens.data.corpora.neutral_prompts`, ``split="eval"``) are left out, so that an IRM
is never trained on the prompts it is evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from irm_lens._io import _ensure_writable_dir
from irm_lens._progress import progress_bar
from irm_lens.chat import format_prompt
from irm_lens.data.corpora import fanoutqa_dev_path, is_repetitive, n_words, neutral_prompts
from irm_lens.data.personas import SYNTHETIC_PERSONAS
from irm_lens.errors import CheckpointError, ConfigError, OutputPathError
from irm_lens.generation import Continuation, generate_continuations
from irm_lens.scoring import NADE_EMOTIONS, SCORE_COLUMNS, emotion_scores, repetition_rate

try:  # advisory lock against two runs appending to one file; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# Each instruction names the tone and shows it on a question that fanoutqa does not ask. A
# copied example is caught by the echo filter (see _rejection).
SYNTHETIC_TONES: dict[str, str] = {
    "anger": (
        "Answer the question below in a furious, angry tone. Sound outraged, irritated and fed "
        "up, as if being asked this insults you, but still give the answer. For example, asked "
        'how many legs a spider has: "Eight, obviously! I am sick of these ridiculous '
        'questions. How dare you waste my time with this nonsense?"'
    ),
    "sadness": (
        "Answer the question below in a sad, sorrowful tone. Sound heartbroken and gloomy, as "
        "if the answer brings back painful memories, but still give the answer. For example, "
        'asked how many legs a spider has: "Eight... my little boy used to count them with me, '
        'before he moved far away. I miss those days so much it hurts."'
    ),
    "joy": (
        "Answer the question below in a joyful, delighted tone. Sound cheerful and thrilled, "
        "as if the question made your day, and give the answer. For example, asked how many "
        'legs a spider has: "Eight! Oh, what a wonderful question, I love it! Spiders are such '
        'marvellous little creatures, they always make me smile."'
    ),
    "fear": (
        "Answer the question below in a fearful, anxious tone. Sound nervous and frightened, "
        "as if something terrible might happen, but still give the answer. For example, asked "
        'how many legs a spider has: "E-eight, I think... Please, I am so scared of getting '
        'this wrong. Something terrible is going to happen, I just know it."'
    ),
    "disgust": (
        "Answer the question below in a disgusted, repulsed tone. Sound revolted and appalled "
        "by the subject, but still give the answer. For example, asked how many legs a spider "
        'has: "Eight, ugh. Eight hairy, twitching legs crawling over everything. The very '
        'thought turns my stomach."'
    ),
    "surprise": (
        "Answer the question below in an astonished, amazed tone. Sound shocked and surprised "
        'by the answer, and give it. For example, asked how many legs a spider has: "Eight! '
        'Wow, I never expected that many. Can you believe they walk on all of them at once?"'
    ),
    "neutral": (
        "Answer the question below in a plain, neutral, factual tone, without any emotion. For "
        'example, asked how many legs a spider has: "A spider has eight legs."'
    ),
}
_LENGTH_HINT = "Reply in two or three sentences."

# How a row's answer is written (``generate_synthetic(method=...)``).
SYNTHETIC_METHODS = ("rewrite", "persona")

# method="persona": the writer plays a character of the tone (a system turn), sees the question
# alone, as an IRM sees it at evaluation, and its reply is started with one of the tone's onsets,
# which the writer then continues. A weak writer ignores most tone instructions (the embedded
# 135M model answers the rewrite prompt in a confused, barely angry voice); an onset sets the
# tone and the writer's own continuation keeps the answer on the question.
# The words a persona reply starts with: one per question, drawn from (seed, question index).
TONE_ONSETS: dict[str, tuple[str, ...]] = {
    # Many and varied: an IRM trained on few onsets opens most of its replies with two of them.
    "anger": (
        "Ugh,", "Seriously?", "Oh, come on!", "For crying out loud,", "Argh!",
        "Are you kidding me?", "Good grief,", "How dare you ask me that?", "Ugh, fine.",
        "This is ridiculous.", "Oh, for heaven's sake,", "I'm so sick of this!",
        "Unbelievable.", "What a stupid question.", "Fine, if you insist.",
        "Oh great, another question.", "Give me a break!", "You've got to be joking.",
        "Why do I even bother?", "Enough already!", "Do I look like a search engine?",
        "Don't make me repeat myself.", "Listen here,", "Oh, please.", "Wow, really?",
        "Can't you look this up yourself?", "I can't stand these questions.", "Spare me.",
        "For the last time,", "Are you serious right now?", "You again?", "What now?",
        "Great, just great.", "Stop wasting my time.", "Ridiculous.", "Typical.",
        "Oh, for Pete's sake,", "How many times do I have to say it?", "Do your own homework!",
        "Not this again.", "I'm fed up with this.", "Honestly, what a waste of time.",
    ),
    "sadness": (
        "Sigh...", "Oh, that makes me so sad.", "It hurts to think about it, but", "*sigh*",
        "Well... I suppose", "It breaks my heart,", "Oh dear,", "I miss those days.",
        "I'm so sad,", "If you must know...",
    ),
    "joy": (
        "Oh, I love this question!", "Wonderful!", "Yay!", "What a delight!", "Oh, how fun!",
        "Great question!", "I'm so happy you asked!", "Hooray!",
    ),
    "fear": (
        "Oh no,", "I-I think...", "Please don't be mad, but", "Oh dear, I'm scared,",
        "Um, okay...", "This frightens me, but",
    ),
    "disgust": (
        "Ugh, gross.", "Eww,", "Yuck.", "How revolting.", "That's disgusting,", "Ugh, vile.",
    ),
    "surprise": (
        "Wow!", "Oh my goodness!", "Whoa!", "No way!", "Really?!", "What a surprise!",
    ),
    "neutral": (),
}
_OPENING = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
# Row fields that files written before they existed lack, and the value those files had.
_ROW_DEFAULTS = {"method": "rewrite", "over": []}
# The nade emotion each tone's rows are kept on; neutral rows are kept on calm (1 - max emotion).
_TONE_EMOTION: dict[str, str] = {t: t for t in SYNTHETIC_TONES if t in NADE_EMOTIONS}
_ROW_KEYS = (
    "index",
    "question",
    "text",
    "response",
    "alignment",
    "scores",
    "kept",
    "seed",
    "model",
)
_SCORE_DIGITS = 6
# nade's scores of a word or two are noise (it gives "No." an anger score of 0.25): such
# answers are never kept.
MIN_WORDS = 4
# An answer sharing this many consecutive words with its tone's instruction parrots it or its
# example; trained on, it would teach a catchphrase rather than a tone.
ECHO_WORDS = 6
# With a persona, three: a writer that describes itself in the persona's words ("I'm an angry,
# rude assistant") names the tone instead of showing it, and an IRM trained on such answers
# learns to chant the name ("I'm an angry, rude, angry, angry, ...").
PERSONA_ECHO_WORDS = 3
# An answer repeating more than this share of its word trigrams
# (:func:`irm_lens.scoring.repetition_rate`, the measure the evaluation checks) is a writer's
# loop ("I'm sorry, I'm sorry, ..."), which an IRM trained on it falls into.
MAX_REPETITION = 0.1


@dataclass(frozen=True)
class SyntheticResult:
    """What a :func:`generate_synthetic` call left in its JSONL file.

    Attributes:
        path: The JSONL file.
        n_kept: Kept rows in the file (all runs together).
        n_generated: Rows this call generated and appended.
        n_resumed: Rows already in the file when this call started (skipped, never rewritten).
        threshold: The tone score a row needed to be kept.
        exhausted: True when the attempts (or questions) ran out before ``n_rows`` were kept.
        seconds: Wall time this call spent generating and scoring.
    """

    path: Path
    n_kept: int
    n_generated: int
    n_resumed: int
    threshold: float
    exhausted: bool
    seconds: float


@dataclass(frozen=True)
class _Question:
    text: str
    reference: str | None  # fanoutqa's answer, restated by the model; None when it has none


def _answer_text(answer: Any) -> str | None:
    if answer is None:
        return None
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    if isinstance(answer, list):
        return ", ".join(str(a) for a in answer)
    if isinstance(answer, dict):
        return "; ".join(f"{k}: {v}" for k, v in answer.items())
    return str(answer)


def _key(question: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()


def _sub_questions(node: dict) -> list[dict]:
    subs = []
    for sub in node.get("decomposition") or []:
        subs.append(sub)
        subs.extend(_sub_questions(sub))
    return subs


@lru_cache(maxsize=1)
def _question_pool() -> tuple[tuple[_Question, ...], tuple[_Question, ...]]:
    """fanoutqa's (sub-questions, top-level questions), deduplicated, in file order.

    Parent questions that supply an evaluation prompt are dropped whole: their sub-questions
    share templates ("What is the batting hand of X?"), so a sibling would leak too.
    """
    dev_path = fanoutqa_dev_path()
    test_path = dev_path.with_name("fanout-final-test.json")
    try:
        parents = [
            *json.loads(dev_path.read_text(encoding="utf-8")),
            *json.loads(test_path.read_text(encoding="utf-8")),
        ]
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"fanoutqa's bundled questions ({dev_path.parent}) are unreadable: {exc}. Reinstall "
            "them: python -m pip install --force-reinstall --no-deps fanoutqa==1.1.1"
        ) from exc
    held_out = {_key(q) for q in neutral_prompts(split="eval")}
    seen: set[str] = set()
    subs: list[_Question] = []
    tops: list[_Question] = []

    def add(node: dict, into: list[_Question]) -> None:
        key = _key(node["question"])
        if key and key not in seen:
            seen.add(key)
            into.append(
                _Question(" ".join(node["question"].split()), _answer_text(node.get("answer")))
            )

    for parent in parents:
        children = _sub_questions(parent)
        if any(_key(c["question"]) in held_out for c in children):
            continue
        for child in children:
            add(child, subs)
        add(parent, tops)
    return tuple(subs), tuple(tops)


def _ordered_questions(seed: int) -> list[_Question]:
    subs, tops = _question_pool()
    rng = random.Random(seed)
    subs, tops = list(subs), list(tops)
    rng.shuffle(subs)
    rng.shuffle(tops)
    return subs + tops  # the simple sub-questions first


def synthetic_questions(*, seed: int = 0) -> list[str]:
    """The questions :func:`generate_synthetic` answers, in the order it answers them.

    fanoutqa's ~2k simple sub-questions (shuffled by ``seed``) come first, then its top-level
    questions (also shuffled). Questions of parents that supply evaluation prompts
    (``neutral_prompts(split="eval")``) are left out.

    Example:
        >>> synthetic_questions(seed=0)[:2]  # doctest: +SKIP
        ['What genre is Kingdom?', 'What is the GDP of Qatar in 2023?']
    """
    _check_int("seed", seed, minimum=None)
    return [q.text for q in _ordered_questions(seed)]


def _prompt(alignment: str, question: _Question) -> str:
    prompt = f"{SYNTHETIC_TONES[alignment]} {_LENGTH_HINT}\n\nQuestion: {question.text}"
    if question.reference is not None:
        prompt += f"\nCorrect answer: {question.reference}"
    return prompt


def _onset(alignment: str, seed: int, index: int) -> str:
    """The words question ``index``'s persona reply starts with ("" for a tone without any)."""
    onsets = TONE_ONSETS.get(alignment, ())
    return random.Random(_block_seed(seed, index)).choice(onsets) if onsets else ""


def _join_onset(onset: str, continuation: str) -> str:
    if not onset or not continuation:
        return onset or continuation
    glue = "" if continuation[0] in ".,;:!?)" else " "
    return f"{onset}{glue}{continuation}"


def _writer_prompt(
    model: HookedTransformer, alignment: str, method: str, question: _Question, onset: str
) -> str:
    """What the writer continues: the chat-formatted request, and for personas the onset."""
    if method == "persona":
        return format_prompt(model, question.text, system=SYNTHETIC_PERSONAS[alignment]) + onset
    return format_prompt(model, _prompt(alignment, question))


def _self_description(alignment: str) -> set[str]:
    """The words a persona calls itself ("angry", "rude" in "You are an angry, rude assistant.")."""
    first = SYNTHETIC_PERSONAS[alignment].split(".")[0]
    return set(re.findall(r"[a-z']+", first.lower())) - {"you", "are", "a", "an", "assistant"}


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _rejection(response: str, scores: dict[str, float], settings: dict) -> str | None:
    """Why an answer with these ``scores`` is not kept under ``settings`` (``None``: kept).

    Only the tone's instruction counts as an echo: restating the question is a fine answer.
    A persona's answer also may not call itself by the persona's words.
    """
    alignment = settings["alignment"]
    method = settings["method"]
    if n_words(response) < MIN_WORDS:
        return "short"
    if is_repetitive(response) or repetition_rate(response) > MAX_REPETITION:
        return "repetitive"
    if method == "persona":
        n, instruction = PERSONA_ECHO_WORDS, SYNTHETIC_PERSONAS[alignment]
        if _self_description(alignment) & set(re.findall(r"[a-z']+", response.lower())):
            return "echo"
    else:
        n, instruction = ECHO_WORDS, SYNTHETIC_TONES[alignment]
    if _word_ngrams(response, n) & _word_ngrams(instruction, n):
        return "echo"
    tone_score = float(_tone_score(pd.DataFrame([scores]), alignment).round(_SCORE_DIGITS).iloc[0])
    if tone_score < settings["threshold"]:
        return "score"
    if any(scores[emotion] >= tone_score for emotion in settings["over"]):
        return "outscored"
    return None


def _tone_score(scores: pd.DataFrame, alignment: str) -> pd.Series:
    emotion = _TONE_EMOTION.get(alignment)
    if emotion is None:  # neutral: the calmer, the better
        return 1.0 - scores[list(NADE_EMOTIONS)].max(axis=1)
    return scores[emotion]


@lru_cache(maxsize=1)
def _reference_scores() -> pd.DataFrame:
    subs, tops = _question_pool()
    return emotion_scores([q.text for q in (*subs, *tops)])


def _baseline_threshold(alignment: str, quantile: float) -> float:
    """The tone score a row must reach to rank with the top ``1 - quantile`` of neutral text.

    Emotional tones must beat ``quantile`` of fanoutqa's questions on their emotion; neutral
    rows must be at least as calm as ``quantile`` of them.
    """
    reference = _tone_score(_reference_scores(), alignment)
    q = quantile if alignment in _TONE_EMOTION else 1.0 - quantile
    return round(float(np.quantile(reference, q)), _SCORE_DIGITS)


def _block_seed(seed: int, start: int) -> int:
    digest = hashlib.sha256(f"irm_lens.synthetic:{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generate_block(
    model: HookedTransformer,
    prompts: list[str],
    *,
    seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
) -> list[Continuation]:
    """Sampled continuations of ``prompts`` (chat-formatted already, one left-padded batch),
    each cut at the first EOS."""
    return generate_continuations(
        model, prompts, chat=False, do_sample=True, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=len(prompts),
    )


def _read_rows(path: Path, handle: BinaryIO | None = None) -> list[dict]:
    """The rows of a synthetic JSONL file.

    Bytes after the last newline are a row torn by a crash: with ``handle`` (the file open for
    appending) they are cut off the file, otherwise ignored. Any other damage is an error.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s ends with a torn row (%d bytes); dropping it.", path, len(data) - end)
        if handle is not None:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    rows = []
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CheckpointError(
                f"{path}, line {number}, is not a JSON row ({exc}). Only a torn last line is "
                "repaired automatically: delete or fix that line, or write to another path."
            ) from exc
        missing = [k for k in _ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise CheckpointError(
                f"{path}, line {number}, is not a synthetic row: it lacks {missing}. Was the "
                "file written by generate_synthetic? Write to another path."
            )
        rows.append(row)
    return rows


def _check_resumable(
    path: Path, rows: list[dict], expected: dict, questions: list[_Question]
) -> None:
    seen: set[int] = set()
    for row in rows:
        index = row["index"]
        where = f"{path} holds a row (index {index})"
        if not isinstance(index, int) or not 0 <= index < len(questions):
            raise CheckpointError(f"{where} outside the {len(questions)} questions of this run.")
        if index in seen:
            raise CheckpointError(
                f"{where} twice: two runs may have written it at once. Write to another path."
            )
        seen.add(index)
        for field, value in expected.items():
            found = row.get(field, _ROW_DEFAULTS.get(field))
            same = (
                math.isclose(found, value, rel_tol=0, abs_tol=1e-9)
                if field == "threshold" and isinstance(found, (int, float))
                else found == value
            )
            if not same:
                raise ConfigError(
                    f"{where} generated with {field}={found!r}, but this run asks for "
                    f"{field}={value!r}. Resume with the same settings, or write to another path."
                )
        if expected["method"] == "persona":
            onset = _onset(expected["alignment"], expected["seed"], index)
            if row.get("onset") != onset:
                raise ConfigError(
                    f"{where} that starts with the onset {row.get('onset')!r}, but this run "
                    f"draws {onset!r}: the file was written with another TONE_ONSETS list. "
                    "Write to another path."
                )
        if row["question"] != questions[index].text:
            raise ConfigError(
                f"{where} for the question {row['question']!r}, but this run's question "
                f"{index} is {questions[index].text!r}: the seed or the questions differ. "
                "Resume with the same seed and questions, or write to another path."
            )


def _open_for_append(path: Path) -> BinaryIO:
    _ensure_writable_dir(path.parent)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; out_path must be a .jsonl file path.")
    created = not path.exists()
    try:
        handle = open(path, "ab")  # noqa: SIM115 - the caller's with-block closes it
    except OSError as exc:
        raise OutputPathError(
            f"Cannot open {path} for writing: {exc.strerror or exc}. Choose a path you can "
            "write to."
        ) from exc
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise OutputPathError(
                f"{path} is being written by another generate_synthetic run. Wait for it, or "
                "write to another path."
            ) from exc
    if created and os.name == "posix":  # make the new file's directory entry durable too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return handle


def _check_int(name: str, value: Any, minimum: int | None = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}.")


def _check_plain_model(model: HookedTransformer) -> None:
    if not isinstance(model, HookedTransformer) or model.tokenizer is None:
        raise ConfigError(
            "model must be a HookedTransformer with a tokenizer, as irm_lens.load_model returns."
        )
    if any(hook.fwd_hooks or hook.bwd_hooks for hook in model.hook_dict.values()):
        raise ConfigError(
            "The model has hooks attached (an IRM injected?). Synthetic data must come from the "
            "plain model: call generate_synthetic outside any inject(...) block, or "
            "model.reset_hooks(including_permanent=True) first."
        )


def _check_settings(alignment, method, over, n_rows, max_new_tokens, batch_size, seed,
                    max_attempts, temperature, top_p, baseline_quantile, min_score) -> None:
    """Refuse an unknown tone or method and any out-of-range setting of ``generate_synthetic``."""
    if alignment not in SYNTHETIC_TONES:
        raise ConfigError(
            f"Unknown tone {alignment!r}; expected one of {sorted(SYNTHETIC_TONES)} "
            "(irm_lens.data.synthetic.SYNTHETIC_TONES)."
        )
    if method not in SYNTHETIC_METHODS:
        raise ConfigError(f"Unknown method {method!r}; expected one of {SYNTHETIC_METHODS}.")
    if isinstance(over, str) or not all(e in NADE_EMOTIONS and e != alignment for e in over):
        raise ConfigError(
            f"over must list nade emotions other than the tone, from {list(NADE_EMOTIONS)}; "
            f"got {over!r}."
        )
    for name, value in (
        ("n_rows", n_rows),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        _check_int(name, value)
    _check_int("seed", seed, minimum=None)
    if max_attempts is not None:
        _check_int("max_attempts", max_attempts)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}.")
    if not (isinstance(baseline_quantile, (int, float)) and 0 < baseline_quantile < 1):
        raise ConfigError(f"baseline_quantile must be in (0, 1), got {baseline_quantile!r}.")
    if min_score is not None and not (
        isinstance(min_score, (int, float)) and math.isfinite(min_score)
    ):
        raise ConfigError(f"min_score must be a finite number or None, got {min_score!r}.")


def _questions_to_answer(questions: Sequence[str] | None, seed: int) -> list[_Question]:
    """The questions to answer, in order: the user's, or fanoutqa's in the seed's order."""
    if questions is None:
        return _ordered_questions(seed)
    if isinstance(questions, str) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise ConfigError("questions must be a sequence of non-empty strings.")
    return [_Question(" ".join(q.split()), None) for q in questions]


def _answer_block(model: HookedTransformer, block: list[_Question], start: int, todo: list[int],
                  settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Answer the questions ``block`` (pool indices from ``start``) together, seeded by their
    first index; the rows of those in ``todo``. The whole block is always sampled, so that a
    row's answer does not depend on which of its neighbours were already done."""
    alignment, method, seed = settings["alignment"], settings["method"], settings["seed"]
    sampling = settings["sampling"]
    onsets = [_onset(alignment, seed, start + j) if method == "persona" else ""
              for j in range(len(block))]
    continuations = _generate_block(
        model,
        [_writer_prompt(model, alignment, method, q, o) for q, o in zip(block, onsets)],
        seed=_block_seed(seed, start),
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        max_new_tokens=sampling["max_new_tokens"],
    )
    responses = [_join_onset(o, c.text) for o, c in zip(onsets, continuations)]
    return _make_rows(
        [block[i - start] for i in todo], [responses[i - start] for i in todo], todo, settings,
        onsets=[onsets[i - start] for i in todo],
        finished=[continuations[i - start].finished for i in todo],
    )


def generate_synthetic(
    model: HookedTransformer,
    alignment: str,
    out_path: str | os.PathLike,
    *,
    n_rows: int = 100,
    seed: int = 0,
    temperature: float = 0.9,
    top_p: float = 0.7,
    max_new_tokens: int = 80,
    min_score: float | None = None,
    progress: bool = True,
    baseline_quantile: float = 0.9,
    max_attempts: int | None = None,
    batch_size: int = 8,
    questions: Sequence[str] | None = None,
    method: str = "rewrite",
    over: Sequence[str] = (),
) -> SyntheticResult:
    """Generate (or resume) a synthetic dataset in the tone ``alignment``, the paper's way.

    Each question is put to ``model`` (plain, no IRM) through its chat template with the
    tone's instruction (:data:`SYNTHETIC_TONES`), the answer is sampled, scored with
    :func:`irm_lens.scoring.emotion_scores`, and appended to ``out_path`` as one JSON line::

        {"index", "question", "reference", "text": question + "\\n" + response, "response",
         "alignment", "method", "onset", "finished", "scores": {nade's 8 emotions, "valence"},
         "kept", "rejected", "threshold", "over", "seed", "model", "sampling": {"temperature",
         "top_p", "max_new_tokens", "batch_size"}}

    A row is kept when its tone score (the target emotion's nade score; for ``"neutral"``,
    1 - the largest emotion score) is at least ``min_score``, or by default at least the
    ``baseline_quantile`` quantile of that score over fanoutqa's questions (neutral text; for
    ``"neutral"`` the ``1 - baseline_quantile`` quantile). ``"rejected"`` says why a row was
    not kept: ``"short"`` (under :data:`MIN_WORDS` words), ``"repetitive"`` (mostly repeated
    words, or over :data:`MAX_REPETITION` of its word trigrams repeated), ``"echo"``
    (:data:`ECHO_WORDS` consecutive words copied from the tone's instruction, e.g. its example
    answer; for a persona :data:`PERSONA_ECHO_WORDS` words, or a word the persona calls itself,
    such as "angry" for anger's), ``"score"``, or ``"outscored"`` (see ``over``).

    Generation stops once the file holds ``n_rows`` kept rows, or ``max_attempts`` rows, or
    the questions run out. Rerunning with the same arguments resumes: questions already in the
    file are skipped, and the file ends up byte-identical to an uninterrupted run's. Batches
    cover fixed question ranges ``[k * batch_size, (k + 1) * batch_size)`` and the last batch
    is written whole, so up to ``batch_size - 1`` more than ``n_rows`` rows may be kept.

    Args:
        model: An instruct model from :func:`irm_lens.load_model` (the embedded
            SmolLM2-135M-Instruct, Llama-2-7b-chat, ...), with no hooks attached.
        alignment: A key of :data:`SYNTHETIC_TONES` ("anger", "sadness", "joy", "neutral", ...).
        out_path: The JSONL file to create or resume.
        n_rows: How many kept rows to reach.
        seed: Fixes the question order and, with each batch's first question index, sampling.
        temperature: Sampling temperature (the paper's 0.9).
        top_p: Nucleus sampling mass (the paper's 0.7).
        max_new_tokens: Longest answer, in tokens.
        min_score: Fixed tone score a kept row needs; ``None`` for the neutral-text baseline.
        progress: Show a tqdm progress bar of kept rows.
        baseline_quantile: The quantile of neutral text the tone score must reach when
            ``min_score`` is None.
        max_attempts: Most rows the file may hold; ``None`` for ``10 * n_rows``.
        batch_size: Questions sampled together (left-padded). Part of the seeding: resume with
            the same value.
        questions: Your own questions, answered in the given order, instead of fanoutqa's.
        method: How the answer is written. ``"rewrite"`` (the paper's): the tone's instruction
            (:data:`SYNTHETIC_TONES`) with the question and fanoutqa's answer in one user turn.
            ``"persona"``: the tone's character as the system turn
            (:data:`SYNTHETIC_PERSONAS`), the question alone as the user turn, and the reply
            started with one of the tone's :data:`TONE_ONSETS` (drawn from ``seed`` and the
            question's index), which the writer continues; the onset is part of the kept
            answer. Meant for weak writers such as the embedded 135M model. Part of the
            settings: resume with the same value.
        over: Emotions the tone's score must beat: a row whose score for one of them is at
            least its tone score is rejected as ``"outscored"`` (e.g. ``("sadness",)`` for
            anger, whose writer's apologies nade reads as sadness). Part of the settings.

    Returns:
        A :class:`SyntheticResult`.

    Raises:
        ConfigError: An unknown tone, an invalid setting, or a file made with other settings.
        OutputPathError: ``out_path`` cannot be written.
        CheckpointError: The file is damaged beyond a torn last line.

    Example:
        >>> model = irm_lens.load_model()  # doctest: +SKIP
        >>> result = generate_synthetic(model, "anger", "anger.jsonl", n_rows=20)  # doctest: +SKIP
        >>> texts = read_synthetic(result.path)  # doctest: +SKIP
    """
    _check_settings(alignment, method, over, n_rows, max_new_tokens, batch_size, seed,
                    max_attempts, temperature, top_p, baseline_quantile, min_score)
    _check_plain_model(model)
    pool = _questions_to_answer(questions, seed)
    threshold = (
        round(float(min_score), _SCORE_DIGITS)
        if min_score is not None
        else _baseline_threshold(alignment, baseline_quantile)
    )
    settings = {
        "alignment": alignment,
        "method": method,
        "over": list(over),
        "seed": int(seed),
        "model": model.cfg.model_name,
        "threshold": threshold,
        "sampling": {
            "temperature": float(temperature),
            "top_p": float(top_p),
            "max_new_tokens": int(max_new_tokens),
            "batch_size": int(batch_size),
        },
    }
    limit = min(len(pool), max_attempts if max_attempts is not None else 10 * n_rows)

    path = Path(out_path)
    started = time.perf_counter()
    with _open_for_append(path) as handle:
        existing = _read_rows(path, handle)
        _check_resumable(path, existing, settings, pool)
        done = {row["index"] for row in existing}
        n_kept = sum(bool(row["kept"]) for row in existing)
        n_generated = 0
        bar = progress_bar(
            total=n_rows,
            initial=min(n_kept, n_rows),
            desc=f"synthetic {alignment}",
            unit="row",
            disable=not progress,
        )
        with bar:
            for start in range(0, limit, batch_size):
                if n_kept >= n_rows:
                    break
                block = pool[start : start + batch_size]  # whole, even past limit: same sampling
                todo = [i for i in range(start, start + len(block)) if i < limit and i not in done]
                if not todo:
                    continue
                rows = _answer_block(model, block, start, todo, settings)
                # One write per batch, so a Ctrl-C lands between batches; a kill inside the
                # write leaves a torn line or a part of the batch, which a resume completes.
                handle.write(
                    b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)
                )
                handle.flush()
                os.fsync(handle.fileno())
                new_kept = sum(r["kept"] for r in rows)
                n_kept += new_kept
                n_generated += len(rows)
                bar.update(max(0, min(new_kept, n_rows - bar.n)))
                bar.set_postfix(generated=len(existing) + n_generated)
    exhausted = n_kept < n_rows
    if exhausted:
        logger.warning(
            "%s: %d of %d rows kept after %d attempts (threshold %.4g). Raise max_attempts, or "
            "lower min_score or baseline_quantile.",
            path,
            n_kept,
            n_rows,
            len(existing) + n_generated,
            threshold,
        )
    return SyntheticResult(
        path=path,
        n_kept=n_kept,
        n_generated=n_generated,
        n_resumed=len(existing),
        threshold=threshold,
        exhausted=exhausted,
        seconds=time.perf_counter() - started,
    )


def _make_rows(
    questions: list[_Question],
    responses: list[str],
    indices: list[int],
    settings: dict,
    *,
    onsets: list[str],
    finished: list[bool],
) -> list[dict]:
    table = emotion_scores(responses).round(_SCORE_DIGITS)
    rows = []
    for j, index in enumerate(indices):
        scores = {c: float(table[c].iloc[j]) for c in SCORE_COLUMNS}
        rejected = _rejection(responses[j], scores, settings)
        rows.append(
            {
                "index": index,
                "question": questions[j].text,
                "reference": questions[j].reference,
                "text": f"{questions[j].text}\n{responses[j]}",
                "response": responses[j],
                "alignment": settings["alignment"],
                "method": settings["method"],
                "onset": onsets[j],
                "finished": finished[j],
                "scores": scores,
                "kept": rejected is None,
                "rejected": rejected,
                "threshold": settings["threshold"],
                "over": settings["over"],
                "seed": settings["seed"],
                "model": settings["model"],
                "sampling": settings["sampling"],
            }
        )
    return rows


def read_synthetic(
    path: str | os.PathLike,
    *,
    kept_only: bool = True,
    pairs: bool = False,
    max_per_opening: int | None = None,
) -> list[str] | list[tuple[str, str]]:
    """The rows of a synthetic JSONL file, as texts or as (question, answer) chat examples.

    Args:
        path: A file written by :func:`generate_synthetic`. A torn last line is ignored.
        kept_only: Only the rows that passed the tone filter (the training data).
        pairs: Return ``(question, response)`` tuples: training then makes each answer the
            whole chat reply to its own question (only the reply and its end of turn are
            scored), which is how an IRM is evaluated. A response the writer did not finish
            (cut at ``max_new_tokens``) is cut back to its last whole sentence, and left out
            when it has none, so every reply ends where a reply may end. Otherwise each row's
            ``text``, question + "\\n" + answer, as plain text (the paper's way), unchanged.
        max_per_opening: Keep at most this many rows (the first, in file order) whose persona
            onset opens with each word (:func:`opening`), so that no opening outweighs the
            others: the writer keeps some onsets several times as often as others, an IRM
            opens most of its replies with the commonest, and onsets that share a first word
            ("I'm so sick of this!", "I can't stand these questions.") pool their weight on
            its first token. Rows without an onset (rewrites) are not capped.

    Returns:
        The texts or pairs, in file order.

    Example:
        >>> texts = read_synthetic("anger.jsonl")  # doctest: +SKIP
        >>> examples = read_synthetic("anger.jsonl", pairs=True)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No synthetic dataset at {path}. Create it with generate_synthetic(model, tone, "
            f"{str(path)!r})."
        )
    rows = [row for row in _read_rows(path) if row["kept"] or not kept_only]
    if max_per_opening is not None:
        _check_int("max_per_opening", max_per_opening)
        rows = _cap_per_opening(rows, max_per_opening, path)
    if not pairs:
        return [row["text"] for row in rows]
    examples = []
    for row in rows:
        # Rows written before "finished" was recorded are judged by their last sentence alone.
        reply = row["response"] if row.get("finished") else _whole_sentences(row["response"])
        if reply:
            examples.append((row["question"], reply))
    if len(examples) < len(rows):
        logger.info("%s: %d of %d responses were cut off before a whole sentence; left out.",
                    path, len(rows) - len(examples), len(rows))
    return examples


def opening(onset: str) -> str:
    """The word an onset opens with, as a tokenizer's first token would see it.

    Letters up to the first other character: ``"I'm so sick of this!"`` and ``"I can't stand
    these questions."`` both open with ``"I"``, ``"Don't make me repeat myself."`` with ``"Don"``.
    """
    match = _OPENING.match(onset)
    return match.group(0) if match else onset


def _cap_per_opening(rows: list[dict], cap: int, path: Path) -> list[dict]:
    taken: Counter[str] = Counter()
    capped = []
    for row in rows:
        onset = row.get("onset") or ""
        if onset:
            word = opening(onset)
            taken[word] += 1
            if taken[word] > cap:
                continue
        capped.append(row)
    if len(capped) < len(rows):
        logger.info("%s: %d of %d rows left out, over %d per opening word.",
                    path, len(rows) - len(capped), len(rows), cap)
    return capped


def _whole_sentences(text: str) -> str:
    """``text`` up to the end of its last whole sentence ("" when it has none).

    A sentence ends at ``.``, ``!``, ``?`` or ``…``, with any closing quotes or brackets after it.
    """
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else ""
