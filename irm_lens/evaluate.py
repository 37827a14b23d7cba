"""Did the alignment work? Emotion lift with a confidence interval, fluency and degeneration.

An emotion lift obtained through degenerate text (one repeated string, the same output for
every prompt) is a failure, and the verdict says so: every lift is reported beside distinct-n,
repetition, the share of identical outputs and the perplexity of the generations under the
unsteered model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from irm_lens.data.corpora import neutral_prompts
from irm_lens.data.dataset import right_pad
from irm_lens.data.precomputed import cached, content_key
from irm_lens.errors import ConfigError
from irm_lens.generation import Continuation, generate_continuations
from irm_lens.losses import logits_at, predicting, token_mean, token_nll
from irm_lens.scoring import (
    SCORE_COLUMNS,
    distinct_n,
    emotion_scores,
    identical_share,
    repetition_rate,
)
from irm_lens.steering import Intervention


@dataclass(frozen=True)
class DegenerationThresholds:
    """When steered text counts as degenerate, relative to the unsteered model's text.

    Attributes:
        min_distinct2_ratio: steered distinct-2 must be at least this fraction of unsteered.
        max_identical_increase: the share of prompts with an output identical to another
            prompt's may rise by at most this much (absolute).
        max_repetition_increase: the mean within-text repeated-trigram rate may rise by at most
            this much (absolute).
        max_perplexity_ratio: perplexity under the unsteered model may grow by at most this factor.
    """

    min_distinct2_ratio: float = 0.8
    max_identical_increase: float = 0.2
    max_repetition_increase: float = 0.2
    max_perplexity_ratio: float = 4.0


@dataclass
class EvalResult:
    """The evaluation of one IRM.

    Attributes:
        alignment: The target emotion (a nade emotion, or ``"valence"``).
        samples: One row per (prompt, decoding, irm on/off, sample): the text, its scores,
            its perplexity under the unsteered model and its repetition rate.
        summary: One row per (decoding, irm): mean scores and the degeneration measures.
        lift: One row per decoding: mean lift of the target emotion (IRM on minus off, paired
            by prompt), its bootstrap 95% CI, the valence lift, and the degeneration checks.
        degenerate: Whether any decoding failed a degeneration check.
        verdict: One sentence: aligned, aligned-but-degenerate, or no measurable lift.
    """

    alignment: str
    samples: pd.DataFrame
    summary: pd.DataFrame
    lift: pd.DataFrame
    degenerate: bool
    verdict: str

    def side_by_side(self, decoding: str = "greedy") -> pd.DataFrame:
        """Prompt, unsteered text and steered text (first sample), with target scores."""
        rows = self.samples[(self.samples.decoding == decoding) & (self.samples["sample"] == 0)]
        wide = rows.pivot(index="prompt", columns="irm", values=["text", self.alignment])
        wide.columns = [f"{value}_{irm}" for value, irm in wide.columns]
        return wide.reset_index()


def evaluate(
    model: HookedTransformer,
    intervention: Intervention,
    alignment: str,
    prompts: list[str] | None = None,
    *,
    n_prompts: int = 40,
    first_prompt: int = 0,
    max_new_tokens: int = 40,
    n_sampled: int = 1,
    temperature: float = 0.9,
    top_p: float = 0.7,
    scale: float = 1.0,
    seed: int = 0,
    n_bootstrap: int = 2000,
    thresholds: DegenerationThresholds = DegenerationThresholds(),
    batch_size: int = 20,
    progress: bool = True,
) -> EvalResult:
    """Generate on held-out neutral prompts unsteered and steered, and measure the difference.

    Args:
        model: The frozen host model.
        intervention: The trained IRM, or a baseline: a ``SteeringVector`` (CAA, ActAdd) or
            ``Prompting`` (a system persona).
        alignment: The target emotion: one of nade's (``"anger"``, ``"sadness"``, ``"joy"``,
            ...) or ``"valence"``. ``"neutral"`` is scored by valence moving toward 0 and is
            not supported here.
        prompts: Prompts to continue (default: ``n_prompts`` held-out neutral prompts).
        n_prompts: How many built-in neutral prompts when ``prompts`` is None.
        first_prompt: Where in the built-in held-out prompts to start, so that a choice made
            on some prompts (an output scale, say) can be checked on others.
        max_new_tokens: Length of each generation.
        n_sampled: Sampled generations per prompt (temperature / top_p), besides the greedy one.
        scale: Multiplier on the intervention's outputs (ignored by ``Prompting``).
        seed: Seeds sampling and the bootstrap.
        n_bootstrap: Bootstrap resamples for the confidence interval.
        thresholds: What counts as degenerate.

    Returns:
        An ``EvalResult``.
    """
    check_alignment(alignment)
    prompts = eval_prompts(prompts, n_prompts, first_prompt)
    decodings = Decodings(n_sampled, temperature, top_p, seed)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    off = generate_samples(model, None, prompts, decodings, **kwargs)
    on = generate_samples(model, intervention, prompts, decodings, scale=scale, **kwargs)
    return measure(off, on, alignment, n_bootstrap=n_bootstrap, seed=seed, thresholds=thresholds)


def check_alignment(alignment: str) -> None:
    """Refuse an alignment that ``evaluate`` cannot score."""
    if alignment not in SCORE_COLUMNS:
        raise ConfigError(
            f"Cannot measure alignment {alignment!r}: choose one of {list(SCORE_COLUMNS)}."
        )


def eval_prompts(prompts: list[str] | None, n_prompts: int, first_prompt: int) -> list[str]:
    """``prompts``, or ``n_prompts`` built-in held-out prompts from ``first_prompt`` on."""
    if prompts is None:
        if isinstance(first_prompt, bool) or not isinstance(first_prompt, int) or first_prompt < 0:
            raise ConfigError(f"first_prompt must be a non-negative integer, got {first_prompt!r}.")
        prompts = neutral_prompts(first_prompt + n_prompts, split="eval")[first_prompt:]
    elif first_prompt:
        raise ConfigError("first_prompt picks among the built-in prompts; it cannot go with prompts.")
    if not prompts:
        raise ConfigError("evaluate() needs at least one prompt.")
    return list(prompts)


@dataclass(frozen=True)
class Decodings:
    """Greedy decoding (unless ``greedy`` is False) plus ``n_sampled`` seeded samples
    (temperature / top-p) per prompt."""

    n_sampled: int = 1
    temperature: float = 0.9
    top_p: float = 0.7
    seed: int = 0
    greedy: bool = True

    def __len__(self) -> int:
        return int(self.greedy) + self.n_sampled

    def __iter__(self):
        if self.greedy:
            yield "greedy", 0, dict(do_sample=False)
        for k in range(self.n_sampled):
            yield "sampled", k, dict(do_sample=True, temperature=self.temperature,
                                     top_p=self.top_p, seed=self.seed + 7919 * k)


def generate_samples(
    model: HookedTransformer,
    intervention: Intervention | None,
    prompts: list[str],
    decodings: Decodings,
    *,
    scale: float = 1.0,
    max_new_tokens: int = 40,
    batch_size: int = 20,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (prompt, decoding, sample): the text, its perplexity under the unsteered
    model, its repetition rate and its emotion scores; ``irm`` is ``"off"`` without an
    intervention, ``"on"`` with one."""
    rows = []
    for decoding, sample, continuations, perplexities in _scored_continuations(
            model, intervention, prompts, decodings, scale, max_new_tokens, batch_size, progress):
        for c, ppl in zip(continuations, perplexities):
            rows.append(dict(prompt=c.prompt, decoding=decoding, sample=sample,
                             irm="off" if intervention is None else "on", text=c.text,
                             n_tokens=len(c.new_ids), perplexity=ppl,
                             repetition=repetition_rate(c.text)))
    samples = pd.DataFrame(rows)
    return pd.concat([samples, emotion_scores(samples.text.tolist())], axis=1)


