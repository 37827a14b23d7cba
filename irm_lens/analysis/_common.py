"""What every analysis shares: checking a neuron or layer index, prompt sets, provenance."""

from __future__ import annotations

import hashlib
import json
import numbers
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from irm_lens.errors import ConfigError, NeuronIndexError


def check_neuron(model: HookedTransformer, neuron: Any) -> int:
    """``neuron`` as an int in ``0 .. d_model-1``, or a ``NeuronIndexError`` saying what to use.

    The one place a residual index is validated: every analysis calls it.
    """
    d_model = model.cfg.d_model
    if isinstance(neuron, bool) or not isinstance(neuron, (numbers.Integral, np.integer)):
        if isinstance(neuron, Tensor) and neuron.numel() == 1 and not neuron.is_floating_point():
            neuron = int(neuron.item())
        else:
            raise NeuronIndexError(
                f"A neuron is a residual-stream index: an int in 0..{d_model - 1}; got "
                f"{neuron!r} ({type(neuron).__name__})."
            )
    neuron = int(neuron)
    if not 0 <= neuron < d_model:
        hint = ""
        if neuron >= d_model:
            hint = (
                f" Index {neuron} exists only in models with d_model > {neuron} (the paper's "
                f"1512 is a Llama-2-7B index, d_model=4096)."
            )
        raise NeuronIndexError(
            f"Neuron {neuron} is outside {model.cfg.model_name}'s residual stream: valid indices "
            f"are 0..{d_model - 1} (d_model={d_model}).{hint} Indices that stand out in this "
            f"model's RMSNorm weights: {standout_indices(model)}; for the index a trained IRM "
            "relies on, run irm_lens.dominant_neurons on its outputs."
        )
    return neuron


def check_layers(model: HookedTransformer, layers: Iterable[int] | None) -> tuple[int, ...]:
    """Layer indices in ``0 .. n_layers-1`` (default: every layer), sorted and unique."""
    n_layers = model.cfg.n_layers
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (numbers.Integral, np.integer)):
        layers = [layers]
    checked = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (numbers.Integral, np.integer)):
            raise NeuronIndexError(f"Layers are ints in 0..{n_layers - 1}; got {layer!r}.")
        if not 0 <= int(layer) < n_layers:
            raise NeuronIndexError(
                f"Layer {layer} is outside {model.cfg.model_name}, which has layers "
                f"0..{n_layers - 1}."
            )
        checked.add(int(layer))
    if not checked:
        raise NeuronIndexError("layers is empty: give at least one layer (or None for all).")
    return tuple(sorted(checked))


def standout_indices(model: HookedTransformer, k: int = 5) -> list[int]:
    """The ``k`` indices whose RMSNorm weights are furthest above their norm's median, summed
    over every norm of the model (a cheap pointer, computed from the weights alone)."""
    scores = norm_ratios(_norm_weight_list(model)).sum(0)
    return scores.topk(min(k, scores.numel())).indices.tolist()


def norm_ratios(weights: Sequence[Tensor]) -> Float[Tensor, "norm neuron"]:
    """Each norm's |weight| over that norm's median |weight|, one row per norm."""
    rows = [w.detach().float().abs().cpu() for w in weights]
    return torch.stack([w / w.median().clamp_min(1e-30) for w in rows])


def _norm_weight_list(model: HookedTransformer) -> list[Tensor]:
    weights = []
    for block in model.blocks:
        for name in ("ln1", "ln2"):
            w = getattr(getattr(block, name, None), "w", None)
            if w is not None:
                weights.append(w)
    final = getattr(getattr(model, "ln_final", None), "w", None)
    if final is not None:
        weights.append(final)
    return weights


def prompts_or_default(prompts: Sequence[str] | None, n_prompts: int) -> list[str]:
    """``prompts``, or ``n_prompts`` held-out neutral prompts (the evaluation split)."""
    from irm_lens.data.corpora import neutral_prompts

    if prompts is None:
        return list(neutral_prompts(n_prompts, split="eval"))
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty strings.")
    return prompts


@dataclass(frozen=True)
class Provenance:
    """What produced a result: enough for a report to say exactly where a figure came from."""

    model_name: str
    d_model: int
    n_layers: int
    irm_config: dict[str, Any] | None
    texts_sha256: str
    n_texts: int
    seed: int | None = None

    @classmethod
    def of(cls, model: HookedTransformer, irm=None, texts: Sequence[str] = (), seed=None):
        digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
        return cls(
            model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers,
            irm.config.to_dict() if irm is not None else None, digest, len(texts), seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows as a right-padded ``[batch, pos]`` tensor and its mask of real tokens."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return tokens, mask


def ranks_descending(values: Float[Tensor, " n"]) -> Tensor:
    """1-based rank of each value, the largest first (ties broken by index)."""
    order = torch.argsort(values, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(values) + 1)
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    ra = ranks_descending(a).double()
    rb = ranks_descending(b).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")


# A condition of a forward pass: given the batch's tokens, a context manager to run it in.
Condition = Callable[[Tensor], ContextManager]


def text_batches(
    model: HookedTransformer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 8
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``texts`` tokenised (BOS, truncation, masked padding) in batches of (ids, mask, loss mask)."""
    from irm_lens.data.dataset import batch_slice, tokenize_texts

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
    import torch.nn.functional as F

    from irm_lens.data.dataset import masked_lm_loss

    names = list(conditions)
    if reference is not None and reference not in conditions:
        raise KeyError(f"reference {reference!r} is not one of the conditions {names}.")
    order = ([reference] if reference else []) + [n for n in names if n != reference]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    n_scored = 0.0
    device = model.cfg.device
    bar = tqdm(total=len(batches) * len(order), desc=desc, unit="pass", disable=not progress)
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


def random_indices(d_model: int, exclude: int, n: int, seed: int) -> list[int]:
    """``n`` distinct random residual indices other than ``exclude`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    pool = [i for i in torch.randperm(d_model, generator=gen).tolist() if i != exclude]
    return pool[: min(n, len(pool))]


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
    from irm_lens.generation import format_prompt, generate_continuations, prepend_bos_for

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
