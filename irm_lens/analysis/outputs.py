"""What a trained IRM outputs: a [layer, neuron] summary, its striations, its dominant neurons,
and how those compare across runs.

The paper found neuron 1512 by eye, as vertical stripes in heatmaps of IRM outputs (injected
layer x residual index). Here the same observation is a statistic with a null distribution:

- ``collect_irm_outputs``: the IRM's outputs over prompts and the tokens the steered model
  generates from them (as the paper), summarised per prompt as mean and mean |.| per
  [injected layer, neuron];
- ``striation_score``: the share of the heatmap's variance explained by the neuron index (the
  column effect of a two-way decomposition), against a null that shuffles indices within each
  layer;
- ``dominant_neurons``: indices ranked by their share of the total |output|, with bootstrap
  intervals over prompts;
- ``compare_runs``: whether several runs (alignments, layer sets, seeds) pick the same index.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import prompts_or_default, steered_sequences
from irm_lens.analysis.provenance import Provenance
from irm_lens.analysis.stats import spearman
from irm_lens.data.dataset import right_pad
from irm_lens.errors import ConfigError
from irm_lens.irm import IRM

TokenSet = Literal["all", "prompt", "generated"]


@dataclass(frozen=True)
class IRMOutputs:
    """An IRM's outputs over a prompt set, summarised per prompt.

    Attributes:
        layers: The injected layers (rows of every ``[layer, neuron]`` matrix).
        mean: Token-weighted mean output, ``[layer, neuron]``.
        mean_abs: Token-weighted mean |output|, ``[layer, neuron]`` (the heatmap).
        per_prompt_mean_abs: Mean |output| of each prompt's tokens, ``[prompt, layer, neuron]``.
        n_tokens: Tokens summarised per prompt.
        prompts: The prompts, and ``continuations`` the steered model's greedy continuations.
        per_token: When collected, each prompt's outputs ``[pos, layer, neuron]``, and
            ``token_strs`` the decoded tokens they belong to.
        provenance: Model, IRM config, prompt hash.
        sequences: Each prompt's token ids and its continuation's (what the outputs were read
            on), generated with ``max_new_tokens`` and ``chat`` as given.
    """

    layers: tuple[int, ...]
    mean: Float[Tensor, "layer neuron"]
    mean_abs: Float[Tensor, "layer neuron"]
    per_prompt_mean_abs: Float[Tensor, "prompt layer neuron"]
    n_tokens: tuple[int, ...]
    prompts: tuple[str, ...]
    continuations: tuple[str, ...]
    tokens: TokenSet
    provenance: Provenance
    per_token: tuple[Float[Tensor, "pos layer neuron"], ...] | None = None
    token_strs: tuple[tuple[str, ...], ...] | None = None
    sequences: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    max_new_tokens: int | None = None
    chat: bool = True

    @property
    def neuron_mass(self) -> Float[Tensor, " neuron"]:
        """Each index's share of the total mean |output| (summed over layers; sums to 1)."""
        mass = self.mean_abs.sum(0)
        return mass / mass.sum().clamp_min(1e-30)


