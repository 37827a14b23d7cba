"""``irm_lens.explain``: every analysis of one residual index, gathered into one dossier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
from transformer_lens import HookedTransformer

from irm_lens.analysis.ablation import AblationResult, measure_ablation
from irm_lens.analysis.attribution import LogitAttribution, logit_attribution
from irm_lens.analysis.conditions import prompts_or_default
from irm_lens.analysis.indices import check_neuron
from irm_lens.analysis.magnitudes import ActivationMagnitudes, activation_magnitudes
from irm_lens.analysis.norms import NormWeights, norm_weights
from irm_lens.analysis.normscale import DivergentPush, NormScaleSplit, norm_scale_split
from irm_lens.analysis.outputs import (
    DominantNeurons,
    IRMOutputs,
    StriationScore,
    collect_irm_outputs,
    dominant_neurons,
    striation_score,
)
from irm_lens.analysis.patching import PatchingResult, patch_neuron
from irm_lens.analysis.provenance import Provenance
from irm_lens.irm import IRM


@dataclass(frozen=True)
class NeuronDossier:
    """Everything measured about one index: the raw material of a report.

    The IRM-dependent parts (``outputs``, ``striation``, ``dominant``, ``patching``) are None
    without an IRM; ``patching`` and the IRM columns of ``ablation`` also need an alignment.
    ``norm_scale`` (how much of a push on the index goes through the RMSNorm scales) is None
    when ``explain`` was told not to measure it.
    """

    neuron: int
    norms: NormWeights
    magnitudes: ActivationMagnitudes
    attribution: LogitAttribution
    ablation: AblationResult
    outputs: IRMOutputs | None
    striation: StriationScore | None
    dominant: DominantNeurons | None
    patching: PatchingResult | None
    provenance: Provenance
    norm_scale: NormScaleSplit | None = None

    def summary(self) -> dict[str, Any]:
        """The headline figures, one value each."""
        n = self.neuron
        norm = self.norms.profile(n)
        mag = self.magnitudes.profile(n)
        out: dict[str, Any] = {
            "neuron": n,
            "model": self.provenance.model_name,
            "ln_final_rank": int(norm.loc[norm["norm"] == "ln_final", "rank"].iloc[0]),
            "ln1_median_rank": float(norm.loc[norm["norm"] == "ln1", "rank"].median()),
            "ln2_median_rank": float(norm.loc[norm["norm"] == "ln2", "rank"].median()),
            "magnitude_median_rank": float(mag["rank"].median()),
            "magnitude_max_ratio_to_median": float(mag["ratio_to_median"].max()),
            "direct_effect_rank": self.attribution.direct_effect_rank,
            "ablation_delta_loss": float(self.ablation.table["delta_loss"].iloc[0]),
            "ablation_random_delta_loss_mean": float(
                self.ablation.table.loc[self.ablation.table["kind"] == "random", "delta_loss"].mean()
            ),
        }
        if self.dominant is not None:
            table = self.dominant.table
            out["irm_top_neuron"] = self.dominant.top
            out["irm_share"] = float(self.outputs.neuron_mass[n])
            hit = table.loc[table["neuron"] == n, "rank"]
            out["irm_rank"] = int(hit.iloc[0]) if len(hit) else None
            out["striation_score"] = self.striation.neuron_share if self.striation else None
            out["irm_logit_share_rank"] = self.attribution.irm_share_rank
        if "irm_gain_undone" in self.ablation.table:
            t = self.ablation.table
            out["ablation_irm_gain_undone"] = float(t["irm_gain_undone"].iloc[0])
            out["ablation_random_irm_gain_undone_mean"] = float(
                t.loc[t["kind"] == "random", "irm_gain_undone"].mean()
            )
        if self.patching is not None:
            s = self.patching.summary().set_index("direction")
            out["patch_restored"] = float(s.loc["into_unsteered", "target_effect"])
            out["patch_restored_random_mean"] = float(s.loc["into_unsteered", "random_mean"])
            out["patch_lost"] = float(s.loc["into_steered", "target_effect"])
            out["patch_lost_random_mean"] = float(s.loc["into_steered", "random_mean"])
        if self.norm_scale is not None:
            s = self.norm_scale.summary().set_index("path")
            out["norm_scale_share"] = float(s.loc["norm_scale", "target_share"])
            out["norm_scale_random_share_mean"] = float(s.loc["norm_scale", "random_share_mean"])
            out["norm_scale_random_share_max"] = float(s.loc["norm_scale", "random_share_max"])
            out["norm_scale_finding"] = self.norm_scale.finding()
        return out

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary()]).T.rename(columns={0: "value"})


def explain(
    model: HookedTransformer,
    neuron: int,
    irm: IRM | None = None,
    alignment: str | None = None,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int = 16,
    n_random: int = 8,
    n_texts: int = 16,
    max_new_tokens: int = 16,
    generate: bool = False,
    striation_shuffles: int = 200,
    outputs: IRMOutputs | None = None,
    norm_scale: bool = True,
    progress: bool = True,
) -> NeuronDossier:
    """Run every analysis for ``neuron`` (under ``irm`` and ``alignment`` when given).

    Args:
        model: The host model.
        neuron: The residual index (checked against the model's d_model).
        irm: A trained IRM: adds its outputs, striations, dominant neurons, its logit share,
            patching, and the IRM columns of the ablation.
        alignment: The IRM's alignment (texts for patching and ablation losses).
        prompts: Prompts for outputs, magnitudes and attribution (default: held-out neutral).
        n_random: Random indices in the patching and ablation baselines.
        n_texts: Alignment texts scored by patching and ablation.
        generate: Also measure the ablation's effect on the emotion of steered generations.
        outputs: ``irm``'s outputs when the caller has already collected them (on the same
            prompts), so that the steered generations are not run twice.
        norm_scale: Also split a push on the index (0.1 residual RMS, at the IRM's first
            injected layer, or layer 0) into its direct and norm-scale paths, against
            ``n_random`` random indices: ``1 + 3 * (1 + n_random)`` forward passes over the
            texts the ablation scores.
    """
    neuron = check_neuron(model, neuron)
    prompts = prompts_or_default(prompts, n_prompts)
    striation = dominant = patching = sequences = None
    if irm is None:
        outputs = None
    else:
        if outputs is None:
            outputs = collect_irm_outputs(model, irm, prompts, max_new_tokens=max_new_tokens,
                                          progress=progress)
        if len(irm.config.layers) > 1:
            striation = striation_score(outputs, n_shuffles=striation_shuffles)
        dominant = dominant_neurons(outputs)
        if (outputs.sequences and outputs.chat and outputs.max_new_tokens == max_new_tokens
                and outputs.prompts == tuple(prompts)):
            sequences = outputs.sequences  # the steered continuations attribution reads
        if alignment is not None:
            patching = patch_neuron(model, irm, neuron, alignment=alignment, n_random=n_random,
                                    n_texts=n_texts, progress=progress)
    ablation = measure_ablation(
        model, neuron, irm=irm, alignment=alignment, texts=None if alignment else prompts,
        n_random=n_random, n_texts=n_texts,
        generate=generate and irm is not None and alignment is not None,
        progress=progress,
    )
    split = None
    if norm_scale:
        split = _finite_split(
            model, neuron, texts=None if alignment else prompts, alignment=alignment,
            layer=irm.config.layers[0] if irm is not None else 0, n_random=n_random,
            n_texts=n_texts, progress=progress,
        )
    return NeuronDossier(
        neuron=neuron,
        norms=norm_weights(model),
        magnitudes=activation_magnitudes(model, prompts, progress=progress),
        attribution=logit_attribution(model, neuron, irm, prompts, max_new_tokens=max_new_tokens,
                                      sequences=sequences, progress=progress),
        ablation=ablation,
        outputs=outputs,
        striation=striation,
        dominant=dominant,
        patching=patching,
        provenance=Provenance.of(model, irm, prompts),
        norm_scale=split,
    )


def _finite_split(model: HookedTransformer, neuron: int, **kwargs: Any) -> NormScaleSplit:
    """The norm-scale split at the default push (0.1 RMS), or at a tenth of it, then a
    hundredth, where the held-scale run diverges (as it does for a massive index: 507 of the
    embedded model); the split records the push it used."""
    for delta in (0.1, 0.01):
        try:
            return norm_scale_split(model, neuron, delta=delta, **kwargs)
        except DivergentPush:
            pass
    return norm_scale_split(model, neuron, delta=0.001, **kwargs)

