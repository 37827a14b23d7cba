"""Does a steered reply still answer its question? A crude measure over a study's samples.

For each reply: the share of its question's content words (5+ letters, not a question word)
that the reply repeats. Averaged per (intervention, scale, decoding) beside the mean alignment
score, so that methods can be compared at equal lift (docs/training.md, "Joy"). Word overlap is
a proxy: a reply can answer in other words, or repeat the words and not answer.

    python scripts/on_question.py runs/study4/joy/set0/samples.csv --alignment joy
"""

from __future__ import annotations

import argparse
import re

import pandas as pd

QUESTION_WORDS = frozenset(
    "what which where when whom whose about there their these those other first most many "
    "much does were have been".split()
)


def question_terms(question: str) -> set[str]:
    """The question's words of 5+ letters that are not question words (unlike
    ``irm_lens.data.corpora.content_words``, unfolded: they are looked up in the reply as
    substrings, so "flights" is found in "flights" only and "flight" in both)."""
    return {w.lower() for w in re.findall(r"[A-Za-z']+", question)
            if len(w) >= 5 and w.lower() not in QUESTION_WORDS}


def on_question(question: str, reply: str) -> float:
    """The share of the question's content words found in the reply (nan: none to find)."""
    words = question_terms(question)
    if not words:
        return float("nan")
    text = reply.lower()
    return sum(w in text for w in words) / len(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", help="a samples.csv written by compare-steering / steering_study")
    p.add_argument("--alignment", default="anger")
    args = p.parse_args()
    samples = pd.read_csv(args.samples)
    samples["on_question"] = [on_question(q, r) for q, r in zip(samples.prompt, samples.text)]
    table = samples.groupby(["intervention", "scale", "decoding"]).agg(
        on_question=("on_question", "mean"), score=(args.alignment, "mean"), n=("text", "size"))
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