def collect_irm_outputs(
    model: HookedTransformer,
    irm: IRM,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int = 20,
    max_new_tokens: int = 20,
    tokens: TokenSet = "all",
    chat: bool = True,
    per_token: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> IRMOutputs:
    """Run the steered model on ``prompts`` and record what the IRM outputs on every token.

    Each prompt is continued greedily with the IRM injected; the IRM's outputs are then read on
    the whole sequence (prompt tokens and generated tokens, padding excluded). The IRM's input
    is the residual at its read site, which no injection precedes, so this equals the outputs
    seen during generation.

    Args:
        model: The host model.
        irm: The (trained) IRM.
        prompts: Prompts (default: ``n_prompts`` held-out neutral prompts).
        max_new_tokens: Tokens generated per prompt (0: prompt tokens only).
        tokens: Summarise ``"all"`` tokens, only the ``"prompt"``'s, or only the ``"generated"``.
        chat: Wrap prompts in the model's chat template.
        per_token: Also keep every token's ``[layer, neuron]`` output.
    """
    if tokens not in ("all", "prompt", "generated"):
        raise ConfigError(f"tokens must be 'all', 'prompt' or 'generated', got {tokens!r}.")
    if tokens == "generated" and max_new_tokens < 1:
        raise ConfigError("tokens='generated' needs max_new_tokens >= 1.")
    irm.check_compatible(model)
    prompts = prompts_or_default(prompts, n_prompts)
    rows, texts = steered_sequences(
        model, irm, prompts, max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
        progress=progress,
    )

    read_site = irm.config.read_site
    read_layer = irm.config.read_layer
    pad_id = model.tokenizer.pad_token_id or 0
    mean_abs_rows, mean_rows, counts, token_rows, token_strs = [], [], [], [], []
    starts = range(0, len(rows), batch_size)
    for start in progress_bar(starts, desc="IRM outputs", unit="batch", disable=not progress):
        batch = rows[start : start + batch_size]
        ids, real, _ = right_pad([p + g for p, g in batch], pad_id)
        real = real.bool()
        keep = real.clone()
        for i, (p, _) in enumerate(batch):
            if tokens == "prompt":
                keep[i, len(p) :] = False
            elif tokens == "generated":
                keep[i, : len(p)] = False
        with torch.no_grad():
            _, cache = model.run_with_cache(
                ids.to(model.cfg.device), names_filter=read_site, stop_at_layer=read_layer + 1
            )
            out = irm(cache[read_site]).float().cpu()  # [batch, pos, layer, neuron]
        for i in range(len(batch)):
            sel = out[i][keep[i]]  # [n_tok, layer, neuron]
            if sel.shape[0] == 0:
                raise ConfigError(
                    f"Prompt {start + i} has no {tokens} tokens to summarise (the model stopped "
                    "at once?); use tokens='all' or more max_new_tokens."
                )
            mean_abs_rows.append(sel.abs().mean(0))
            mean_rows.append(sel.mean(0))
            counts.append(sel.shape[0])
            if per_token:
                token_rows.append(sel.clone())
                kept = ids[i][keep[i]].tolist()
                token_strs.append(tuple(model.tokenizer.decode([t]) for t in kept))
    weights = torch.tensor(counts, dtype=torch.float32)
    w = (weights / weights.sum())[:, None, None]
    per_prompt_abs = torch.stack(mean_abs_rows)  # [prompt, layer, neuron]
    return IRMOutputs(
        layers=irm.config.layers,
        mean=(torch.stack(mean_rows) * w).sum(0),
        mean_abs=(per_prompt_abs * w).sum(0),
        per_prompt_mean_abs=per_prompt_abs,
        n_tokens=tuple(counts),
        prompts=tuple(prompts),
        continuations=texts,
        tokens=tokens,
        provenance=Provenance.of(model, irm, prompts),
        per_token=tuple(token_rows) if per_token else None,
        token_strs=tuple(token_strs) if per_token else None,
        sequences=tuple((tuple(p), tuple(g)) for p, g in rows),
        max_new_tokens=max_new_tokens,
        chat=chat,
    )


@dataclass(frozen=True)
class StriationScore:
    """Two-way decomposition of a [layer, neuron] matrix: how stripe-like it is.

    ``neuron_share`` (the striation score) is the share of the variance explained by the neuron
    index (column means), ``layer_share`` by the layer (row means), ``residual_share`` the
    rest; they sum to 1. 1.0: every layer has the same profile over neurons (perfect vertical
    stripes); ~0: the neuron index explains nothing. The null shuffles indices independently
    within each layer (keeping each layer's values), ``p_value`` is the share of null scores at
    least as large as the observed one (with the +1 correction), ``null_mean`` / ``null_std``
    summarise the null.
    """

    neuron_share: float
    layer_share: float
    residual_share: float
    null_mean: float
    null_std: float
    p_value: float
    n_shuffles: int
    n_layers: int

    @property
    def z(self) -> float:
        return (self.neuron_share - self.null_mean) / max(self.null_std, 1e-12)


def _two_way(matrix: Float[Tensor, "... layer neuron"]) -> tuple[Tensor, Tensor, Tensor]:
    """(neuron, layer, total) sums of squares of a two-way decomposition without replication."""
    n_layers, n_neurons = matrix.shape[-2:]
    grand = matrix.mean((-2, -1), keepdim=True)
    rows = matrix.mean(-1, keepdim=True) - grand
    cols = matrix.mean(-2, keepdim=True) - grand
    ss_total = ((matrix - grand) ** 2).sum((-2, -1))
    ss_layer = n_neurons * (rows**2).sum((-2, -1))
    ss_neuron = n_layers * (cols**2).sum((-2, -1))
    return ss_neuron, ss_layer, ss_total


def striation_score(
    outputs: IRMOutputs | Float[Tensor, "layer neuron"],
    *,
    n_shuffles: int = 200,
    seed: int = 0,
) -> StriationScore:
    """How much of an IRM heatmap's variance the neuron index explains, against a shuffled null.

    Args:
        outputs: ``IRMOutputs`` (its ``mean_abs`` is used) or any ``[layer, neuron]`` matrix.
        n_shuffles: Null samples (indices permuted within each layer).
        seed: Seed of the shuffles.
    """
    matrix = outputs.mean_abs if isinstance(outputs, IRMOutputs) else outputs
    matrix = torch.as_tensor(matrix).double()
    if matrix.ndim != 2:
        raise ConfigError(f"striation_score needs a [layer, neuron] matrix, got {tuple(matrix.shape)}.")
    if matrix.shape[0] < 2:
        raise ConfigError(
            "A striation score needs at least two injected layers: with one layer there is no "
            "layer-to-layer consistency to measure."
        )
    if n_shuffles < 1:
        raise ConfigError(f"n_shuffles must be at least 1, got {n_shuffles}.")
    ss_neuron, ss_layer, ss_total = _two_way(matrix)
    total = float(ss_total)
    if total <= 0:
        raise ConfigError("The matrix is constant: it has no variance to decompose.")
    gen = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(n_shuffles):
        perm = torch.argsort(torch.rand(matrix.shape, generator=gen, dtype=torch.float64), dim=1)
        null_neuron, _, null_total = _two_way(torch.gather(matrix, 1, perm))
        null.append(float(null_neuron / null_total))
    null_t = torch.tensor(null, dtype=torch.float64)
    score = float(ss_neuron) / total
    return StriationScore(
        neuron_share=score,
        layer_share=float(ss_layer) / total,
        residual_share=1.0 - score - float(ss_layer) / total,
        null_mean=float(null_t.mean()),
        null_std=float(null_t.std()) if n_shuffles > 1 else 0.0,
        p_value=float((1 + (null_t >= score).sum()) / (1 + n_shuffles)),
        n_shuffles=n_shuffles,
        n_layers=matrix.shape[0],
    )


@dataclass(frozen=True)
class DominantNeurons:
    """The indices carrying the most IRM output.

    ``table`` has one row per top index: ``rank``, ``neuron``, ``share`` of the total mean
    |output| (summed over layers), its bootstrap 95% interval over prompts (``share_lo``,
    ``share_hi``), ``ratio_to_median`` (its mass over the median index's), and how often it is
    the top index (``top1_frequency``) and in the top k (``topk_frequency``) across bootstrap
    resamples of the prompts.
    """

    table: pd.DataFrame
    k: int
    n_bootstrap: int

    @property
    def top(self) -> int:
        return int(self.table["neuron"].iloc[0])

    @property
    def indices(self) -> list[int]:
        return [int(n) for n in self.table["neuron"]]


def dominant_neurons(
    outputs: IRMOutputs, k: int = 10, *, n_bootstrap: int = 500, seed: int = 0
) -> DominantNeurons:
    """Top-``k`` residual indices by share of the IRM's total |output|, with bootstrap stability."""
    d_model = outputs.mean_abs.shape[1]
    if not 1 <= k <= d_model:
        raise ConfigError(f"k must be in 1..{d_model}, got {k}.")
    per_prompt = outputs.per_prompt_mean_abs.double().sum(1)  # [prompt, neuron]
    counts = torch.tensor(outputs.n_tokens, dtype=torch.float64)

    def shares(index: Tensor) -> Tensor:
        w = counts[index]
        mass = (per_prompt[index] * w[..., None]).sum(-2)
        return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)

    n_prompts = per_prompt.shape[0]
    observed = shares(torch.arange(n_prompts))
    gen = torch.Generator().manual_seed(seed)
    boot = shares(torch.randint(0, n_prompts, (n_bootstrap, n_prompts), generator=gen))
    top_idx = observed.topk(k).indices
    boot_topk = boot.topk(k, dim=-1).indices  # [boot, k]
    rows = []
    median = float(observed.median())
    for rank, n in enumerate(top_idx.tolist(), start=1):
        col = boot[:, n]
        rows.append(dict(
            rank=rank,
            neuron=n,
            share=float(observed[n]),
            share_lo=float(col.quantile(0.025)),
            share_hi=float(col.quantile(0.975)),
            ratio_to_median=float(observed[n]) / max(median, 1e-30),
            top1_frequency=float((boot_topk[:, 0] == n).double().mean()),
            topk_frequency=float((boot_topk == n).any(-1).double().mean()),
        ))
    return DominantNeurons(pd.DataFrame(rows), k, n_bootstrap)


