"""Scores of texts: emotions (nade's eight and VADER valence, as one DataFrame) and the
degeneration measures (distinct-n, repetition, identical outputs).

Both scorers ship their models inside their PyPI packages, so scoring works offline. nade's
scores are per-emotion probabilities in [0, 1]; its anger scores rarely exceed 0.5, so compare
distributions (means with confidence intervals), never thresholds picked by eye.
"""

from __future__ import annotations

import warnings
from collections import Counter
from functools import lru_cache

import numpy as np
import pandas as pd

NADE_EMOTIONS: tuple[str, ...] = (
    "anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust",
)
SCORE_COLUMNS: tuple[str, ...] = (*NADE_EMOTIONS, "valence")


@lru_cache(maxsize=1)
def _nade():
    from nade import Nade

    with warnings.catch_warnings():  # "unpack <emotion> model" on first use
        warnings.simplefilter("ignore", UserWarning)
        return Nade()


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def emotion_scores(texts: list[str], batch_size: int = 2048) -> pd.DataFrame:
    """Score ``texts``: one row per text, columns ``SCORE_COLUMNS``.

    Columns ``anger`` .. ``trust`` are nade's probabilities; ``valence`` is VADER's compound
    score in [-1, 1]. Empty texts get nade's scores of an empty string.

    Example:
        >>> emotion_scores(["I am furious!", "Lovely day."])["anger"].round(2).tolist()  # doctest: +SKIP
        [0.6, 0.0]
    """
    texts = [t if isinstance(t, str) else "" for t in texts]
    columns: dict[str, list[float]] = {e: [] for e in NADE_EMOTIONS}
    nade = _nade()
    for start in range(0, len(texts), batch_size):
        # nade scores one line per text: newlines would split a text in two.
        batch = [t.replace("\n", " ") for t in texts[start : start + batch_size]]
        scores = nade.predict(batch)
        for emotion in NADE_EMOTIONS:
            columns[emotion].extend(np.asarray(scores[emotion], dtype=float).tolist())
    vader = _vader()
    columns["valence"] = [vader.polarity_scores(t)["compound"] for t in texts]
    return pd.DataFrame(columns, columns=list(SCORE_COLUMNS))


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams, pooled over ``texts`` (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that already occurred earlier in the same text."""
    grams = ngrams(text.lower().split(), n)
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def identical_share(texts: list[str]) -> float:
    """Share of texts whose exact (stripped) string is also another text's output."""
    counts = Counter(t.strip() for t in texts)
    return sum(1 for t in texts if counts[t.strip()] > 1) / len(texts) if texts else 0.0


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    """The word ``n``-grams of ``words``, in order."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
