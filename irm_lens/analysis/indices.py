"""Residual indices ("neurons") and layers: the one check every analysis calls, random
indices for baselines, and the indices a model's RMSNorm weights point to."""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens.errors import NeuronIndexError


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


def random_indices(d_model: int, exclude: int, n: int, seed: int) -> list[int]:
    """``n`` distinct random residual indices other than ``exclude`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    pool = [i for i in torch.randperm(d_model, generator=gen).tolist() if i != exclude]
    return pool[: min(n, len(pool))]


def standout_indices(model: HookedTransformer, k: int = 5) -> list[int]:
    """The ``k`` indices whose RMSNorm weights are furthest above their norm's median, summed
    over every norm of the model (a cheap pointer, computed from the weights alone)."""
    scores = norm_ratios(rmsnorm_weights(model)).sum(0)
    return scores.topk(min(k, scores.numel())).indices.tolist()


def norm_ratios(weights: Sequence[Tensor]) -> Float[Tensor, "norm neuron"]:
    """Each norm's |weight| over that norm's median |weight|, one row per norm."""
    rows = [w.detach().float().abs().cpu() for w in weights]
    return torch.stack([w / w.median().clamp_min(1e-30) for w in rows])


def rmsnorm_weights(model: HookedTransformer) -> list[Tensor]:
    """Every RMSNorm weight of ``model`` (ln1, ln2 of each block, then ln_final) that it has."""
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
