"""The analyses' inputs and forward passes: prompt sets, tokenised text batches, steered
sequences, and scoring texts under several conditions (clean, steered, patched, ablated)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.chat import format_prompt, prepend_bos_for
from irm_lens.data.corpora import neutral_prompts
from irm_lens.data.dataset import batch_slice, tokenize_texts
from irm_lens.errors import ConfigError
from irm_lens.generation import generate_continuations
from irm_lens.losses import masked_lm_loss


def prompts_or_default(prompts: Sequence[str] | None, n_prompts: int) -> list[str]:
    """``prompts``, or ``n_prompts`` held-out neutral prompts (the evaluation split)."""
    if prompts is None:
        return list(neutral_prompts(n_prompts, split="eval"))
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty strings.")
    return prompts


# A condition of a forward pass: given the batch's tokens, a context manager to run it in.
Condition = Callable[[Tensor], ContextManager]


def text_batches(
    model: HookedTransformer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 8
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``texts`` tokenised (BOS, truncation, masked padding) in batches of (ids, mask, loss mask)."""
    data = tokenize_texts(model, texts, max_length=max_length)
    return [
        batch_slice(data, torch.arange(s, min(s + batch_size, len(data))))
        for s in range(0, len(data), batch_size)
    ]


def score_conditions(
    model: HookedTransformer,
    batches: Sequence[tuple[Tensor, Tensor, Tensor]],
    conditions: Mapping[str, Condition],
    *,
    reference: str | None = None,
    progress: bool = True,
    desc: str = "forward passes",
) -> pd.DataFrame:
    """Mean token log-probability of the texts under each condition, and KL to ``reference``.

    The batches are the outer loop, so the reference's log-probabilities are kept for one batch
    at a time. Returns one row per condition: ``condition``, ``logprob`` (mean over scored
    tokens, nats), ``loss`` (= -logprob) and, with a reference, ``kl`` (mean over scored
    positions of KL(reference || condition)).
    """
    names = list(conditions)
    if reference is not None and reference not in conditions:
        raise KeyError(f"reference {reference!r} is not one of the conditions {names}.")
    order = ([reference] if reference else []) + [n for n in names if n != reference]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    n_scored = 0.0
    device = model.cfg.device
    bar = progress_bar(total=len(batches) * len(order), desc=desc, unit="pass",
                       disable=not progress)
    for ids, _, loss_mask in batches:
        ids = ids.to(device)
        weight = loss_mask[:, 1:].to(device=device, dtype=torch.float32)  # [batch, pos-1]
        n_scored += float(weight.sum())
        ref_logp = None
        for name in order:
            with torch.no_grad(), conditions[name](ids):
                logits = model(ids)
            # The one shift-and-mask convention of the project: masked_lm_loss.
            nll[name] += float(masked_lm_loss(logits, ids, loss_mask.to(device))) * float(weight.sum())
            if reference is not None:
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, pos-1, vocab]
                if name == reference:
                    ref_logp = logp
                else:
                    per_pos = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                    kl[name] += float((per_pos * weight).sum())
            bar.update()
    bar.close()
    rows = []
    for name in names:
        row = dict(condition=name, logprob=-nll[name] / n_scored, loss=nll[name] / n_scored)
        if reference is not None:
            row["kl"] = kl[name] / n_scored
        rows.append(row)
    return pd.DataFrame(rows)


@contextmanager
def stacked(*managers: ContextManager) -> Iterator[None]:
    """Enter ``managers`` in order (e.g. an IRM's injection, then an ablation); exit in reverse."""
    with ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def steered_sequences(
    model: HookedTransformer,
    irm,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[tuple[list[int], list[int]]], tuple[str, ...]]:
    """Each prompt's token ids and its greedy continuation's ids under ``irm`` (none: unsteered),
    with the continuations' texts. ``max_new_tokens=0``: the prompts alone."""
    if max_new_tokens > 0:
        conts = generate_continuations(
            model, list(prompts), intervention=irm, chat=chat, max_new_tokens=max_new_tokens,
            batch_size=batch_size, progress=progress,
        )
        return [(list(c.prompt_ids), list(c.new_ids)) for c in conts], tuple(c.text for c in conts)
    rows = []
    for p in prompts:
        text = format_prompt(model, p, chat)
        ids = model.to_tokens(text, prepend_bos=prepend_bos_for(model, text))[0].tolist()
        rows.append((ids, []))
    return rows, ("",) * len(prompts)
