"""The report's findings: one line per claim, each with its verdict against its baseline, read
off the result objects (nothing is generated or scored here; the head-to-head CI of a steering
claim resamples the comparison's kept samples)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from irm_lens.analysis.ablation import AblationResult
    from irm_lens.analysis.outputs import DominantNeurons, StriationScore
    from irm_lens.analysis.patching import PatchingResult
    from irm_lens.compare import PairedDifference, SteeringComparison

# A permutation-style p below this counts as "beats the random indices".
ALPHA = 0.05


def findings(
    *,
    steering: SteeringComparison | None = None,
    subject: str = "irm",
    subject_scales: Mapping[str, float] | None = None,
    striation: StriationScore | None = None,
    dominant: DominantNeurons | None = None,
    d_model: int | None = None,
    ablation: AblationResult | None = None,
    patching: PatchingResult | None = None,
) -> pd.DataFrame:
    """The findings of whatever results are given: ``claim``, ``finding``, ``verdict``.

    ``subject`` names the intervention in ``steering`` whose lift is the claim (the others are
    its baselines); ``subject_scales`` the scale it is judged at in each decoding, chosen
    beforehand (e.g. ``RecipeResult.decoding_scales()``; default: its best fluent point measured).
    """
    rows: list[dict[str, str]] = []
    if steering is not None and subject in set(steering.table.intervention):
        rows += _steering_rows(steering, subject, subject_scales)
    if striation is not None:
        s = striation
        rows.append(dict(
            claim="stripes (one index, every layer)",
            finding=f"striation score {s.neuron_share:.3f} vs shuffled null {s.null_mean:.3f} "
                    f"± {s.null_std:.3f}, p = {s.p_value:.3g}",
            verdict=_stripes_verdict(s)))
    if dominant is not None:
        top = dominant.table.iloc[0]
        uniform = f", {top['share'] * d_model:.1f}x a uniform share" if d_model else ""
        stable = float(top["top1_frequency"])
        rows.append(dict(
            claim=f"dominant index {int(top['neuron'])}",
            finding=f"{top['share']:.2%} of the IRM's |output|{uniform}; top in {stable:.0%} of "
                    "bootstrap resamples of the prompts",
            verdict="stable top index" if stable >= 0.95 else "top index not stable"))
    if ablation is not None:
        rows.append(_against_random(
            "special under ablation?", ablation.summary().set_index("measure"),
            "irm_gain_undone" if "irm_gain_undone" in set(ablation.table) else "delta_loss",
            "target", len(ablation.table) - 1))
    if patching is not None:
        summary = patching.summary().set_index("direction")
        direction = summary.index[0]
        rows.append(_against_random(f"special under patching ({direction})?", summary,
                                    direction, "target_effect",
                                    int(summary.loc[direction, "n_random"])))
    return pd.DataFrame(rows, columns=["claim", "finding", "verdict"])


def _stripes_verdict(s: StriationScore) -> str:
    if s.p_value >= ALPHA:
        return "no stripes beyond chance"
    ratio = s.neuron_share / s.null_mean if s.null_mean > 0 else float("inf")
    return "striated" if ratio >= 2 else f"barely striated (score {ratio:.1f}x the null)"


def _steering_rows(steering: SteeringComparison, subject: str,
                   scales: Mapping[str, float] | None) -> list[dict[str, str]]:
    """Per decoding: the subject's point at its chosen scale (else its best fluent point, else
    its best point) beside the best aligned point (fluent, CI above zero) of the others, and,
    where the comparison kept its samples, the two head to head, prompt by prompt."""
    table = steering.table
    rows = []
    for decoding, part in table.groupby("decoding", sort=False):
        own = part[part.intervention == subject]
        if scales is not None and decoding in scales:
            chosen = own[np.isclose(own.scale, scales[decoding])]
            own = chosen if len(chosen) else own
        others = part[(part.intervention != subject) & part.fluent & (part.ci_low > 0)]
        mine = own[own.fluent] if own.fluent.any() else own
        best = mine.sort_values("lift", ascending=False).iloc[0]
        finding = (f"x{best.scale:g}: {steering.alignment} {best.lift:+.3f} [{best.ci_low:+.3f}, "
                   f"{best.ci_high:+.3f}], perplexity ratio {best.perplexity_ratio:.1f}")
        if len(others):
            rival = others.sort_values("lift", ascending=False).iloc[0]
            finding += f"; best aligned baseline {rival.intervention} {rival.lift:+.3f}"
            beats = bool(best.fluent) and best.lift >= rival.lift
            against = "at least the best aligned baseline" if beats else "below an aligned baseline"
            paired = _head_to_head(steering, best, rival)
            if paired is not None:
                finding += (f"; head to head {paired.difference:+.3f} [{paired.ci_low:+.3f}, "
                            f"{paired.ci_high:+.3f}]")
                against += f", {_READING[paired.reading]} it head to head"
        else:
            against = "no baseline lifts fluently"
        rows.append(dict(claim=f"steered ({subject}, {decoding})", finding=finding,
                         verdict=f"{best.verdict}; {against}"))
    return rows


_READING = {"above": "above", "level": "level with", "below": "below"}


def _head_to_head(steering: SteeringComparison, subject: pd.Series, rival: pd.Series
                  ) -> PairedDifference | None:
    """The subject's point minus the rival's, paired by prompt (None: no samples kept)."""
    if steering.samples.empty:
        return None
    return steering.head_to_head((subject.intervention, subject.scale),
                                 (rival.intervention, rival.scale), subject.decoding)


def _against_random(claim: str, summary: pd.DataFrame, row: str, column: str,
                    n_random: int) -> dict[str, str]:
    share = float(summary.loc[row, "random_at_least_target"])
    beaten = round((1 - share) * n_random)
    return dict(
        claim=claim,
        finding=f"{row}: target {summary.loc[row, column]:+.4g}, random mean "
                f"{summary.loc[row, 'random_mean']:+.4g}; beats {beaten}/{n_random} random indices",
        verdict="beats every random index" if beaten == n_random and n_random
        else "not special against random indices")
