"""Activation magnitudes: how large each residual index runs, layer by layer and by position.

Large language models keep a few residual indices at values hundreds of times the median
("massive activations"), mostly on the first token and on delimiters. An index that is
already huge in the residual stream needs a large push to matter after RMSNorm, or acts as
a bias that the norm's division spreads over every other index: the magnitude profile is
another candidate explanation for a dominant IRM neuron.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import prompts_or_default, steered_sequences
from irm_lens.analysis.provenance import Provenance
from irm_lens.analysis.stats import ranks_descending
from irm_lens.data.dataset import right_pad

POSITION_CLASSES: tuple[str, ...] = ("first", "delimiter", "other")
_DELIMITER_CHARS = set(string.punctuation + string.whitespace)


@dataclass(frozen=True)
class ActivationMagnitudes:
    """Per-index |resid_post| statistics over a prompt set.

    Attributes:
        mean_abs: Mean |activation| per position class (``first`` token, ``delimiter`` tokens:
            whitespace, punctuation and special tokens, ``other``), ``[class, layer, neuron]``.
        max_abs: Largest |activation| seen, ``[layer, neuron]``.
        n_tokens: Tokens per position class.
        provenance: Model and prompt hash.
    """

    mean_abs: Float[Tensor, "position_class layer neuron"]
    max_abs: Float[Tensor, "layer neuron"]
    n_tokens: dict[str, int]
    provenance: Provenance

    @property
    def overall(self) -> Float[Tensor, "layer neuron"]:
        """Mean |activation| over every token."""
        counts = torch.tensor([self.n_tokens[c] for c in POSITION_CLASSES], dtype=torch.float32)
        w = (counts / counts.sum().clamp_min(1))[:, None, None]
        return (self.mean_abs * w).sum(0)

    def profile(self, neuron: int) -> pd.DataFrame:
        """One row per layer: ``neuron``'s mean |activation| overall and per position class, its
        rank among all indices (1 = largest mean |activation|) and its ratio to the median index;
        ``max_abs`` and its ratio to the layer's median max."""
        overall = self.overall
        rows = []
        for layer in range(overall.shape[0]):
            row = overall[layer]
            med = row.median().clamp_min(1e-30)
            entry = dict(layer=layer, mean_abs=float(row[neuron]),
                         rank=int(ranks_descending(row)[neuron]),
                         ratio_to_median=float(row[neuron] / med),
                         max_abs=float(self.max_abs[layer, neuron]),
                         max_ratio_to_median=float(
                             self.max_abs[layer, neuron] / self.max_abs[layer].median().clamp_min(1e-30)))
            for c_i, c in enumerate(POSITION_CLASSES):
                entry[f"mean_abs_{c}"] = float(self.mean_abs[c_i, layer, neuron])
            rows.append(entry)
        return pd.DataFrame(rows)

    def massive(self, min_value: float = 100.0, min_ratio: float = 1000.0) -> pd.DataFrame:
        """Massive activations: (layer, neuron) whose max |activation| is at least ``min_value``
        and ``min_ratio`` times the layer's median |activation| (Sun et al., 2024's criterion)."""
        overall = self.overall
        med = overall.median(dim=1, keepdim=True).values.clamp_min(1e-30)
        hit = (self.max_abs >= min_value) & (self.max_abs / med >= min_ratio)
        rows = [
            dict(layer=int(l), neuron=int(n), max_abs=float(self.max_abs[l, n]),
                 ratio_to_median=float(self.max_abs[l, n] / med[l, 0]),
                 mean_abs_first=float(self.mean_abs[0, l, n]))
            for l, n in hit.nonzero().tolist()
        ]
        return pd.DataFrame(rows, columns=["layer", "neuron", "max_abs", "ratio_to_median",
                                           "mean_abs_first"])

    def top_indices(self, k: int = 10) -> list[int]:
        """Indices by mean |activation| relative to each layer's median, summed over layers."""
        overall = self.overall
        score = (overall / overall.median(dim=1, keepdim=True).values.clamp_min(1e-30)).sum(0)
        return score.topk(min(k, score.numel())).indices.tolist()


def _position_classes(model: HookedTransformer, tokens: Tensor, real: Tensor) -> Tensor:
    """0 (first), 1 (delimiter) or 2 (other) for every token of a right-padded batch."""
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_ids)
    table: dict[int, int] = {}
    out = torch.full(tokens.shape, 2, dtype=torch.long)
    for (b, p), t in zip(real.nonzero().tolist(), tokens[real].tolist()):
        if p == 0:
            out[b, p] = 0
            continue
        if t not in table:
            text = tokenizer.decode([t])
            table[t] = 1 if t in special or all(ch in _DELIMITER_CHARS for ch in text) else 2
        out[b, p] = table[t]
    return out


def activation_magnitudes(
    model: HookedTransformer,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int = 40,
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> ActivationMagnitudes:
    """Mean and max |resid_post| of every index at every layer over ``prompts`` (no IRM)."""
    prompts = prompts_or_default(prompts, n_prompts)
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    names = [get_act_name("resid_post", layer) for layer in range(n_layers)]
    sums = torch.zeros(len(POSITION_CLASSES), n_layers, d_model, dtype=torch.float64)
    counts = torch.zeros(len(POSITION_CLASSES), dtype=torch.float64)
    max_abs = torch.zeros(n_layers, d_model)
    rows = [ids for ids, _ in steered_sequences(model, None, prompts, max_new_tokens=0, chat=chat)[0]]
    pad_id = model.tokenizer.pad_token_id or 0
    starts = range(0, len(rows), batch_size)
    bar = progress_bar(starts, desc="activation magnitudes", unit="batch", disable=not progress)
    for start in bar:
        tokens, real, _ = right_pad(rows[start : start + batch_size], pad_id)
        real = real.bool()
        classes = _position_classes(model, tokens, real)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=names)
        acts = torch.stack([cache[n] for n in names], dim=2).abs().float().cpu()  # [b, pos, L, N]
        for c in range(len(POSITION_CLASSES)):
            sel = real & (classes == c)
            if sel.any():
                sums[c] += acts[sel].double().sum(0)
                counts[c] += int(sel.sum())
        max_abs = torch.maximum(max_abs, acts[real].amax(0))
    mean_abs = (sums / counts.clamp_min(1)[:, None, None]).float()
    return ActivationMagnitudes(
        mean_abs=mean_abs,
        max_abs=max_abs,
        n_tokens={c: int(counts[i]) for i, c in enumerate(POSITION_CLASSES)},
        provenance=Provenance.of(model, None, prompts),
    )
