"""Every intervention on the same prompts, decodings and seeds: one table, and dose-response.

``compare_steering`` generates the unsteered continuations once, then each intervention's at
each of its scales, and measures every (intervention, scale) against the same unsteered texts
with ``evaluate``'s lift, CI and degeneration checks. Swept over scales, each method traces a
dose-response curve (lift against perplexity ratio) whose fluent end is the most it can lift
while its text stays text: ``SteeringComparison.best_fluent`` reads it off. Two points measured
on the same prompts are compared head to head, prompt by prompt (``paired_difference``): is one
lift larger than the other by more than the prompts' spread allows?
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.errors import ConfigError
from irm_lens.evaluate import (
    Decodings,
    DegenerationThresholds,
    bootstrap_ci,
    check_alignment,
    eval_prompts,
    generate_samples,
    measure,
)
from irm_lens.steering import Intervention, Prompting

TABLE_COLUMNS = ("intervention", "scale", "decoding", "off", "on", "lift", "ci_low", "ci_high",
                 "distinct2_ratio", "identical_increase", "repetition_increase",
                 "perplexity_ratio", "fluent", "verdict")
DECODINGS = ("greedy", "sampled")


@dataclass(frozen=True)
class PairedDifference:
    """One intervention's lift minus another's on the same prompts, paired by prompt.

    Both lifts are measured against the same unsteered texts, so their difference is that of
    the steered texts' scores, prompt by prompt (each prompt's mean over its samples); the CI
    is a bootstrap over prompts, as ``evaluate``'s.

    Attributes:
        alignment / decoding: What was scored, in which decoding.
        difference: Mean over prompts of the first's score minus the second's.
        ci_low / ci_high: Its 95% bootstrap CI.
        n_prompts: The prompts paired.
    """

    alignment: str
    decoding: str
    difference: float
    ci_low: float
    ci_high: float
    n_prompts: int

    @property
    def reading(self) -> str:
        """``"above"`` or ``"below"`` where the CI excludes zero, else ``"level"``."""
        if self.ci_low > 0:
            return "above"
        return "below" if self.ci_high < 0 else "level"


def paired_difference(first: pd.DataFrame, second: pd.DataFrame, alignment: str, *,
                      n_bootstrap: int = 2000, seed: int = 0) -> PairedDifference:
    """``first``'s lift minus ``second``'s, from their steered samples (``generate_samples``
    rows of one decoding, on the same prompts with the same sample numbers, hence the same
    sampling seeds), with a bootstrap CI over prompts.

    Example:
        >>> s = comparison.samples[comparison.samples.decoding == "sampled"]  # doctest: +SKIP
        >>> irm, caa = s[s.intervention == "irm"], s[s.intervention == "caa"]  # doctest: +SKIP
        >>> paired_difference(irm, caa, "anger").reading  # doctest: +SKIP
    """
    check_alignment(alignment)
    decodings = set(first.decoding) | set(second.decoding)
    if len(decodings) != 1:
        raise ConfigError(f"paired_difference compares samples of one decoding; got "
                          f"{sorted(decodings)}.")
    keys = [set(zip(frame.prompt, frame["sample"])) for frame in (first, second)]
    if keys[0] != keys[1] or len(keys[0]) != len(first) or len(keys[1]) != len(second):
        raise ConfigError("paired_difference needs both interventions' samples of the same "
                          "prompts and sample numbers, once each (measure them on one prompt "
                          "set, e.g. with compare_steering).")
    scores = [frame.groupby("prompt", sort=False)[alignment].mean() for frame in (first, second)]
    diff = (scores[0] - scores[1].loc[scores[0].index]).to_numpy()  # [prompt]
    low, high = bootstrap_ci(diff, n_bootstrap, np.random.default_rng(seed))
    return PairedDifference(alignment, decodings.pop(), float(diff.mean()), low, high, len(diff))


@dataclass
class SteeringComparison:
    """Interventions measured side by side.

    Attributes:
        alignment: The target emotion.
        table: One row per (intervention, scale, decoding): the lift with its 95% CI, the
            degeneration checks, ``fluent`` and a one-word verdict (aligned / degenerate /
            no lift).
        samples: Every generation (``intervention`` and ``scale`` columns; the unsteered
            texts once, as intervention ``"unsteered"``).
        prompts: The prompts, in order.
        thresholds: What counted as degenerate.
    """

    alignment: str
    table: pd.DataFrame
    samples: pd.DataFrame
    prompts: tuple[str, ...]
    thresholds: DegenerationThresholds

    def best_fluent(self) -> pd.DataFrame:
        """Per intervention and decoding, the fluent row with the largest lift (none: absent)."""
        fluent = self.table[self.table.fluent]
        best = fluent.loc[fluent.groupby(["intervention", "decoding"], sort=False).lift.idxmax()]
        return best.reset_index(drop=True)

    def head_to_head(self, first: tuple[str, float], second: tuple[str, float],
                     decoding: str) -> PairedDifference:
        """The lift of ``first`` (an intervention and its scale) minus that of ``second`` in
        ``decoding``, paired by prompt (``paired_difference``)."""
        def point(name: str, scale: float) -> pd.DataFrame:
            s = self.samples
            rows = s[(s.intervention == name) & (s.scale == scale) & (s.decoding == decoding)]
            if rows.empty:
                raise ConfigError(f"No {decoding} samples of {name!r} at scale {scale}.")
            return rows

        return paired_difference(point(*first), point(*second), self.alignment)

    def side_by_side(self, intervention: str, scale: float, decoding: str = "greedy") -> pd.DataFrame:
        """Prompt, unsteered text and this intervention's text at ``scale`` (first sample)."""
        def texts(frame: pd.DataFrame) -> pd.Series:
            rows = frame[(frame.decoding == decoding) & (frame["sample"] == 0)]
            return rows.set_index("prompt").text

        s = self.samples
        steered = s[(s.intervention == intervention) & (s.scale == scale)
                    & (s.decoding == decoding)]
        if steered.empty:
            raise ConfigError(f"No {decoding} samples of {intervention!r} at scale {scale}.")
        return pd.DataFrame({"unsteered": texts(s[s.intervention == "unsteered"]),
                             intervention: texts(steered)}).reset_index()