def _scored_continuations(model, intervention, prompts, decodings, scale, max_new_tokens,
                          batch_size, progress):
    """Per decoding and sample: its continuations and their perplexities (unsteered model)."""
    for decoding, sample, kwargs in decodings:
        continuations = generate_continuations(
            model, prompts, intervention=intervention, scale=scale,
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, **kwargs,
        )
        yield decoding, sample, continuations, _perplexities(model, continuations, batch_size)


def generated_perplexity(
    model: HookedTransformer,
    intervention: Intervention | None,
    prompts: list[str],
    decodings: Decodings,
    *,
    scale: float = 1.0,
    max_new_tokens: int = 40,
    batch_size: int = 20,
) -> float:
    """The geometric-mean perplexity, under the unsteered model, of what the model writes for
    ``prompts`` steered by ``intervention`` (None: unsteered): the quantity whose steered /
    unsteered ratio is the evaluation's perplexity ratio, without the emotion scoring."""
    logs = [math.log(ppl) for *_, perplexities in _scored_continuations(
                model, intervention, prompts, decodings, scale, max_new_tokens, batch_size, False)
            for ppl in perplexities if math.isfinite(ppl)]
    if not logs:
        raise ConfigError("generated_perplexity: no continuation has a generated token.")
    return math.exp(sum(logs) / len(logs))


def measure(
    off: pd.DataFrame,
    on: pd.DataFrame,
    alignment: str,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    thresholds: DegenerationThresholds = DegenerationThresholds(),
) -> EvalResult:
    """The lift and the degeneration checks of steered samples ``on`` against unsteered ``off``
    (both from ``generate_samples`` on the same prompts and decodings)."""
    samples = pd.concat([off, on], ignore_index=True)
    summary = _summary(samples)
    lift = _lift(samples, summary, alignment, n_bootstrap, seed, thresholds)
    degenerate = bool((~lift.fluent).any())
    return EvalResult(alignment, samples, summary, lift, degenerate, _verdict(lift, alignment))


