"""RMSNorm weights: where a residual index sits among the model's normalisation scales.

A Llama block normalises its input twice (``ln1`` before attention, ``ln2`` before the MLP)
and the final norm (``ln_final``) precedes the unembedding. An RMSNorm multiplies index ``i``
by its weight ``w[i]`` after dividing by the RMS of the whole vector, so an index with an
unusual weight is read unusually strongly (or weakly) by the next component: one of the
paper's candidate explanations for neuron 1512.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens.analysis.indices import norm_ratios
from irm_lens.analysis.stats import ranks_descending
from irm_lens.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class NormWeights:
    """The raw RMSNorm weights of a model.

    Attributes:
        ln1: Input norm of each block, ``[layer, neuron]``.
        ln2: Post-attention norm of each block, ``[layer, neuron]``.
        ln_final: The final norm, ``[neuron]``.
        model_name: Where they came from.
    """

    ln1: Float[Tensor, "layer neuron"]
    ln2: Float[Tensor, "layer neuron"]
    ln_final: Float[Tensor, " neuron"]
    model_name: str

    def items(self) -> list[tuple[str, int | None, Tensor]]:
        """(norm, layer or None for the final norm, weights) for every norm of the model."""
        rows: list[tuple[str, int | None, Tensor]] = []
        for layer in range(self.ln1.shape[0]):
            rows.append(("ln1", layer, self.ln1[layer]))
            rows.append(("ln2", layer, self.ln2[layer]))
        rows.append(("ln_final", None, self.ln_final))
        return rows

    def profile(self, neuron: int) -> pd.DataFrame:
        """Where ``neuron`` sits in every norm: one row per (norm, layer).

        Columns: ``weight``; ``rank`` of |weight| among all indices (1 = largest);
        ``percentile`` (100 = largest); ``ratio_to_median`` (|weight| over the median |weight|).
        """
        rows = []
        for norm, layer, w in self.items():
            a = w.abs()
            rank = int(ranks_descending(a)[neuron])
            rows.append(dict(
                norm=norm, layer=layer, weight=float(w[neuron]), rank=rank,
                percentile=100.0 * (1 - (rank - 1) / len(a)),
                ratio_to_median=float(a[neuron] / a.median().clamp_min(1e-30)),
            ))
        return pd.DataFrame(rows)

    def outliers(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` indices whose |weight| is furthest above the median, summed over all norms
        (``score``: the sum over norms of |w[i]| / median |w|), with their largest single ratio."""
        ratios = norm_ratios([w for _, _, w in self.items()])
        score = ratios.sum(0)
        top = score.topk(min(k, score.numel())).indices.tolist()
        return pd.DataFrame([
            dict(neuron=n, score=float(score[n]), mean_ratio=float(ratios[:, n].mean()),
                 max_ratio=float(ratios[:, n].max()))
            for n in top
        ])


def norm_weights(model: HookedTransformer) -> NormWeights:
    """Read every RMSNorm weight of ``model`` (loaded without folding, as ``load_model`` does)."""
    def weight(module, where: str) -> Tensor:
        w = getattr(module, "w", None)
        if w is None:
            raise UnsupportedArchitectureError(
                f"{model.cfg.model_name}'s {where} has no weight: the model was loaded with its "
                "norm weights folded into the next layer (TransformerLens's fold_ln). Load it "
                "with irm_lens.load_model, or from_pretrained_no_processing."
            )
        return w.detach().float().cpu()

    ln1 = torch.stack([weight(b.ln1, f"blocks.{i}.ln1") for i, b in enumerate(model.blocks)])
    ln2 = torch.stack([weight(b.ln2, f"blocks.{i}.ln2") for i, b in enumerate(model.blocks)])
    return NormWeights(ln1, ln2, weight(model.ln_final, "ln_final"), model.cfg.model_name)
