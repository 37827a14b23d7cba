"""``irm_lens.ablate``: remove one residual index from the model and measure what it did.

Semantics (the ablated quantity is the residual stream, not an MLP neuron):

- ``mode="zero"`` (default) sets index ``neuron`` of ``blocks.{l}.hook_resid_post`` to 0 for
  every layer ``l`` (``layers=`` narrows it), on every token;
- ``mode="mean"`` sets it to its mean at that layer over a reference set of texts;
- ``mode="resample"`` sets it, token by token, to its value at a random token of the reference
  set at that layer (seeded).

The ablation acts after an IRM's injection at the same hook point, so under an IRM it removes
the IRM's push at that index too. Two functions, one job each::

    with irm_lens.ablate(model, neuron=5):          # a context manager on the model
        model.generate(...)

    result = irm_lens.measure_ablation(model, neuron=5, irm=irm, alignment="anger")

``measure_ablation`` measures: the change in loss and the KL to the unablated model on texts,
under an IRM the share of its loss gain that the ablation undoes, optionally the change in the
alignment's emotion score of steered generations, and the same figures for random indices.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Literal, Sequence, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import prompts_or_default, score_conditions, stacked, text_batches
from irm_lens.analysis.indices import check_layers, check_neuron, random_indices
from irm_lens.analysis.provenance import Provenance
from irm_lens.data.corpora import load_alignment
from irm_lens.errors import ConfigError
from irm_lens.generation import generate_continuations
from irm_lens.hooks import IndexValue, overwrite_index, permanent_hooks
from irm_lens.inject import inject
from irm_lens.irm import IRM
from irm_lens.scoring import emotion_scores

AblationMode = Literal["zero", "mean", "resample"]
ABLATION_MODES: tuple[str, ...] = get_args(AblationMode)


def reference_activations(
    model: HookedTransformer, texts: Sequence[str], layers: Sequence[int]
) -> dict[int, Float[Tensor, "token d_model"]]:
    """``hook_resid_post`` of ``layers`` on every real token of ``texts``."""
    names = [get_act_name("resid_post", layer) for layer in layers]
    acts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for ids, mask, _ in text_batches(model, texts):
        with torch.no_grad():
            _, cache = model.run_with_cache(ids.to(model.cfg.device), names_filter=names)
        for layer, name in zip(layers, names):
            acts[layer].append(cache[name][mask.bool()].float().cpu())
    return {layer: torch.cat(v) for layer, v in acts.items()}


class Ablation:
    """A context manager that ablates one residual index of ``model`` (see the module docs).

    The hooks are permanent TransformerLens hooks (``run_with_cache`` and ``reset_hooks`` leave
    them alone), removed on exit even after an exception. ``mean`` and ``resample`` read the
    reference texts once, on first entry.
    """

    def __init__(
        self,
        model: HookedTransformer,
        neuron: int,
        *,
        layers: Sequence[int] | None = None,
        mode: AblationMode = "zero",
        reference: Sequence[str] | None = None,
        seed: int = 0,
        reference_acts: dict[int, Tensor] | None = None,
    ):
        if mode not in ABLATION_MODES:
            raise ConfigError(f"mode must be one of {ABLATION_MODES}, got {mode!r}.")
        self.model = model
        self.neuron = check_neuron(model, neuron)
        self.layers = check_layers(model, layers)
        self.mode = mode
        self.reference = list(prompts_or_default(reference, 32)) if mode != "zero" else None
        self.seed = seed
        self._pools: dict[int, Tensor] | None = None
        if reference_acts is not None:
            self._pools = {layer: reference_acts[layer][:, self.neuron] for layer in self.layers}
        self._active: ContextManager[None] | None = None

    def _reference_values(self) -> dict[int, Tensor]:
        """The index's values over the reference texts' real tokens, per layer."""
        if self._pools is None:
            acts = reference_activations(self.model, self.reference, self.layers)
            self._pools = {layer: a[:, self.neuron] for layer, a in acts.items()}
        return self._pools

    def _value(self, layer: int, gen: torch.Generator) -> IndexValue:
        """What the index is set to at ``layer``: 0, the reference mean, or a resampler."""
        if self.mode == "zero":
            return 0.0
        pool = self._reference_values()[layer]
        if self.mode == "mean":
            return float(pool.mean())

        def resample(resid: Tensor) -> Tensor:
            draw = torch.randint(0, len(pool), resid.shape[:-1], generator=gen)
            return pool[draw].to(resid.device)

        return resample

    def __enter__(self) -> Ablation:
        if self._active is not None:
            raise RuntimeError("This Ablation is already active; it cannot be entered twice.")
        gen = torch.Generator().manual_seed(self.seed)
        hooks = [(get_act_name("resid_post", layer),
                  overwrite_index(self.neuron, self._value(layer, gen)), False)
                 for layer in self.layers]
        self._active = permanent_hooks(self.model, hooks)
        self._active.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        active, self._active = self._active, None
        if active is not None:
            active.__exit__(*exc_info)


@dataclass(frozen=True)
class AblationResult:
    """What ablating ``neuron`` did, against random indices ablated the same way.

    Attributes:
        neuron, mode, layers: The ablation.
        table: One row per ablated index (``kind``: ``"target"`` or ``"random"``): ``loss`` and
            ``delta_loss`` (nats per token, vs the unablated model), ``kl`` (KL(unablated ||
            ablated) per token); with an IRM, ``irm_loss`` / ``irm_delta_loss`` (the same texts
            under the IRM) and ``irm_gain_undone`` (share of the IRM's loss gain the ablation
            removes); with generations, ``emotion`` (the alignment's score of the steered text)
            and ``delta_emotion`` (vs steered, unablated).
        baseline: The unablated figures (``loss``, and with an IRM ``irm_loss``, ``emotion``,
            ``emotion_unsteered``).
        provenance: Model, IRM and texts.
    """

    neuron: int
    mode: AblationMode
    layers: tuple[int, ...]
    table: pd.DataFrame
    baseline: dict[str, float]
    provenance: Provenance

    def summary(self) -> pd.DataFrame:
        """For each measured column: the target's value, the random indices' mean and max, and
        the share of random indices at least as large (a permutation-style p-value)."""
        target = self.table[self.table["kind"] == "target"].iloc[0]
        rand = self.table[self.table["kind"] == "random"]
        rows = []
        for col in ("delta_loss", "kl", "irm_delta_loss", "irm_gain_undone", "delta_emotion"):
            if col not in self.table:
                continue
            values = rand[col].abs() if col == "delta_emotion" else rand[col]
            value = abs(target[col]) if col == "delta_emotion" else target[col]
            rows.append(dict(
                measure=col, target=float(target[col]), random_mean=float(rand[col].mean()),
                random_max=float(rand[col].max()),
                random_at_least_target=float((values >= value).mean()) if len(rand) else float("nan"),
            ))
        return pd.DataFrame(rows)


def ablate(
    model: HookedTransformer,
    neuron: int,
    *,
    layers: Sequence[int] | None = None,
    mode: AblationMode = "zero",
    reference: Sequence[str] | None = None,
    seed: int = 0,
) -> Ablation:
    """Ablate residual index ``neuron`` while the returned context manager is active.

    Args:
        model: The host model.
        neuron: The residual index, in 0..d_model-1 (checked; an index the model lacks raises
            ``NeuronIndexError`` naming its d_model and indices worth trying).
        layers: Layers whose ``hook_resid_post`` is ablated (default: all).
        mode: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference: Texts for ``mean`` / ``resample`` (default: held-out neutral prompts).
        seed: Seeds ``resample``'s draws.

    Example:
        >>> with irm_lens.ablate(model, neuron=1512):  # doctest: +SKIP
        ...     model.generate("Hello")
    """
    return Ablation(model, neuron, layers=layers, mode=mode, reference=reference, seed=seed)


def measure_ablation(
    model: HookedTransformer,
    neuron: int,
    *,
    layers: Sequence[int] | None = None,
    mode: AblationMode = "zero",
    reference: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
    irm: IRM | None = None,
    alignment: str | None = None,
    n_random: int = 8,
    n_texts: int = 16,
    generate: bool = False,
    n_prompts: int = 16,
    max_new_tokens: int = 24,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> AblationResult:
    """What ablating residual index ``neuron`` does, beside ``n_random`` random indices
    ablated the same way (``ablate``'s arguments, plus what to measure on).

    Args:
        texts: Texts whose loss is measured (default: ``n_texts`` of ``alignment``'s texts, or
            neutral prompts without an alignment).
        irm: Also measure under this IRM: its loss gain undone, and with ``generate`` the
            change of the alignment's emotion score.
        alignment: The IRM's alignment (its texts; its emotion for ``generate``).
        n_random: Random indices ablated the same way, as the baseline.
        generate: Generate steered continuations of ``n_prompts`` neutral prompts with each
            ablation and score the alignment's emotion (slow: ``n_random + 3`` generations).
    """
    target = Ablation(model, neuron, layers=layers, mode=mode, reference=reference, seed=seed)
    if texts is None:
        if alignment is not None:
            texts = list(load_alignment(alignment).texts[:n_texts])
        else:
            texts = prompts_or_default(None, n_texts)
    texts = list(texts)
    if generate and (irm is None or alignment is None):
        raise ConfigError("generate=True needs an irm and the alignment whose emotion to score.")
    indices = [target.neuron, *random_indices(model.cfg.d_model, target.neuron, n_random, seed)]
    # One reading of the reference set serves every index.
    acts = reference_activations(model, target.reference, target.layers) if mode != "zero" else None
    ablations = {
        i: Ablation(model, i, layers=target.layers, mode=mode, reference=target.reference,
                    seed=seed, reference_acts=acts)
        for i in indices
    }

    conditions = {"clean": lambda ids: nullcontext()}
    for i, a in ablations.items():
        conditions[f"ablate/{i}"] = lambda ids, a=a: a
    if irm is not None:
        conditions["irm"] = lambda ids: inject(model, irm)
        for i, a in ablations.items():
            conditions[f"irm+ablate/{i}"] = lambda ids, a=a: stacked(inject(model, irm), a)
    batches = text_batches(model, texts, max_length=max_length)
    scores = score_conditions(
        model, batches, conditions, reference="clean", progress=progress, desc="ablation"
    ).set_index("condition")
    baseline = {"loss": float(scores.loc["clean", "loss"])}
    rows = []
    for i in indices:
        loss = float(scores.loc[f"ablate/{i}", "loss"])
        row = dict(index=i, kind="target" if i == target.neuron else "random", loss=loss,
                   delta_loss=loss - baseline["loss"], kl=float(scores.loc[f"ablate/{i}", "kl"]))
        if irm is not None:
            irm_loss = float(scores.loc["irm", "loss"])
            abl = float(scores.loc[f"irm+ablate/{i}", "loss"])
            gain = baseline["loss"] - irm_loss
            row.update(irm_loss=abl, irm_delta_loss=abl - irm_loss,
                       irm_gain_undone=(abl - irm_loss) / gain if gain != 0 else float("nan"))
        rows.append(row)
    if irm is not None:
        baseline["irm_loss"] = float(scores.loc["irm", "loss"])
    table = pd.DataFrame(rows)
    if generate:
        emotion, unsteered, base = _emotion_under_ablation(
            model, irm, alignment, ablations, n_prompts, max_new_tokens, seed, progress
        )
        table["emotion"] = [emotion[i] for i in indices]
        table["delta_emotion"] = table["emotion"] - base
        baseline.update(emotion=base, emotion_unsteered=unsteered)
    return AblationResult(
        target.neuron, mode, target.layers, table, baseline, Provenance.of(model, irm, texts, seed)
    )


def _emotion_under_ablation(model, irm, alignment, ablations, n_prompts, max_new_tokens, seed,
                            progress):
    """Mean ``alignment`` score of greedy steered continuations, per ablated index."""
    prompts = prompts_or_default(None, n_prompts)
    kwargs = dict(max_new_tokens=max_new_tokens, seed=seed)

    def score(conts) -> float:
        frame = emotion_scores([c.text for c in conts])
        if alignment not in frame:
            raise ConfigError(f"{alignment!r} is not a scored emotion: {list(frame.columns)}.")
        return float(frame[alignment].mean())

    unsteered = score(generate_continuations(model, prompts, **kwargs))
    base = score(generate_continuations(model, prompts, intervention=irm, **kwargs))
    emotion = {}
    items = list(ablations.items())
    
    for i, a in progress_bar(items, desc="steered generations", unit="index", disable=not progress):
        with a:
            emotion[i] = score(generate_continuations(model, prompts, intervention=irm, **kwargs))
    return emotion, unsteered, base
