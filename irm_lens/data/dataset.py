"""User text data, train/val/test splits, tokenisation, and the masked causal-LM loss.

Two defects of the original research code are designed out here and tested against a hand
computation: labels are shifted exactly once (position t predicts token t+1), and padding
never enters the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from irm_lens.chat import end_of_turn, format_prompt, prepend_bos_for
from irm_lens.errors import ConfigError, DataNotFoundError

TextSource = str | os.PathLike | Iterable[str] | Any
# A chat example: (prompt, reply). Trained on, the reply is the assistant's whole answer to the
# prompt in the model's chat template, closed by its end of turn; only the reply and that end
# are scored.
ChatExample = tuple[str, str]
Example = str | ChatExample
# A preference pair: (prompt, chosen reply, rejected reply), e.g. the same question answered in
# the target tone and neutrally (TrainConfig(objective="preference")).
PreferencePair = tuple[str, str, str]


def load_texts(
    source: TextSource, *, text_column: str = "text", prompt_column: str | None = None
) -> list[str] | list[ChatExample]:
    """Read texts from a file, a DataFrame, a Hugging Face dataset, or a list of strings.

    Args:
        source: A ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` path; a pandas DataFrame; a
            ``datasets.Dataset`` (or a ``DatasetDict``: its ``"train"`` split); or strings.
        text_column: The column holding the text (files, DataFrames, datasets).
        prompt_column: A column holding, for each text, the prompt it replies to. The result
            is then ``(prompt, text)`` chat examples (rows with an empty prompt or text are
            dropped); training makes each text the chat reply to its own prompt.

    Returns:
        The non-empty texts, stripped, in file order (or the chat examples).
    """
    import pandas as pd

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataNotFoundError(f"No data file at {path}.")
        readers = {
            ".csv": pd.read_csv,
            ".jsonl": lambda p: pd.read_json(p, lines=True),
            ".json": _read_json_any,
            ".parquet": pd.read_parquet,
        }
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise ConfigError(
                f"{path}: unsupported data format {path.suffix!r}; use .csv, .jsonl, .json or "
                ".parquet with a text column, or pass a datasets.Dataset / DataFrame / list."
            )
        try:
            frame = reader(path)
        except ValueError as exc:
            raise ConfigError(f"{path} could not be parsed as {path.suffix}: {exc}") from exc
        return _columns(frame, list(frame.columns), text_column, prompt_column, str(path))
    if isinstance(source, pd.DataFrame):
        return _columns(source, list(source.columns), text_column, prompt_column, "the DataFrame")
    if _is_hf_dataset(source):
        if isinstance(source, dict):  # a DatasetDict: its train split
            source = source["train"] if "train" in source else next(iter(source.values()))
        # Only the named columns are read: a dataset's other columns (images, ...) stay on disk.
        return _columns(source, source.column_names, text_column, prompt_column, "the dataset")
    if prompt_column is not None:
        raise ConfigError(
            "prompt_column needs a file, DataFrame or dataset; pass a list of chat examples as "
            "(prompt, reply) tuples straight to train() instead."
        )
    return _clean(list(source), "the list")


def _read_json_any(path: Path):
    import pandas as pd

    try:
        return pd.read_json(path)
    except ValueError:
        return pd.read_json(path, lines=True)


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.")


def _columns(
    table, names: list[str], text_column: str, prompt_column: str | None, where: str
) -> list[str] | list[ChatExample]:
    """The texts (or chat examples) of ``table``, a DataFrame or a dataset with columns ``names``."""
    for column, argument in ((text_column, "text_column"), (prompt_column, "prompt_column")):
        if column is not None and column not in names:
            raise ConfigError(
                f"{where} has no {column!r} column; its columns are {names}. "
                f"Pass {argument}=..."
            )
    if prompt_column is None:
        return _clean(list(table[text_column]), where)
    examples = [
        (p.strip(), t.strip())
        for p, t in zip(list(table[prompt_column]), list(table[text_column]))
        if isinstance(p, str) and isinstance(t, str) and p.strip() and t.strip()
    ]
    if not examples:
        raise ConfigError(f"{where} holds no row with both a prompt and a text.")
    return examples


def _clean(values: list[Any], where: str) -> list[str]:
    texts = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise ConfigError(f"{where} holds no non-empty text.")
    return texts


@dataclass(frozen=True)
class TextSplits:
    """Train / validation / test texts, and the seed that split them."""

    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    seed: int

    def fingerprint(self) -> str:
        """A short hash of the split contents (provenance, and resume checks)."""
        digest = hashlib.sha256(json.dumps([self.train, self.val, self.test]).encode())
        return digest.hexdigest()[:16]


def split_texts(
    texts: Iterable[Example | PreferencePair], *, seed: int = 42,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> TextSplits:
    """Shuffle with ``seed`` and split (paper: 90/5/5, seed 42).

    ``texts`` may hold plain texts and ``(prompt, reply)`` chat examples, or only
    ``(prompt, chosen, rejected)`` preference pairs. Validation and test get at least one each
    when there are three or more.
    """
    texts = list(texts)
    if len(texts) < 3:
        raise ConfigError(f"Need at least 3 texts to split into train/val/test, got {len(texts)}.")
    for i, item in enumerate(texts):
        if isinstance(item, tuple):
            if not (len(item) in (2, 3) and all(isinstance(x, str) and x.strip() for x in item)):
                raise ConfigError(
                    f"Example {i} is a tuple but not a (prompt, reply) pair or a (prompt, "
                    f"chosen, rejected) triple of non-empty strings: {item!r}."
                )
        elif not isinstance(item, str):
            raise ConfigError(
                f"Example {i} is a {type(item).__name__}; expected a text or a (prompt, reply) "
                "tuple."
            )
    n_pairs = sum(isinstance(x, tuple) and len(x) == 3 for x in texts)
    if 0 < n_pairs < len(texts):
        raise ConfigError("Preference pairs (prompt, chosen, rejected) cannot be mixed with texts.")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"fractions must be three non-negative numbers summing to 1: {fractions}.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n = len(texts)
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    shuffled = [texts[i] for i in order]
    return TextSplits(
        train=tuple(shuffled[:n_train]),
        val=tuple(shuffled[n_train : n_train + n_val]),
        test=tuple(shuffled[n_train + n_val :]),
        seed=seed,
    )


@dataclass(frozen=True)
class TokenizedTexts:
    """Right-padded token ids, the mask of real tokens, and the mask of tokens that are scored."""

    input_ids: Int[Tensor, "n pos"]
    attention_mask: Int[Tensor, "n pos"]
    loss_mask: Int[Tensor, "n pos"]
    n_truncated: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def tokenize_texts(
    model, texts: Iterable[Example], *, max_length: int = 128, prompts: Sequence[str] | None = None
) -> TokenizedTexts:
    """Tokenise with the model's tokenizer, BOS as the model prepends it, truncated, right-padded.

    Args:
        model: The HookedTransformer (its tokenizer and ``cfg.default_prepend_bos``).
        texts: Plain texts, or ``(prompt, reply)`` chat examples: the reply becomes the
            assistant's whole answer to its prompt in the model's chat template, closed by
            the template's end of turn (:func:`irm_lens.chat.end_of_turn`), and only
            the reply's tokens and that end are scored, so the IRM also learns where a reply
            stops.
        max_length: Cap on tokens per sequence, BOS and prompt included (paper: 128).
        prompts: When given, plain text ``i`` becomes the assistant's reply to
            ``prompts[i % len]`` in the same way: the IRM then learns to answer in the
            alignment's tone, which is how ``evaluate`` uses it. These texts get no end
            of turn: they are text in a tone (a corpus sentence), not a whole answer.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}.")
    if prompts is not None and not prompts:
        raise ConfigError("prompts, when given, must not be empty.")
    tokenizer = model.tokenizer
    bos = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = list(texts)
    texts = [item[1] if isinstance(item, tuple) else item for item in items]
    own = [item[0] if isinstance(item, tuple) else None for item in items]
    if prompts is not None:
        own = [p if p is not None else prompts[i % len(prompts)] for i, p in enumerate(own)]
    prefixes: list[list[int]] = [bos] * len(texts)
    chat_rows = [i for i, p in enumerate(own) if p is not None]
    if chat_rows:
        chat = [format_prompt(model, own[i]) for i in chat_rows]
        encoded = tokenizer(chat, add_special_tokens=False)["input_ids"]
        for i, c, ids in zip(chat_rows, chat, encoded):
            prefixes[i] = (bos if prepend_bos_for(model, c) else []) + ids
    end = tokenizer(end_of_turn(model), add_special_tokens=False)["input_ids"]
    replies = [isinstance(item, tuple) for item in items]
    rows, n_truncated = [], 0
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for prefix, ids, reply in zip(prefixes, encoded, replies):
        ids = prefix + ids + (end if reply else [])
        if len(ids) > max_length:
            n_truncated += 1
            ids = ids[:max_length]
        if len(ids) > max(len(prefix), 1):  # a reply token is left to predict
            rows.append((ids, len(prefix)))
    if not rows:
        raise ConfigError(
            f"No text leaves a token to predict within max_length={max_length} tokens; "
            "raise max_length or use longer texts."
        )
    # Position 0 is never a target anyway.
    padded = right_pad([ids for ids, _ in rows], pad_id, scored_from=[n for _, n in rows])
    return TokenizedTexts(*padded, n_truncated)


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, scored_from: Sequence[int] | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token rows as one right-padded batch: ``(ids, attention_mask, loss_mask)``.

    ``attention_mask`` is 1 on each row's real tokens; ``loss_mask`` is 1 on its tokens from
    ``scored_from[i]`` on (default: all of them), the tokens ``masked_lm_loss`` scores.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, scored_from[i] if scored_from is not None else 0 : len(row)] = 1
    return ids, attention_mask, loss_mask


def batch_slice(data: TokenizedTexts, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``index`` of ``data`` (ids, attention mask, loss mask), trimmed to their longest."""
    mask = data.attention_mask[index]
    width = int(mask.sum(1).max())
    return data.input_ids[index, :width], mask[:, :width], data.loss_mask[index, :width]
