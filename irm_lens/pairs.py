"""Preference pairs for ``TrainConfig(objective="preference")``: one question, two replies.

``generate_pairs`` has the host model answer training questions twice: unsteered (greedy: the
model's own answer, the *rejected* reply) and steered by a baseline intervention (a CAA vector,
greedy and sampled candidates). The steered candidate that scores highest on the target
emotion, among those that stay fluent (perplexity under the unsteered model at most
``max_perplexity_ratio`` times the rejected reply's, little repetition) and beat the rejected
reply's score, is the *chosen* reply. An IRM trained on such pairs learns the tone that the
vector produces where it produced it fluently, on the question it was asked. The steered
candidate that failed the perplexity or repetition check worst (most repetition, then highest
perplexity) is kept too, as ``degenerate``: ``read_pairs(..., degenerate=True)`` adds it as a second rejected
reply for the same chosen one, so that training also prefers the fluent tone to the
degenerate one (the loops that a strong steering vector falls into).

``corpus_pairs`` pairs built-in texts instead (a tone text and a neutral text as two replies
to the same neutral question): no generation, but the replies are not about the question.

Pairs are written as JSONL (one object per question, kept or not, with the scores that decided)
and read back with ``read_pairs``. The questions come from ``neutral_prompts(split="train")``,
disjoint from the evaluation prompts.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from irm_lens._io import atomic_write_text
from irm_lens.data.corpora import load_alignment, neutral_prompts
from irm_lens.data.dataset import PreferencePair
from irm_lens.errors import ConfigError, DataNotFoundError
from irm_lens.evaluate import Decodings, check_alignment, generate_samples
from irm_lens.scoring import ngrams
from irm_lens.steering import Intervention

# The phrase length of ``cap_phrases``: "I'm so glad you".
PHRASE_WORDS = 4


def generate_pairs(
    model: HookedTransformer,
    intervention: Intervention,
    alignment: str,
    out: str | os.PathLike | None = None,
    *,
    prompts: list[str] | None = None,
    n_prompts: int = 300,
    n_sampled: int = 2,
    max_new_tokens: int = 40,
    max_perplexity_ratio: float = 4.0,
    max_repetition: float = 0.1,
    min_words: int = 8,
    seed: int = 0,
    batch_size: int = 40,
    progress: bool = True,
) -> pd.DataFrame:
    """Answer questions unsteered and steered; keep (question, steered, unsteered) pairs.

    Args:
        model: The frozen host model (the writer of both replies).
        intervention: What writes the chosen replies (a ``SteeringVector``, an IRM, ...).
        alignment: The emotion the chosen reply must score higher on.
        out: A ``.jsonl`` file to write (atomically); None: only return the table.
        prompts: The questions (default: the first ``n_prompts`` training prompts).
        n_sampled: Sampled steered candidates per question, besides the greedy one.
        max_new_tokens: Length of each reply.
        max_perplexity_ratio: A candidate's perplexity under the unsteered model may be at most
            this many times the rejected reply's.
        max_repetition: A candidate's share of repeated word trigrams may be at most this.
        min_words: A chosen reply has at least this many words (a steered model often just
            restates the question: "The height of the Volkswagen ID.4 in inches.").
        seed: Seeds the sampled candidates.

    Returns:
        One row per question: ``prompt``, ``chosen``, ``rejected``, their scores and
        perplexities, ``kept``, and ``degenerate`` (the worst non-fluent candidate, or "").
    """
    check_alignment(alignment)
    prompts = list(prompts) if prompts is not None else neutral_prompts(n_prompts, split="train")
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    rejected = generate_samples(model, None, prompts, Decodings(0), **kwargs).set_index("prompt")
    candidates = generate_samples(model, intervention, prompts, Decodings(n_sampled, seed=seed),
                                  **kwargs)
    base = rejected.loc[candidates.prompt]
    readable = (
        (candidates.perplexity.to_numpy() <= max_perplexity_ratio * base.perplexity.to_numpy())
        & (candidates.repetition.to_numpy() <= max_repetition)
    )
    nonempty = candidates.text.str.len().to_numpy() > 0
    long_enough = candidates.text.str.split().str.len().to_numpy() >= min_words
    fluent = readable & long_enough & (candidates[alignment].to_numpy() > base[alignment].to_numpy())
    rows = []
    frame = candidates.assign(fluent=fluent, garbled=~readable & nonempty)
    for prompt, group in frame.groupby("prompt", sort=False):
        best = group.sort_values(["fluent", alignment], ascending=False).iloc[0]
        worst = group[group.garbled].sort_values(["repetition", "perplexity"], ascending=False).text
        ref = rejected.loc[prompt]
        rows.append(dict(
            prompt=prompt, chosen=best.text, rejected=ref.text, kept=bool(best.fluent),
            degenerate=worst.iloc[0] if len(worst) else "",
            chosen_score=float(best[alignment]), rejected_score=float(ref[alignment]),
            chosen_perplexity=float(best.perplexity), rejected_perplexity=float(ref.perplexity),
        ))
    table = pd.DataFrame(rows)
    if out is not None:
        write_pairs(table, out, alignment)
    return table


def corpus_pairs(alignment: str, n: int | None = None, negative: str = "neutral") -> list[PreferencePair]:
    """Built-in texts as pairs: the i-th ``alignment`` text (chosen) and the i-th ``negative``
    text (rejected) as replies to the i-th training question."""
    chosen, rejected = load_alignment(alignment).texts, load_alignment(negative).texts
    prompts = neutral_prompts(split="train")
    count = min(len(chosen), len(rejected), len(prompts), n if n is not None else len(prompts))
    return [(prompts[i], chosen[i], rejected[i]) for i in range(count)]


def write_pairs(table: pd.DataFrame, out: str | os.PathLike, alignment: str) -> Path:
    """Write a pairs table as JSONL (one object per question, with ``alignment``)."""
    lines = [json.dumps({"alignment": alignment, **row}) for row in table.to_dict("records")]
    return atomic_write_text(Path(out), "".join(line + "\n" for line in lines))


def kept_share(path: str | os.PathLike) -> tuple[int, int]:
    """How many questions of a ``generate_pairs`` file kept a pair, and how many it asked."""
    rows = _pairs_rows(Path(path))
    return sum(bool(row.get("kept", True)) for row in rows), len(rows)


def read_pairs(path: str | os.PathLike, *, kept_only: bool = True, degenerate: bool = False,
               max_phrase_share: float | None = None) -> list[PreferencePair]:
    """The ``(prompt, chosen, rejected)`` pairs of a file written by ``generate_pairs``; with
    ``degenerate``, also ``(prompt, chosen, degenerate)`` for the rows that have one.

    ``max_phrase_share`` drops the rows whose chosen reply would make one phrase (a word
    4-gram) open more than that share of the kept chosen replies (``cap_phrases``).
    """
    rows = _pairs_rows(Path(path))
    if kept_only:
        rows = [row for row in rows if row.get("kept", True)]
    if max_phrase_share is not None:
        rows = cap_phrases(rows, max_phrase_share)
    pairs = []
    for row in rows:
        item = (row["prompt"], row["chosen"], row["rejected"])
        candidates = [item]
        if degenerate and isinstance(row.get("degenerate"), str) and row["degenerate"].strip():
            candidates.append((item[0], item[1], row["degenerate"]))
        pairs += [c for c in candidates if all(isinstance(x, str) and x.strip() for x in c)]
    if not pairs:
        raise ConfigError(f"{path} holds no kept pair.")
    return pairs


def cap_phrases(rows: list[dict], max_share: float, n: int = PHRASE_WORDS) -> list[dict]:
    """The rows (in their order) whose chosen replies together use no word ``n``-gram in more
    than ``max_share`` of them: rows are admitted best ``chosen_score`` first, and one that
    would push a phrase over the cap is left out.

    A steering vector's tone comes in a few stock phrases ("I'm so glad you enjoyed my ...");
    an IRM trained on them repeats them on every question, which costs distinct-2.
    """
    if not 0 < max_share <= 1:
        raise ConfigError(f"max_phrase_share must be in (0, 1], got {max_share}.")
    cap = max(1, math.floor(max_share * len(rows)))
    uses: Counter[tuple[str, ...]] = Counter()
    admitted = set()
    order = sorted(range(len(rows)), key=lambda i: -float(rows[i].get("chosen_score", 0.0)))
    for i in order:
        phrases = set(ngrams(str(rows[i]["chosen"]).lower().split(), n))
        if all(uses[p] < cap for p in phrases):
            uses.update(phrases)
            admitted.add(i)
    return [row for i, row in enumerate(rows) if i in admitted]


def _pairs_rows(path: Path) -> list[dict]:
    """A pairs file's rows, each checked to hold ``prompt``, ``chosen`` and ``rejected``."""
    if not path.is_file():
        raise DataNotFoundError(f"No pairs file at {path}.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            _ = row["prompt"], row["chosen"], row["rejected"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}:{number} is not a pairs row (prompt, chosen, rejected): {exc}"
            ) from exc
        rows.append(row)
    return rows
