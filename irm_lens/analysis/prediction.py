"""Name the dominant neuron before training anything, and check the forecast against trained IRMs.

If we understand why an IRM leans on one residual index, that index should be visible in the
frozen model alone. The forecast here follows from how an IRM is trained:

- an IRM's output at ``blocks.{l}.hook_resid_post`` acts on the loss, to first order, through
  the gradient of the loss with respect to that residual, index by index;
- Adam divides every parameter's step by the root of its squared gradients, so how *large* a
  gradient is matters little; what decides how far an output weight travels is whether its
  gradient keeps **the same sign** from batch to batch (a consistent gradient moves it ~lr
  every step; a noisy one random-walks around zero).

So each index gets, at each layer, the **gradient consistency** of a push on it: over batches
``b`` of ordinary (or alignment) text, ``|mean_b g_b| / sqrt(mean_b g_b^2)`` where ``g_b`` is
the gradient of batch ``b``'s next-token loss with respect to a constant added at that index.
It is 1 for a gradient that never changes sign or size and about ``1/sqrt(n_batches)`` for
noise. The score of an index is its consistency summed over the injected layers: the layer x
index heatmap an IRM would draw if every output weight moved in proportion to it.

Each ranked index comes with the evidence the analyses use (mean gradient, activation
magnitude, RMSNorm weights), and ``check_prediction`` scores a forecast against the per-index
mass of trained IRMs, beside a ranking by activation magnitude alone and random rankings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import text_batches
from irm_lens.analysis.indices import check_layers, norm_ratios, rmsnorm_weights
from irm_lens.analysis.outputs import collect_irm_outputs
from irm_lens.analysis.provenance import Provenance
from irm_lens.analysis.stats import ranks_descending, spearman
from irm_lens.data.corpora import load_alignment
from irm_lens.errors import ConfigError
from irm_lens.hooks import permanent_hooks
from irm_lens.irm import layer_set
from irm_lens.losses import masked_lm_loss
from irm_lens.sweeps import run_sweep, sweep_runs


@dataclass(frozen=True)
class Prediction:
    """A ranking of residual indices by how strongly a trained IRM is expected to push them.

    Attributes:
        layers: The injected layers the score sums over (``for_layers`` re-scores for others).
        grad_mean: Mean over batches of the batch gradient of the loss with respect to a
            constant added at each ``[layer, neuron]`` of ``hook_resid_post`` (all layers).
        grad_rms: Root mean square over batches of the same gradient.
        magnitude: Mean |resid_post| per ``[layer, neuron]`` over the texts' tokens.
        norm_ratio: Each RMSNorm's |weight| over its median (rows: ``ln1``/``ln2`` of each
            block in order, then the final norm).
        k: How many indices ``indices`` and ``table`` show by default.
        n_batches, n_tokens: What the statistics were measured on.
        provenance: Model and the hash of the texts.
    """

    layers: tuple[int, ...]
    grad_mean: Float[Tensor, "layer neuron"]
    grad_rms: Float[Tensor, "layer neuron"]
    magnitude: Float[Tensor, "layer neuron"]
    norm_ratio: Float[Tensor, "norm neuron"]
    k: int
    n_batches: int
    n_tokens: int
    provenance: Provenance

    @property
    def consistency(self) -> Float[Tensor, "layer neuron"]:
        """``|mean_b g_b| / rms_b g_b`` per layer and index, in [0, 1]."""
        return self.grad_mean.abs() / self.grad_rms.clamp_min(1e-30)

    @property
    def scores(self) -> Float[Tensor, " neuron"]:
        """The forecast: gradient consistency summed over the injected layers."""
        return self.consistency[list(self.layers)].sum(0)

    @property
    def ranking(self) -> list[int]:
        """Every index, the most strongly predicted first."""
        return torch.argsort(self.scores, descending=True, stable=True).tolist()

    @property
    def top(self) -> int:
        return self.ranking[0]

    def indices(self, k: int | None = None) -> list[int]:
        return self.ranking[: k or self.k]

    @property
    def magnitude_scores(self) -> Float[Tensor, " neuron"]:
        """The baseline: mean |resid_post| over the injected layers, each layer over its median."""
        mag = self.magnitude[list(self.layers)]
        return (mag / mag.median(dim=1, keepdim=True).values.clamp_min(1e-30)).mean(0)

    @property
    def push_sign(self) -> Tensor:
        """The direction a push lowers the loss, per index (+1 or -1; summed over layers)."""
        return -torch.sign(self.grad_mean[list(self.layers)].sum(0))

    def for_layers(self, layers: Iterable[int]) -> Prediction:
        """The same statistics scored for another set of injected layers (no new forward pass)."""
        n_layers = self.grad_mean.shape[0]
        chosen = sorted({int(layer) for layer in layers})
        if not chosen or not all(0 <= layer < n_layers for layer in chosen):
            raise ConfigError(f"layers must be a non-empty subset of 0..{n_layers - 1}: {layers!r}")
        return replace(self, layers=tuple(chosen))

    def table(self, k: int | None = None) -> pd.DataFrame:
        """The top ``k`` indices with the evidence behind each score.

        Columns: ``rank``, ``neuron``, ``score`` (summed consistency) and ``x_median`` (over the
        median index's score), ``push`` (the sign a loss-lowering push has), ``grad_rank`` (rank
        of summed |mean gradient|), ``magnitude_ratio`` / ``magnitude_rank`` (mean |resid_post|
        over the layer median, the baseline's ranking), ``block_norm_ratio`` (median over blocks
        of the ln1 and ln2 weight ratios) and ``final_norm_ratio`` / ``final_norm_rank``.
        """
        scores, layers = self.scores, list(self.layers)
        grad = self.grad_mean[layers].abs().sum(0)
        mag = self.magnitude_scores
        blocks, final = self.norm_ratio[:-1], self.norm_ratio[-1]
        grad_rank, mag_rank = ranks_descending(grad), ranks_descending(mag)
        final_rank = ranks_descending(final)
        median = scores.median().clamp_min(1e-30)
        push = self.push_sign
        rows = []
        for rank, n in enumerate(self.indices(k), start=1):
            rows.append(dict(
                rank=rank, neuron=n, score=float(scores[n]), x_median=float(scores[n] / median),
                push="+" if push[n] > 0 else "-", grad_rank=int(grad_rank[n]),
                magnitude_ratio=float(mag[n]), magnitude_rank=int(mag_rank[n]),
                block_norm_ratio=float(blocks[:, n].median()) if len(blocks) else float("nan"),
                final_norm_ratio=float(final[n]), final_norm_rank=int(final_rank[n]),
            ))
        return pd.DataFrame(rows)

    def summary(self) -> str:
        top = self.table(1).iloc[0]
        return (
            f"{self.provenance.model_name}: predicted dominant index {self.top} (then "
            f"{', '.join(map(str, self.indices()[1:]))}), from the gradient consistency of a push "
            f"at {len(self.layers)} layer(s) over {self.n_batches} batches ({self.n_tokens} "
            f"tokens): score {top.score:.2f}, {top.x_median:.1f}x the median index; its "
            f"activation magnitude ranks {top.magnitude_rank} and its final-norm weight "
            f"{top.final_norm_rank} of {self.grad_mean.shape[1]}."
        )


def predict_dominant(
    model: HookedTransformer,
    prompts: Sequence[str] | None = None,
    k: int = 5,
    *,
    alignment: str | None = None,
    layers: Iterable[int] | str | None = None,
    n_texts: int = 256,
    batch_size: int = 8,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Prediction:
    """Rank residual indices by how strongly a trained IRM is expected to push them.

    Only the frozen model is used: one forward and one backward pass per batch of texts (the
    model's weights get no gradient; a zero constant at every ``hook_resid_post`` does).

    Args:
        model: The frozen host model.
        prompts: The texts whose next-token loss is differentiated. Default: an ``alignment``'s
            texts when one is named, otherwise the built-in ``neutral`` texts (ordinary text).
        k: How many indices to show by default.
        alignment: A built-in alignment whose texts to use (the forecast for an IRM trained on
            it); ignored when ``prompts`` is given.
        layers: The injected layers (a layer-set name such as ``"every4"``, or ints; default
            all). Statistics are kept for every layer, so ``for_layers`` re-scores for free.
        n_texts: How many texts to sample (seeded) when they come from a built-in alignment.
        batch_size, max_length: The batches (use the training run's: 8 x 64 in the sweep).
        seed: The sample of texts.
        progress: A progress bar.
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= model.cfg.d_model:
        raise ConfigError(f"k must be an int in 1..{model.cfg.d_model}, got {k!r}.")
    if prompts is None:
        texts = list(load_alignment(alignment or "neutral").texts)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
        texts = [texts[i] for i in order[:n_texts].tolist()]
    else:
        texts = [t for t in prompts if isinstance(t, str) and t.strip()]
        if len(texts) != len(prompts):
            raise ConfigError("prompts must be non-empty strings.")
    if len(texts) < 2 * batch_size:
        raise ConfigError(
            f"Gradient consistency compares batches: give at least 2 x batch_size = "
            f"{2 * batch_size} texts (got {len(texts)}), or a smaller batch_size."
        )
    if isinstance(layers, str):
        layers = layer_set(layers, model.cfg.n_layers)
    injected = check_layers(model, layers)

    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    device = model.cfg.device
    batches = text_batches(model, texts, max_length=max_length, batch_size=batch_size)
    push = torch.zeros(n_layers, d_model, device=device, requires_grad=True)
    grad_sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
    grad_sq = torch.zeros(n_layers, d_model, dtype=torch.float64)
    abs_sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
    n_tokens = 0
    real: Tensor | None = None

    def add_push(layer: int):
        def hook(resid: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            abs_sum[layer] += resid.detach()[real].abs().sum(0).double().cpu()
            return resid + push[layer].to(resid.dtype)

        return hook

    hooks = [(get_act_name("resid_post", layer), add_push(layer), False) for layer in range(n_layers)]
    bar = progress_bar(batches, desc="gradient consistency", disable=not progress)
    for ids, attention, loss_mask in bar:
        ids, real = ids.to(device), attention.bool().to(device)
        push.grad = None
        with torch.enable_grad(), permanent_hooks(model, hooks):
            loss = masked_lm_loss(model(ids), ids, loss_mask.to(device))
            loss.backward()
        grad = push.grad.detach().double().cpu()
        grad_sum += grad
        grad_sq += grad**2
        n_tokens += int(real.sum())
    n = len(batches)
    return Prediction(
        layers=injected,
        grad_mean=(grad_sum / n).float(),
        grad_rms=(grad_sq / n).sqrt().float(),
        magnitude=(abs_sum / n_tokens).float(),
        norm_ratio=norm_ratios(rmsnorm_weights(model)),
        k=k,
        n_batches=n,
        n_tokens=n_tokens,
        provenance=Provenance.of(model, texts=texts, seed=seed),
    )


@dataclass(frozen=True)
class PredictionCheck:
    """How well forecasts named the indices trained IRMs pushed hardest.

    Attributes:
        runs: One row per run and ranking (``predicted``, ``magnitude``: activation magnitude
            alone, ``random``: the mean over random rankings): the run's ``observed_top``
            index, the ranking's ``top`` index, ``top1`` (agreement, a rate for random),
            ``topk_overlap`` (shared indices among the top ``k``), ``spearman`` (with the
            observed per-index mass over every index) and ``rank_of_observed_top``.
        summary: One row per ranking: ``top1_hits`` of ``n_runs``, mean ``topk_overlap``, mean
            ``spearman``, median ``rank_of_observed_top``.
        k: The size of the top-k sets.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    k: int

    def hits(self, ranking: str = "predicted") -> int:
        """How many runs' observed top index the ranking named first."""
        return int(self.runs.loc[self.runs.ranking == ranking, "top1"].sum())


def check_prediction(
    predictions: Mapping[str, Prediction],
    observed: Mapping[str, Float[Tensor, " neuron"]],
    *,
    k: int = 5,
    n_random: int = 1000,
    seed: int = 0,
) -> PredictionCheck:
    """Score forecasts against what trained IRMs did.

    Args:
        predictions: Run name -> the forecast for that run (its alignment's texts, its layers).
        observed: Run name -> the run's per-index mass (``IRMOutputs.neuron_mass``).
        k: Size of the top-k sets.
        n_random: Random rankings averaged for the chance baseline (seeded).
    """
    missing = sorted(set(observed) - set(predictions))
    if missing or not observed:
        raise ConfigError(f"Every observed run needs a prediction; missing: {missing or 'all'}.")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, mass in observed.items():
        pred = predictions[name]
        if mass.shape != pred.scores.shape:
            raise ConfigError(
                f"Run {name}: observed mass has {mass.shape[0]} indices, the prediction "
                f"{pred.scores.shape[0]}."
            )
        run = _Observed(name, int(mass.argmax()), set(mass.topk(k).indices.tolist()),
                        ranks_descending(mass), mass)
        rows.append(_agreement(run, "predicted", pred.scores, k))
        rows.append(_agreement(run, "magnitude", pred.magnitude_scores, k))
        chance = pd.DataFrame([
            _agreement(run, "random", torch.rand(mass.shape[0], generator=gen), k)
            for _ in range(n_random)
        ])
        rows.append({
            **chance.iloc[0].to_dict(), "top": -1,
            **chance[["top1", "topk_overlap", "spearman"]].mean().to_dict(),
            **chance[["rank_of_observed_top", "observed_rank_of_top"]].median().astype(int).to_dict(),
        })
    runs = pd.DataFrame(rows)
    summary = runs.groupby("ranking", sort=False).agg(
        top1_hits=("top1", "sum"), n_runs=("run", "count"), topk_overlap=("topk_overlap", "mean"),
        spearman=("spearman", "mean"), median_rank_of_observed_top=("rank_of_observed_top", "median"),
    ).reset_index()
    return PredictionCheck(runs=runs, summary=summary, k=k)


@dataclass(frozen=True)
class _Observed:
    """What a trained run did, computed once for all the rankings it is compared with."""

    name: str
    top: int
    top_k: set[int]
    ranks: Tensor  # 1-based rank of each index by mass
    mass: Tensor


def _agreement(run: _Observed, ranking: str, values: Tensor, k: int) -> dict:
    """One row of ``PredictionCheck.runs``: how ``values`` ranks against the run's mass."""
    order = torch.argsort(values, descending=True, stable=True)
    return {
        "run": run.name, "ranking": ranking, "observed_top": run.top, "top": int(order[0]),
        "top1": float(int(order[0]) == run.top),
        "topk_overlap": float(len(run.top_k & set(order[:k].tolist()))),
        "spearman": spearman(values, run.mass),
        "rank_of_observed_top": int((order == run.top).nonzero()[0]) + 1,
        "observed_rank_of_top": int(run.ranks[order[0]]),
    }


def validate_prediction(
    model: HookedTransformer,
    sweep_dir,
    *,
    train: bool = False,
    config=None,
    alignments: Iterable[str] = ("anger", "sadness"),
    layer_sets: Iterable[str] = ("all", "every4"),
    seeds: Iterable[int] = (0, 1),
    k: int = 5,
    n_prompts: int = 16,
    max_new_tokens: int = 16,
    n_texts: int = 256,
    progress: bool = True,
) -> tuple[PredictionCheck, dict[str, Prediction]]:
    """Forecast each run of a sweep from the frozen model, then score it against the trained IRM.

    The sweep's runs (``irm_lens.run_sweep``'s grid, no L1) are reused when finished; with
    ``train=True`` missing ones are trained (or resumed) first, with ``config`` (a
    ``TrainConfig``; default: the sweep's). Each alignment's statistics are
    measured once on its texts and re-scored for each run's layers. A run's observed mass comes
    from ``collect_irm_outputs`` on ``n_prompts`` held-out prompts and ``max_new_tokens``
    steered tokens, as ``irm-lens compare`` measures it.

    Returns:
        The check, and the forecast made for each run.
    """
    alignments, layer_sets, seeds = list(alignments), list(layer_sets), list(seeds)
    if train:
        runs = run_sweep(
            model, sweep_dir, alignments, layer_sets, (False,), seeds, config=config,
            progress=progress,
        )
    else:
        runs = sweep_runs(sweep_dir, alignments, layer_sets, (False,), seeds)
    missing = [r.name for r in runs if not r.done]
    if missing:
        raise ConfigError(
            f"{len(missing)} run(s) of the sweep in {sweep_dir} are not finished: "
            f"{', '.join(missing)}. Train them first (irm-lens sweep --out {sweep_dir}) or pass "
            "train=True (irm-lens predict --validate DIR --train)."
        )
    by_alignment = {
        a: predict_dominant(model, k=k, alignment=a, n_texts=n_texts, progress=progress)
        for a in alignments
    }
    predictions, observed = {}, {}
    for run in runs:
        irm = run.load_irm(model)
        predictions[run.name] = by_alignment[run.alignment].for_layers(irm.config.layers)
        outputs = collect_irm_outputs(
            model, irm, n_prompts=n_prompts, max_new_tokens=max_new_tokens, progress=False
        )
        observed[run.name] = outputs.neuron_mass
    return check_prediction(predictions, observed, k=k), predictions