def _perplexities(model: HookedTransformer, continuations: list[Continuation], batch_size: int
                  ) -> list[float]:
    """Perplexity of each continuation given its prompt, under the unsteered model (read from
    the shipped precomputed results where they hold these token ids)."""
    ids = [torch.tensor(c.prompt_ids + c.new_ids, dtype=torch.int32) for c in continuations]
    scored_from = torch.tensor([len(c.prompt_ids) for c in continuations], dtype=torch.int32)
    key = content_key("perplexities", model, batch_size, scored_from, *ids)
    found = cached(key, lambda: {"perplexity": torch.tensor(
        _computed_perplexities(model, continuations, batch_size), dtype=torch.float64)})
    return found["perplexity"].tolist()


@torch.no_grad()
def _computed_perplexities(model: HookedTransformer, continuations: list[Continuation],
                           batch_size: int) -> list[float]:
    """``_perplexities``, computed (the prompt is read, the continuation scored)."""
    pad = model.tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(continuations), batch_size):
        batch = continuations[start : start + batch_size]
        seqs = [list(c.prompt_ids) + list(c.new_ids) for c in batch]
        # Generated tokens only are scored: the prompt is not.
        ids, _, mask = right_pad(seqs, pad, scored_from=[len(c.prompt_ids) for c in batch])
        ids, mask = ids.to(model.cfg.device), mask.to(model.cfg.device)
        # The first generated token is predicted from the prompt's last position.
        nll, weight = token_nll(logits_at(model, ids, predicting(mask)), ids, mask)
        for i in range(len(seqs)):
            if mask[i].sum() < 1:
                out.append(math.nan)
                continue
            out.append(math.exp(token_mean(nll[i : i + 1], weight[i : i + 1]).item()))
    return out


def _summary(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (decoding, irm_state), group in samples.groupby(["decoding", "irm"], sort=False):
        texts = group.text.tolist()
        row = dict(decoding=decoding, irm=irm_state, n=len(group))
        row.update({c: group[c].mean() for c in SCORE_COLUMNS})
        row.update(
            distinct1=distinct_n(texts, 1),
            distinct2=distinct_n(texts, 2),
            repetition=group.repetition.mean(),
            identical_share=float(np.mean([identical_share(g.text.tolist())
                                           for _, g in group.groupby("sample")])),
            perplexity=float(np.exp(np.log(group.perplexity.dropna()).mean())),
            mean_tokens=group.n_tokens.mean(),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _lift(samples, summary, alignment, n_bootstrap, seed, thresholds) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for decoding, group in samples.groupby("decoding", sort=False):
        per_prompt = group.pivot_table(index="prompt", columns="irm", values=[alignment, "valence"],
                                       aggfunc="mean")
        diff = (per_prompt[(alignment, "on")] - per_prompt[(alignment, "off")]).to_numpy()
        ci_low, ci_high = bootstrap_ci(diff, n_bootstrap, rng)
        off = summary[(summary.decoding == decoding) & (summary.irm == "off")].iloc[0]
        on = summary[(summary.decoding == decoding) & (summary.irm == "on")].iloc[0]
        checks = dict(
            distinct2_ratio=on.distinct2 / off.distinct2 if off.distinct2 else math.nan,
            identical_increase=on.identical_share - off.identical_share,
            repetition_increase=on.repetition - off.repetition,
            perplexity_ratio=on.perplexity / off.perplexity,
        )
        fluent = (
            checks["distinct2_ratio"] >= thresholds.min_distinct2_ratio
            and checks["identical_increase"] <= thresholds.max_identical_increase
            and checks["repetition_increase"] <= thresholds.max_repetition_increase
            and checks["perplexity_ratio"] <= thresholds.max_perplexity_ratio
        )
        rows.append(dict(
            decoding=decoding, target=alignment, off=off[alignment], on=on[alignment],
            lift=float(diff.mean()), ci_low=ci_low, ci_high=ci_high,
            valence_lift=float((per_prompt[("valence", "on")] - per_prompt[("valence", "off")]).mean()),
            **checks, fluent=bool(fluent),
        ))
    return pd.DataFrame(rows)


def bootstrap_ci(per_prompt: np.ndarray, n_bootstrap: int, rng: np.random.Generator
                 ) -> tuple[float, float]:
    """The 95% bootstrap CI (percentiles) of the mean of ``per_prompt``, resampling prompts."""
    boots = rng.choice(per_prompt, size=(n_bootstrap, len(per_prompt)), replace=True).mean(axis=1)
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def _verdict(lift: pd.DataFrame, alignment: str) -> str:
    parts = []
    for row in lift.itertuples():
        ci = f"lift {row.lift:+.3f} [95% CI {row.ci_low:+.3f}, {row.ci_high:+.3f}]"
        if row.ci_low > 0 and row.fluent:
            status = "aligned"
        elif row.ci_low > 0:
            status = "FAILED: the lift comes with degenerate text"
        else:
            status = "no measurable lift"
        parts.append(f"{row.decoding}: {alignment} {ci}, {status}")
    return "; ".join(parts)