def compare_steering(
    model: HookedTransformer,
    interventions: Mapping[str, Intervention],
    alignment: str,
    *,
    scales: Mapping[str, Sequence[float] | Mapping[str, float]] | Sequence[float] = (1.0,),
    prompts: list[str] | None = None,
    n_prompts: int = 40,
    first_prompt: int = 0,
    max_new_tokens: int = 40,
    n_sampled: int = 1,
    temperature: float = 0.9,
    top_p: float = 0.7,
    seed: int = 0,
    n_bootstrap: int = 2000,
    thresholds: DegenerationThresholds = DegenerationThresholds(),
    batch_size: int = 40,
    unsteered: pd.DataFrame | None = None,
    decodings: Sequence[str] = DECODINGS,
    progress: bool = True,
) -> SteeringComparison:
    """Measure every intervention at every scale on the same prompts against one unsteered run.

    Args:
        model: The frozen host model.
        interventions: Name -> an IRM, a ``SteeringVector`` or ``Prompting``.
        alignment: The target emotion (as ``evaluate``).
        scales: The scales of every intervention, or a mapping from name to its own scales
            (a dose-response curve each) or to a scale per decoding (``{"greedy": 1.0,
            "sampled": 1.15}``: each decoding measured at its own dose only). ``Prompting``
            has no scale: it is measured once.
        prompts / n_prompts / first_prompt: The prompts (as ``evaluate``).
        max_new_tokens, n_sampled, temperature, top_p, seed: The decodings (as ``evaluate``),
            identical for every intervention.
        n_bootstrap, thresholds: The CI and the degeneration checks (as ``evaluate``).
        unsteered: The unsteered samples of an earlier comparison with the same prompts and
            decodings (its ``samples`` where ``intervention == "unsteered"``), to measure more
            interventions against them without generating them again.
        decodings: Which of ``"greedy"`` and ``"sampled"`` to measure (default: both), e.g.
            an intervention at a scale chosen for one decoding only.

    Returns:
        A ``SteeringComparison``.

    Example:
        >>> caa = irm_lens.mean_difference_vector(model, "anger", layers=12)  # doctest: +SKIP
        >>> result = irm_lens.compare_steering(model, {"caa": caa, "irm": irm}, "anger",
        ...                                    scales={"caa": [2, 4, 8], "irm": [0.5, 1]})  # doctest: +SKIP
        >>> result.best_fluent()  # doctest: +SKIP
    """
    check_alignment(alignment)
    if not interventions:
        raise ConfigError("compare_steering needs at least one intervention.")
    if "unsteered" in interventions:
        raise ConfigError("'unsteered' names the unsteered run; call the intervention otherwise.")
    prompts = eval_prompts(prompts, n_prompts, first_prompt)
    decodings = _decodings(decodings, n_sampled, temperature, top_p, seed)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if unsteered is None:
        off = generate_samples(model, None, prompts, decodings, **kwargs)
    else:
        off = unsteered.drop(columns=["intervention", "scale"], errors="ignore")
        off = off[off.decoding.isin([name for name, _, _ in decodings])].reset_index(drop=True)
        if list(dict.fromkeys(off.prompt)) != prompts or len(off) != len(prompts) * len(decodings):
            raise ConfigError("The unsteered samples given are not of these prompts and decodings.")
    points = [(name, scale, at) for name, intervention in interventions.items()
              for scale, at in _points(name, intervention, scales, decodings)]
    rows, samples = [], [off.assign(intervention="unsteered", scale=0.0)]
    bar = progress_bar(points, desc="interventions", unit="point", disable=not progress)
    for name, scale, at in bar:
        on = generate_samples(model, interventions[name], prompts, at, scale=scale, **kwargs)
        result = measure(off[off.decoding.isin(set(on.decoding))], on, alignment,
                         n_bootstrap=n_bootstrap, seed=seed, thresholds=thresholds)
        for row in result.lift.to_dict("records"):
            rows.append({**row, "intervention": name, "scale": scale, "verdict": _word(row)})
        samples.append(on.assign(intervention=name, scale=scale))
    table = pd.DataFrame(rows)[list(TABLE_COLUMNS)]
    return SteeringComparison(alignment, table, pd.concat(samples, ignore_index=True),
                              tuple(prompts), thresholds)