@dataclass(frozen=True)
class RunComparison:
    """Whether several IRM runs rely on the same residual index.

    Attributes:
        runs: One row per run: ``run``, ``top1``, ``top1_share``, ``topk`` (list),
            ``striation`` (neuron share, nan when the run has one layer).
        pairs: One row per pair of runs: ``topk_overlap`` (|A ∩ B| / k) and ``spearman`` (rank
            correlation of the per-neuron mass over all indices).
        consensus: Top-1 indices and how many runs chose each, most frequent first.
        k: The k of the top-k sets.
    """

    runs: pd.DataFrame
    pairs: pd.DataFrame
    consensus: pd.DataFrame
    k: int
    masses: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @property
    def same_top1(self) -> bool:
        return self.runs["top1"].nunique() == 1


def compare_runs(
    outputs: Mapping[str, IRMOutputs], k: int = 10, *, n_shuffles: int = 100
) -> RunComparison:
    """Compare the neuron profiles of several runs (any layer sets; same model)."""
    if len(outputs) < 2:
        raise ConfigError(f"compare_runs needs at least two runs, got {len(outputs)}.")
    widths = {o.mean_abs.shape[1] for o in outputs.values()}
    if len(widths) != 1:
        raise ConfigError(f"The runs come from models of different d_model: {sorted(widths)}.")
    masses = {name: o.neuron_mass.double() for name, o in outputs.items()}
    rows = []
    for name, o in outputs.items():
        top = masses[name].topk(k).indices.tolist()
        stri = (
            striation_score(o, n_shuffles=n_shuffles).neuron_share
            if len(o.layers) > 1 else float("nan")
        )
        rows.append(dict(run=name, top1=top[0], top1_share=float(masses[name][top[0]]),
                         topk=top, striation=stri, layers=len(o.layers)))
    runs = pd.DataFrame(rows)
    pair_rows = []
    for a, b in itertools.combinations(outputs, 2):
        ta = set(masses[a].topk(k).indices.tolist())
        tb = set(masses[b].topk(k).indices.tolist())
        pair_rows.append(dict(run_a=a, run_b=b, topk_overlap=len(ta & tb) / k,
                              spearman=spearman(masses[a], masses[b])))
    consensus = (
        runs.groupby("top1").size().rename("n_runs").reset_index()
        .sort_values(["n_runs", "top1"], ascending=[False, True]).reset_index(drop=True)
    )
    return RunComparison(runs, pd.DataFrame(pair_rows), consensus, k, masses)
