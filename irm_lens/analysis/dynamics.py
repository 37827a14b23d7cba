"""How an IRM comes to rely on one residual index along its training run, read from the run's
checkpoints without training anything.

The paper looked at finished IRMs only. A run trained with ``TrainConfig(keep_checkpoints=0)``
keeps every checkpoint (``checkpoints/step-XXXXXXX.safetensors``); ``dominance_curve`` takes the
IRM out of each and measures its dominant neuron in three views of its outputs:

- ``"abs"``: share of the total mean |output| (``dominant_neurons`` on ``collect_irm_outputs``),
  the view the rest of the toolkit uses;
- ``"signed"``: share of the |token-mean signed output|, as the paper's heatmaps averaged signed
  outputs over tokens (an index pushed both ways cancels);
- ``"bias"``: share of the |output-layer bias|, the part of the output that ignores the input
  (read from the weights: no forward pass).

Each checkpoint's outputs are collected once, on the same prompts, and serve both the abs and
the signed view.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import prompts_or_default
from irm_lens.analysis.outputs import (
    IRMOutputs,
    TokenSet,
    collect_irm_outputs,
    dominant_neurons,
    striation_score,
)
from irm_lens.analysis.stats import spearman
from irm_lens.errors import ConfigError
from irm_lens.irm import IRM
from irm_lens.train import checkpoint_irm, run_checkpoints

View = Literal["abs", "signed", "bias"]
VIEWS: tuple[str, ...] = ("abs", "signed", "bias")


@dataclass(frozen=True)
class DominanceCurve:
    """The dominant neuron of every checkpoint of a run, in each view.

    Attributes:
        table: One row per (``step``, ``view``): ``top`` (the index with the largest share of
            the view's total, summed over injected layers), ``share``, ``ratio_to_uniform``
            (``share * d_model``: 1 when every index carries the same), ``runner_up`` and
            ``margin`` (``(share - runner-up share) / runner-up share``), ``striation``
            (``striation_score``'s neuron share of the view's ``[layer, neuron]`` matrix; nan
            with one injected layer), and ``top1_frequency`` (how often ``top`` stays the top
            index when the prompts are resampled; the abs view only, nan elsewhere); with
            ``track``, also ``tracked``, ``tracked_share`` and ``tracked_rank``.
        run_dir: The run directory read.
        layers: The injected layers.
        d_model: The residual width (the number of indices).
        prompts: The prompts every checkpoint's outputs were collected on.
        mass: The abs view's per-index mass at each checkpoint (``IRMOutputs.neuron_mass``:
            each index's share of the total mean |output|), one row per step of ``steps``;
            what ``cross_run_agreement`` and ``check_prediction`` compare.
    """

    table: pd.DataFrame
    run_dir: Path
    layers: tuple[int, ...]
    d_model: int
    prompts: tuple[str, ...]
    mass: Float[Tensor, "step neuron"]

    @property
    def steps(self) -> list[int]:
        """The checkpoint steps read, in order."""
        return sorted({int(s) for s in self.table["step"]})

    def view(self, name: View = "abs") -> pd.DataFrame:
        """The rows of one view, by step."""
        if name not in VIEWS:
            raise ConfigError(f"view must be one of {VIEWS}, got {name!r}.")
        rows = self.table[self.table["view"] == name]
        return rows.sort_values("step").reset_index(drop=True)

    def settled_step(self, name: View = "abs") -> int:
        """The first step from which the view's top index is the last checkpoint's for good."""
        rows = self.view(name)
        tops, steps = rows["top"].tolist(), rows["step"].tolist()
        first = len(tops) - 1
        while first > 0 and tops[first - 1] == tops[-1]:
            first -= 1
        return int(steps[first])

    def mass_at(self, step: int) -> Float[Tensor, " neuron"]:
        """The abs view's per-index mass at one checkpoint step."""
        if step not in self.steps:
            raise ConfigError(f"step {step!r} is not a checkpoint of this curve; it has steps "
                              f"{self.steps}.")
        return self.mass[self.steps.index(step)]


def dominance_curve(
    model: HookedTransformer,
    run_dir: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    steps: Sequence[int] | None = None,
    n_prompts: int = 20,
    max_new_tokens: int = 20,
    tokens: TokenSet = "all",
    chat: bool = True,
    n_bootstrap: int = 100,
    n_shuffles: int = 100,
    seed: int = 0,
    batch_size: int = 8,
    track: int | None = None,
    progress: bool = True,
) -> DominanceCurve:
    """The dominant neuron of each checkpoint of a training run, in the abs, signed and bias
    views, read from the checkpoints (nothing is trained).

    Args:
        model: The host model the run trained on.
        run_dir: A run directory written by ``train(..., out_dir=...)``; train with
            ``TrainConfig(keep_checkpoints=0)`` to keep every checkpoint (the default keeps 2).
        prompts: Prompts (default: ``n_prompts`` held-out neutral prompts), the same for every
            checkpoint.
        steps: Only these checkpoint steps (default: every one on disk).
        max_new_tokens, tokens, chat, batch_size: As ``collect_irm_outputs``.
        n_bootstrap: Prompt resamples of the abs view's ``top1_frequency``.
        n_shuffles: Null samples of each striation score.
        seed: Seed of the bootstrap and the shuffles.
        track: An index to follow whether or not it is the top one (a planted outlier, a
            forecast's pick): adds its ``tracked_share`` and ``tracked_rank`` (1 = the top)
            in every view.

    Example:
        >>> train(model, irm, "anger", TrainConfig(max_steps=600, checkpoint_every=50,
        ...       keep_checkpoints=0), out_dir="runs/anger")  # doctest: +SKIP
        >>> curve = dominance_curve(model, "runs/anger", max_new_tokens=0)  # doctest: +SKIP
        >>> curve.view("abs")[["step", "top", "ratio_to_uniform", "margin"]]  # doctest: +SKIP
    """
    checkpoints = _chosen_checkpoints(Path(run_dir), steps)
    prompts = prompts_or_default(prompts, n_prompts)
    if track is not None and not 0 <= track < model.cfg.d_model:
        raise ConfigError(f"track must be a residual index in 0..{model.cfg.d_model - 1}, "
                          f"got {track!r}.")
    rows: list[dict[str, Any]] = []
    masses: list[Tensor] = []
    irm = None
    for path in progress_bar(list(checkpoints.values()), desc="checkpoints", unit="ckpt",
                             disable=not progress):
        step, irm = checkpoint_irm(path)
        irm = irm.to(model.cfg.device)
        outputs = collect_irm_outputs(
            model, irm, prompts, max_new_tokens=max_new_tokens, tokens=tokens, chat=chat,
            batch_size=batch_size, progress=False,
        )
        rows += _step_rows(step, irm, outputs, n_bootstrap=n_bootstrap, n_shuffles=n_shuffles,
                           seed=seed, track=track)
        masses.append(outputs.neuron_mass.float().cpu())
    return DominanceCurve(pd.DataFrame(rows), Path(run_dir), irm.config.layers,
                          irm.config.d_model, tuple(prompts), torch.stack(masses))


def cross_run_agreement(curves: Mapping[str, DominanceCurve], k: int = 10) -> pd.DataFrame:
    """How much runs agree on their indices at each checkpoint step they all share.

    If training pushes the indices whose gradient keeps its sign (a property of the frozen model
    and the data, not of the seed), runs of one setting should agree more as they train longer.

    Returns:
        One row per shared step: ``n_runs``; ``modal_top`` (the abs view's top index most runs
        share; the smallest such index on a tie) and ``modal_count`` (how many); the mean over run pairs of the ``spearman``
        correlation of their per-index mass and of ``topk_overlap`` (indices shared by their
        top ``k``), beside ``topk_overlap_chance`` (``k * k / d_model``, two random top-k sets).
    """
    if len(curves) < 2:
        raise ConfigError(f"cross_run_agreement needs at least two curves, got {len(curves)}.")
    widths = {c.d_model for c in curves.values()}
    steps = sorted(set.intersection(*(set(c.steps) for c in curves.values())))
    if len(widths) > 1 or not steps:
        raise ConfigError(f"The curves must share a residual width and at least one step; widths "
                          f"{sorted(widths)}, shared steps {steps}.")
    d_model = widths.pop()
    rows = []
    for step in steps:
        masses = [c.mass_at(step) for c in curves.values()]
        tops = pd.Series([int(m.argmax()) for m in masses])
        top_sets = [set(m.topk(k).indices.tolist()) for m in masses]
        pairs = list(itertools.combinations(range(len(masses)), 2))
        rows.append(dict(
            step=step, n_runs=len(masses), modal_top=int(tops.mode().iloc[0]),
            modal_count=int(tops.value_counts().iloc[0]),
            spearman=sum(spearman(masses[i], masses[j]) for i, j in pairs) / len(pairs),
            topk_overlap=sum(len(top_sets[i] & top_sets[j]) for i, j in pairs) / len(pairs),
            topk_overlap_chance=k * k / d_model,
        ))
    return pd.DataFrame(rows)


def _chosen_checkpoints(run_dir: Path, steps: Sequence[int] | None) -> dict[int, Path]:
    found = run_checkpoints(run_dir)
    if not found:
        raise ConfigError(
            f"{run_dir} holds no training checkpoints (checkpoints/step-*.safetensors). Point "
            "run_dir at a directory train(..., out_dir=...) wrote, trained with "
            "TrainConfig(keep_checkpoints=0) to keep a checkpoint every checkpoint_every steps."
        )
    if steps is None:
        return found
    missing = sorted(set(steps) - set(found))
    if missing or not steps:
        raise ConfigError(
            f"steps {missing or list(steps)} are not checkpoints of {run_dir}; it holds steps "
            f"{sorted(found)}."
        )
    return {s: found[s] for s in sorted(set(steps))}


def _step_rows(step: int, irm: IRM, outputs: IRMOutputs, *, n_bootstrap: int, n_shuffles: int,
               seed: int, track: int | None = None) -> list[dict[str, Any]]:
    """One row per view of one checkpoint."""
    bias = einops.rearrange(irm.out.bias.detach().float().cpu(),
                            "(layer neuron) -> layer neuron", layer=irm.config.n_injected)
    matrices = {"abs": outputs.mean_abs, "signed": outputs.mean.abs(), "bias": bias.abs()}
    dominant = dominant_neurons(outputs, k=2, n_bootstrap=n_bootstrap, seed=seed).table
    rows = []
    for view, matrix in matrices.items():
        shares = matrix.double().sum(0) / matrix.double().sum().clamp_min(1e-30)
        if view == "abs":  # the toolkit's own ranking, with its bootstrap stability
            top, runner_up = dominant["neuron"].tolist()
            share, second = dominant["share"].tolist()
            frequency = float(dominant["top1_frequency"].iloc[0])
        else:
            (share, second), (top, runner_up) = (t.tolist() for t in shares.topk(2))
            frequency = math.nan
        rows.append(dict(
            step=step, view=view, top=int(top), share=share,
            ratio_to_uniform=share * matrix.shape[1], runner_up=int(runner_up),
            margin=_margin(share, second), striation=_striation(matrix, n_shuffles, seed),
            top1_frequency=frequency,
        ))
        if track is not None:
            rows[-1].update(tracked=track, tracked_share=float(shares[track]),
                            tracked_rank=int((shares > shares[track]).sum()) + 1)
    return rows


def _margin(share: float, second: float) -> float:
    """How far the top index stands above the runner-up, relative to the runner-up."""
    if second > 0:
        return (share - second) / second
    return math.inf if share > 0 else math.nan


def _striation(matrix: Float[Tensor, "layer neuron"], n_shuffles: int, seed: int) -> float:
    """The striation score, nan where it does not apply (one layer, or a constant matrix)."""
    if matrix.shape[0] < 2 or float(matrix.double().var()) == 0:
        return math.nan
    return striation_score(matrix, n_shuffles=n_shuffles, seed=seed).neuron_share