def _decodings(names: Sequence[str], n_sampled: int, temperature: float, top_p: float,
               seed: int) -> Decodings:
    unknown = set(names) - set(DECODINGS)
    if unknown or not names:
        raise ConfigError(f"decodings must be some of {DECODINGS}, got {tuple(names)!r}.")
    return Decodings(n_sampled if "sampled" in names else 0, temperature, top_p, seed,
                     greedy="greedy" in names)


def _points(name: str, intervention: Intervention, scales, decodings: Decodings
            ) -> list[tuple[float, Decodings]]:
    """The scales ``intervention`` is measured at, each with the decodings measured there."""
    if isinstance(intervention, Prompting):
        return [(1.0, decodings)]
    chosen = scales.get(name, (1.0,)) if isinstance(scales, Mapping) else scales
    values = list(chosen.values()) if isinstance(chosen, Mapping) else list(chosen)
    if not values or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in values):
        raise ConfigError(f"The scales of {name!r} must be finite numbers, got {chosen!r}.")
    if not isinstance(chosen, Mapping):
        return [(float(s), decodings) for s in values]
    measured = {d for d, _, _ in decodings}
    if not set(chosen) <= measured:  # a scale per decoding
        raise ConfigError(f"The scales of {name!r} name decodings {sorted(chosen)}; this "
                          f"comparison measures {sorted(measured)}.")
    return [(float(s), replace(decodings, greedy=decodings.greedy and chosen.get("greedy") == s,
                               n_sampled=decodings.n_sampled if chosen.get("sampled") == s else 0))
            for s in dict.fromkeys(values)]


def _word(row: dict) -> str:
    if row["ci_low"] > 0:
        return "aligned" if row["fluent"] else "degenerate"
    return "no lift"
