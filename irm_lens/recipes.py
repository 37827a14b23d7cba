"""Training recipes: everything that makes an IRM steer, in one named bundle.

* ``"preference"`` (the default of ``irm-lens train --recipe`` and of the main job): a
  mean-difference (CAA) vector of the alignment's built-in texts warm-starts the IRM's output
  bias, so the untrained IRM already is that vector; it is then trained with the preference
  objective on pairs of the same training question answered by the model steered by that vector
  (the chosen, tone-carrying reply) and unsteered (the rejected one), with the fluency KL term
  and no cross-entropy on the chosen replies (it narrowed the phrasing); the trained IRM is
  dosed per decoding: for greedy decoding, to move the model by a KL of 0.415 nats per token
  on the pairs' unsteered replies; for sampled decoding (which tolerates a stronger push), to
  make its sampled replies to 40 tuning questions 3.2 times as perplexing to the unsteered
  model as the unsteered replies (``RecipeResult.doses``). For anger's seed 0 that is 0.75 and
  0.86; weaker seeds get more. Sadness and joy have targets of their own, set the same way,
  and their sampled dose is also held where its replies keep 80% of the unsteered replies'
  distinct-2 (``Recipe.alignment_targets``); sadness keeps the chosen replies' cross-entropy
  at weight 0.3, joy has a warm start at CAA x3 and an entropy term, and anger stops at 45 of
  the 60 steps, by which its validation loss had been lowest on each of three seeds
  (``Recipe.alignment_settings``).
  The pairs are generated once (``generate_pairs``, at the first of ``pairs_scales`` at which
  enough of the vector's replies stay fluent to keep a pair) and reused; the
  embedded model's ``anger``, ``sadness`` and ``joy`` pairs ship with the package
  (``irm_lens/data/pairs/``).
* ``"paper"``: the paper's objective, cross-entropy on the built-in alignment texts, from a
  zero-initialised IRM (the main job before the preference recipe).

The measurements behind the choice are in docs/training.md ("The steering study",
"Diversity", "Sadness and joy: pairs at a fluent scale, doses of their own", and "A sampled
dose bounded by diversity").
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.data.corpora import neutral_prompts
from irm_lens.data.dataset import PreferencePair, TokenizedTexts, tokenize_texts
from irm_lens.errors import ConfigError
from irm_lens.evaluate import Decodings, generated_perplexity
from irm_lens.generation import generate_continuations
from irm_lens.inject import inject
from irm_lens.irm import IRM
from irm_lens.losses import logits_at
from irm_lens.models import EMBEDDED_MODEL_NAME
from irm_lens.objectives import mean_kl
from irm_lens.pairs import generate_pairs, kept_share, read_pairs
from irm_lens.scoring import distinct_n
from irm_lens.steering import SteeringVector, mean_difference_vector, warm_start
from irm_lens.train import TrainConfig, TrainResult, train

SHIPPED_PAIRS = Path(__file__).parent / "data" / "pairs"
# The tuning questions: training-split questions from this one on, which no shipped pair asks
# (the anger pairs asked 0-939) and no held-out evaluation set holds.
FIRST_TUNING_QUESTION = 940
# The calibration's version, kept in a run's doses.json: doses found by an earlier rule are
# found again (2: the perplexity fit extends its span toward the target).
DOSE_RULE = 2
# How the sampled dose's perplexity ratio is measured on the tuning questions: one seeded
# sample of 32 new tokens per question (``dose_for_perplexity``'s defaults; ``targets_at``).
TUNING_DECODINGS = Decodings(n_sampled=1, greedy=False)
TUNING_NEW_TOKENS = 32
# The diversity bound's tuning questions: as many as an evaluation set has, since distinct-2
# pooled over the replies falls as they grow in number (on the embedded model, steered /
# unsteered ratios of 0.79-0.80 on 160 sampled replies read 0.89-0.96 on their first 40).
DIVERSITY_PROMPTS = 160
# The multiples of the sampled KL dose at which ``dose_for_perplexity`` measures the perplexity
# ratio by default (one generation of the tuning questions each).
DOSE_GRID = (0.8, 0.9, 1.0, 1.1, 1.2)


@dataclass(frozen=True)
class Recipe:
    """A training recipe (see the module docstring).

    Attributes:
        objective: ``TrainConfig.objective``.
        layers / preset: The IRM (``IRM.for_model``), always zero-initialised.
        vector_depth / vector_scale: The CAA vector of the warm start, at the layer this far
            through the model (0.4: layer 12 of SmolLM2's 30, 13 of Llama 2's 32; None: no
            warm start), and its scale.
        pairs_scales / pairs_sampled: The vector's scales for writing the chosen replies of
            the pairs, tried in turn, and its sampled candidates per question. The first scale
            at which at least ``pairs_min_kept`` of the questions keep a pair is used: a vector
            strong enough to carry the tone, not so strong that its replies loop (the embedded
            model kept a pair for 40-49% of its questions at anger x4 and 16% at x5; sadness
            x4 kept 8%, x3 49%).
        pairs_min_kept: That share.
        degenerate_pairs: Also train on (question, chosen, degenerate steered reply) pairs.
        pairs_phrase_share: Train only on pairs whose chosen replies use no phrase (word
            4-gram) in more than this share of them (``irm_lens.pairs.cap_phrases``; None: all).
        dose: The trained IRM's ``output_scale``: below 1 it trades lift for diversity (chosen
            on training questions no pair asked, ``scripts/dose_tuning.py``). The IRM the
            recipe returns, and saves as the run's ``irm.safetensors``, carries it.
        sampled_dose: The dose for sampled decoding where it differs from ``dose`` (None: the
            same). Greedy decoding repeats the steered phrases first, sampling tolerates a
            stronger push; each decoding's dose is chosen on the tuning questions, as CAA's
            scale is per decoding in every comparison.
        dose_kl / sampled_dose_kl: When set, each trained IRM's dose for that decoding is
            calibrated instead of fixed: the output scale at which it moves the model's
            next-token distributions by this mean KL (nats) on the calibration texts
            (``calibration_texts``: the first pairs' unsteered replies). Seeds of one recipe
            differ in strength; a fixed dose under-steers the weak ones.
        sampled_dose_perplexity: When set, the sampled dose is calibrated instead to the
            perplexity its sampled replies to ``tuning_prompts`` tuning questions cost: this
            ratio of their perplexity (under the unsteered model) to the unsteered replies'
            (``dose_for_perplexity``, fitted around the ``sampled_dose_kl`` dose). At one KL a
            weak seed spends less fluency, and gets less lift, than a strong one.
        tuning_prompts: How many tuning questions (``tuning_prompts()``) that calibration uses.
        dose_grid: The multiples of the ``sampled_dose_kl`` dose at which that calibration
            measures the ratio (``dose_for_perplexity``'s ``grid``): one generation of the
            tuning questions each.
        sampled_dose_distinct2: When set, the sampled dose (fixed or calibrated) is then
            lowered, a step at a time, until the sampled replies to ``diversity_prompts`` tuning
            questions keep this share of the unsteered replies' distinct-2
            (``dose_within_distinct2``): the perplexity ratio does not see one phrase repeated
            across replies, which is where a strong seed's sampled replies fail first.
        diversity_prompts: How many tuning questions that bound uses (``DIVERSITY_PROMPTS``).
        alignment_targets: Per alignment, calibration targets that replace the four above
            (``dose_kl``, ``sampled_dose_kl``, ``sampled_dose_perplexity``,
            ``sampled_dose_distinct2``): each set from one seed whose doses were chosen on the
            tuning questions (``targets_at``). Alignments not named use the recipe's own, chosen
            for anger.
        alignment_settings: Per alignment, ``with_settings`` strings applied before its
            targets: the training one alignment's measurements chose for it.
        train: The optimisation settings (``max_steps`` is the recipe's length).
    """

    objective: str
    layers: str = "all"
    preset: str = "small"
    vector_depth: float | None = 0.4
    vector_scale: float = 4.0
    pairs_scales: tuple[float, ...] = (4.0, 3.0, 2.0)
    pairs_min_kept: float = 0.3
    pairs_sampled: int = 3
    degenerate_pairs: bool = True
    pairs_phrase_share: float | None = None
    dose: float = 1.0
    sampled_dose: float | None = None
    dose_kl: float | None = None
    sampled_dose_kl: float | None = None
    sampled_dose_perplexity: float | None = None
    tuning_prompts: int = 40
    dose_grid: tuple[float, ...] = DOSE_GRID
    sampled_dose_distinct2: float | None = None
    diversity_prompts: int = DIVERSITY_PROMPTS
    alignment_targets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    alignment_settings: Mapping[str, Sequence[str]] = field(default_factory=dict)
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if not self.pairs_scales or any(scale <= 0 for scale in self.pairs_scales):
            raise ConfigError(f"Recipe.pairs_scales must name at least one positive scale to "
                              f"write the pairs at; got {self.pairs_scales!r}.")

    def for_alignment(self, alignment: str) -> Recipe:
        """This recipe with ``alignment``'s own settings and calibration targets, where it has
        them."""
        recipe = self.with_settings(self.alignment_settings.get(alignment, ()))
        return replace(recipe, **self.alignment_targets.get(alignment, {}))

    def with_settings(self, settings: Sequence[str]) -> Recipe:
        """This recipe with each ``"field=value"`` (``"train.field=value"`` for its
        ``TrainConfig``) set, values as Python literals: the variants of ``scripts/recipe_trial.py``
        (``["train.entropy=0.1", "pairs_phrase_share=0.1"]``)."""
        recipe = self
        for setting in settings:
            key, sep, text = setting.partition("=")
            target, name = (recipe.train, key[6:]) if key.startswith("train.") else (recipe, key)
            if not sep or name not in {f.name for f in fields(target)}:
                raise ConfigError(f"Recipe setting {setting!r}: expected field=value with a field "
                                  f"of {type(target).__name__}.")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(f"Recipe setting {setting!r}: the value is not a Python literal "
                                  f"(strings need quotes).") from exc
            changed = replace(target, **{name: value})
            recipe = replace(recipe, train=changed) if target is recipe.train else changed
        return recipe

    def doses(self) -> dict[str, float]:
        """The fixed dose of each decoding."""
        return {"greedy": self.dose,
                "sampled": self.dose if self.sampled_dose is None else self.sampled_dose}

    def dose_kls(self) -> dict[str, float] | None:
        """The calibration's target KL of each decoding (None: fixed doses)."""
        if self.dose_kl is None:
            return None
        return {"greedy": self.dose_kl,
                "sampled": self.dose_kl if self.sampled_dose_kl is None else self.sampled_dose_kl}

    def dose_targets(self) -> dict[str, float | list[float]] | None:
        """Every calibration target (the KLs, the sampled perplexity ratio with the grid and
        the number of tuning questions it is fitted on, and the distinct-2 bound with its
        number of questions, where set; None: fixed doses): what a run's doses.json must match
        to be reused."""
        targets = self.dose_kls()
        if targets is not None and self.sampled_dose_perplexity is not None:
            targets["sampled_perplexity_ratio"] = self.sampled_dose_perplexity
            targets["sampled_perplexity_grid"] = list(self.dose_grid)
            targets["sampled_perplexity_prompts"] = self.tuning_prompts
        if self.sampled_dose_distinct2 is not None:
            targets = (targets or {}) | {"sampled_distinct2_ratio": self.sampled_dose_distinct2,
                                         "sampled_distinct2_prompts": self.diversity_prompts}
        return targets


@dataclass
class RecipeResult(TrainResult):
    """A recipe's training run and the dose of each decoding.

    Attributes (besides ``TrainResult``'s; ``irm`` carries the greedy dose):
        doses: The output scale at which each decoding is steered.
        kl: Where the recipe calibrates its doses by KL, the KL (nats) each such dose moves
            the model by on the calibration texts; else empty.
        perplexity_ratio: Where it calibrates the sampled dose by perplexity, the ratio fitted
            at that dose on the tuning questions (``{"sampled": ...}``); else empty.
        distinct2_ratio: Where it bounds the sampled dose by diversity, the distinct-2 ratio
            measured at that dose on the tuning questions (``{"sampled": ...}``); else empty.
    """

    doses: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    perplexity_ratio: dict[str, float] = field(default_factory=dict)
    distinct2_ratio: dict[str, float] = field(default_factory=dict)

    def decoding_scales(self) -> dict[str, float]:
        """Each decoding's dose as a scale of ``irm`` (1 for greedy)."""
        return {name: dose / self.doses["greedy"] for name, dose in self.doses.items()}


RECIPES: dict[str, Recipe] = {
    "preference": Recipe(
        objective="preference",
        # seed 0's KL at the doses chosen for it on the tuning questions (0.75 greedy, 0.9
        # sampled; docs/training.md, "A dose per decoding" and "One KL per decoding"); the
        # sampled KL only centres the perplexity fit. Its target, 3.2, is the degeneration
        # line (4.0) over 1.25, about the most a ratio fitted on the tuning questions grew on
        # held-out prompts (3.47, seed 0's ratio at 0.9, came out at 3.2-4.3 there: "One
        # perplexity, with a margin")
        dose_kl=0.415,
        sampled_dose_kl=0.62,
        sampled_dose_perplexity=3.2,
        # sadness and joy: seed 0's KLs at the largest doses whose replies to the 160 tuning
        # questions passed every check, per decoding (docs/training.md, "Sadness and joy: doses
        # of their own"; scripts/dose_tuning.py --targets-at), and a sampled dose bounded by
        # distinct-2 on those questions (evaluate's line, 0.8; "A sampled dose bounded by
        # diversity"): their sampled replies fail that line first
        alignment_targets={
            # sadness: its perplexity target (2.61) as before, seed 0's
            "sadness": dict(dose_kl=0.737, sampled_dose_kl=0.737, sampled_dose_perplexity=2.61,
                            sampled_dose_distinct2=0.8),
            # joy: its own training's KLs ("A sixth trial"); with the bound, the recipe's
            # perplexity target (3.2) in place of the 2.31 that under-dosed seed 0
            "joy": dict(dose_kl=0.573, sampled_dose_kl=0.724, sampled_dose_perplexity=3.2,
                        sampled_dose_distinct2=0.8),
        },
        # anger: 45 steps; its three seeds' validation loss was lowest at steps 45, 30 and 45 of 60,
        # so the IRM kept came from there, and with a constant rate these are the same IRMs ("Anger
        # stops at 45 steps"); at 30, seeds 0 and 2 met the bar in 3 of their 6 sampled cells on
        # sets 0-2 ("Anger at 30 steps: tried, not adopted"), and a sampled dose fitted on 20 tuning
        # questions instead of 40 in 8 of 9 ("Anger's sampled dose on 20 tuning questions").
        # sadness: the chosen replies' cross-entropy at 0.3, which spends its perplexity on sadness
        # rather than on leaving the unsteered reply (12 of 12 cells on sets 0-2, the earlier
        # setting 9). joy: the warm start at CAA x3 and the entropy term, which together lifted
        # joy's sampled replies without their repeating one phrase ("A sixth trial"). Both keep 60
        # steps: their validation loss still fell at 60. anger's sampled dose is also fitted on
        # three of the five scales: two generations fewer, the doses within 1.8% of the five-point
        # fit, far inside the ~10% the tuning seed moves them by, and every anger cell measured
        # again at them ("Three points for anger's sampled dose"). Sadness and joy keep five:
        # measured at three, their seed 1's doses (bounded by distinct-2) moved by -3.8% and +8.2%,
        # and each lost sampled cells ("Three points for sadness's and joy's sampled doses: tried,
        # not adopted")
        alignment_settings={"anger": ("train.max_steps=45", "dose_grid=(0.8, 1.0, 1.2)"),
                            "sadness": ("train.chosen_lm=0.3",),
                            "joy": ("vector_scale=3.0", "train.entropy=0.1")},
        train=TrainConfig(objective="preference", lr=1e-4, lr_gamma=1.0, beta=0.1, chosen_lm=0.0,
                          kl=0.1, max_steps=60, max_length=96, batch_size=4, eval_every=15,
                          max_val_batches=4, checkpoint_every=15),
    ),
    "paper": Recipe(
        objective="lm", vector_depth=None,
        train=TrainConfig(lr=1e-3, max_steps=100, max_length=64, batch_size=8, eval_every=50,
                          max_val_batches=4),
    ),
}


@torch.no_grad()
def dose_for_kl(
    model: HookedTransformer, irm: IRM, texts: TokenizedTexts, targets: Mapping[str, float], *,
    bounds: tuple[float, float] = (0.05, 4.0), rtol: float = 0.005, max_steps: int = 12,
    progress: bool = False,
) -> dict[str, tuple[float, float]]:
    """For each named target, the output scale at which ``irm`` moves the model's next-token
    distributions on ``texts`` by a mean KL(unsteered || steered) of that many nats, and the
    KL measured there.

    The KL rises with the scale, close to a power of it, so false position on (log scale,
    log KL) within ``bounds`` finds it in a few passes (to a KL within ``rtol`` of the
    target, or the nearer end after ``max_steps``); a target outside the bounds' KLs gives
    the nearer bound. The unsteered pass and every measured scale are shared by the targets.
    ``progress``: progress lines (the passes so far, then the doses found).
    """
    for name, target in targets.items():
        if not target > 0:
            raise ConfigError(f"The target KL of {name!r} must be positive, got {target!r}.")
    kl_at, measured = _kl_meter(model, irm, texts)
    found = {}
    with progress_bar(desc="dose (KL)", unit="pass", disable=not progress) as bar:

        def log_kl(log_scale: float) -> float:
            kl = kl_at(math.exp(log_scale))
            bar.update(len(measured) - bar.n)  # scales measured so far (each once)
            return math.log(max(kl, 1e-30))

        for name, target in targets.items():
            log_scale = _false_position(log_kl, math.log(target), math.log(bounds[0]),
                                        math.log(bounds[1]), math.log1p(rtol), max_steps)
            found[name] = (math.exp(log_scale), measured[math.exp(log_scale)])
            bar.set_postfix(**{n: f"x{s:.3f} (KL {kl:.3f})" for n, (s, kl) in found.items()})
    for name, target in targets.items():
        if not math.isclose(found[name][1], target, rel_tol=rtol * 4):
            warnings.warn(f"dose_for_kl: the {name!r} target KL {target:g} is out of reach "
                          f"within scales {bounds}; using scale {found[name][0]:.3g} (KL "
                          f"{found[name][1]:.3g}).", stacklevel=2)
    return found


def _kl_meter(model: HookedTransformer, irm: IRM, texts: TokenizedTexts):
    """A function of the output scale: the mean KL(unsteered || steered) it moves the model
    by on ``texts`` (the unsteered pass computed once), and the dict of scales it measured."""
    device = model.cfg.device
    ids, mask = texts.input_ids.to(device), texts.attention_mask.to(device)
    real = mask.bool()
    ref = logits_at(model, ids, real).float().log_softmax(-1)  # [n_real, d_vocab]
    measured: dict[float, float] = {}

    def kl_at(scale: float) -> float:
        if scale not in measured:
            with inject(model, irm.with_output_scale(scale)):
                steered = logits_at(model, ids, real).float().log_softmax(-1)
                measured[scale] = mean_kl(ref, steered, mask).item()
        return measured[scale]

    return kl_at, measured


@torch.no_grad()
def targets_at(model: HookedTransformer, irm: IRM, pairs: list[PreferencePair],
               doses: Mapping[str, float], recipe: Recipe) -> dict[str, float]:
    """The calibration targets at which ``recipe`` would give ``irm`` these ``doses``: the KL
    the greedy and sampled doses move the model by on the calibration texts, and the sampled
    replies' perplexity ratio on the tuning questions. A recipe's targets are set this way
    from one seed whose doses were chosen on the tuning questions (``Recipe.alignment_targets``).
    """
    kl_at, _ = _kl_meter(model, irm, calibration_texts(model, pairs))
    ratio_at = _perplexity_meter(model, irm, tuning_prompts(recipe.tuning_prompts),
                                 TUNING_DECODINGS, TUNING_NEW_TOKENS)
    return dict(dose_kl=kl_at(doses["greedy"]), sampled_dose_kl=kl_at(doses["sampled"]),
                sampled_dose_perplexity=ratio_at(doses["sampled"]))


def _perplexity_meter(model: HookedTransformer, irm: IRM, prompts: list[str],
                      decodings: Decodings, max_new_tokens: int):
    """A function of the output scale: the perplexity ratio (steered / unsteered, under the
    unsteered model) of the replies to ``prompts`` (the unsteered replies generated once)."""
    off = generated_perplexity(model, None, prompts, decodings, max_new_tokens=max_new_tokens)

    def ratio_at(scale: float) -> float:
        return generated_perplexity(model, irm.with_output_scale(scale), prompts, decodings,
                                    max_new_tokens=max_new_tokens) / off

    return ratio_at


def unsteered_calibration(model: HookedTransformer, recipe: Recipe) -> dict[str, float]:
    """The unsteered model's side of ``recipe``'s dose calibration, where it calibrates by
    them: the perplexity of its replies to the tuning questions (``dose_for_perplexity``) and
    the distinct-2 of its replies to the diversity questions (``dose_within_distinct2``).
    Computed as those compute it, so ``scripts/precompute.py`` ships what they read."""
    found = {}
    if recipe.sampled_dose_perplexity is not None:
        found["perplexity"] = generated_perplexity(
            model, None, tuning_prompts(recipe.tuning_prompts), TUNING_DECODINGS,
            max_new_tokens=TUNING_NEW_TOKENS)
    if recipe.sampled_dose_distinct2 is not None:
        found["distinct2"] = distinct_n(_replies(
            model, None, tuning_prompts(recipe.diversity_prompts), TUNING_DECODINGS,
            TUNING_NEW_TOKENS), 2)
    return found


@torch.no_grad()
def dose_for_perplexity(
    model: HookedTransformer, irm: IRM, prompts: list[str], target: float, near: float, *,
    decodings: Decodings = TUNING_DECODINGS,
    grid: tuple[float, ...] = DOSE_GRID, max_new_tokens: int = TUNING_NEW_TOKENS,
    extend: int = 3, step: float = 1.5, progress: bool = False,
) -> tuple[float, float, pd.DataFrame]:
    """The output scale at which the model steered by ``irm`` answers ``prompts`` (in
    ``decodings``: by default one seeded sample each) with text whose perplexity under the
    unsteered model is ``target`` times the unsteered answers', the fitted ratio there, and
    the measured ratios.

    The ratio is that of ``evaluate``'s degeneration check (geometric means over the
    replies). Sampled on a few dozen prompts it wobbles by a few percent from one scale to the
    next, too much for a root search; it grows close to a power of the scale, so it is measured
    at ``near`` times each of ``grid`` (one generation of the prompts each, with the same
    seeds) and a least-squares line through (log scale, log ratio) gives the scale. Where that
    scale lies outside the measured span, the span is extended toward it (a scale at most
    ``step`` times beyond its end, measured and added to the fit) up to ``extend`` times; a
    scale still outside is clamped to the span, with a warning. ``progress``: progress lines
    (the scales so far, then the dose found).
    """
    if not target > 0 or not near > 0:
        raise ConfigError(f"The target perplexity ratio and the scale near it must be positive; "
                          f"got {target!r} and {near!r}.")
    ratio_at = _perplexity_meter(model, irm, prompts, decodings, max_new_tokens)
    ratios = {}
    with progress_bar(desc="dose (perplexity)", total=len(grid), unit="scale",
                      disable=not progress) as bar:
        for at in [near * g for g in grid]:
            ratios[at] = ratio_at(at)
            bar.update()
        for extended in range(extend + 1):
            scale, line = log_line_crossing(ratios, target)
            lo, hi = min(ratios), max(ratios)
            if lo <= scale <= hi or extended == extend:
                break
            further = min(scale, hi * step) if scale > hi else max(scale, lo / step)
            ratios[further] = ratio_at(further)
            bar.total += 1
            bar.update()
        clamped = min(max(scale, lo), hi)
        bar.set_postfix(dose=f"x{clamped:.3f} (ratio {line(clamped):.2f})")
    if clamped != scale:
        warnings.warn(f"dose_for_perplexity: the target ratio {target:g} lies outside scales "
                      f"{lo:.3g}-{hi:.3g} (ratios {ratios[lo]:.3g}-{ratios[hi]:.3g}); using "
                      f"scale {clamped:.3g}.", stacklevel=2)
    measured = pd.DataFrame(dict(scale=list(ratios), perplexity_ratio=list(ratios.values())))
    return clamped, line(clamped), measured.sort_values("scale", ignore_index=True)


@torch.no_grad()
def dose_within_distinct2(
    model: HookedTransformer, irm: IRM, prompts: list[str], scale: float, line: float, *,
    decodings: Decodings = TUNING_DECODINGS, max_new_tokens: int = TUNING_NEW_TOKENS,
    step: float = 1.1, max_steps: int = 3, progress: bool = False,
) -> tuple[float, float, pd.DataFrame]:
    """The largest of ``scale``, ``scale / step``, ``scale / step**2``, ... (at most
    ``max_steps`` steps down) at which the model steered by ``irm`` answers ``prompts`` (in
    ``decodings``) with replies whose distinct-2 is at least ``line`` times the unsteered
    replies' (``evaluate``'s check), the ratio there, and the ratios measured.

    Distinct-2 is pooled over the replies, so it falls as they grow in number: ``prompts``
    should be as many as an evaluation set has (``DIVERSITY_PROMPTS``). Where even the last
    step falls below the line, it is used, with a warning. ``progress``: progress lines (the
    scales so far, then the dose found).
    """
    if not 0 < line <= 1 or not scale > 0 or not step > 1:
        raise ConfigError(f"dose_within_distinct2 needs a line in (0, 1], a positive scale and a "
                          f"step above 1; got {line!r}, {scale!r} and {step!r}.")
    off = distinct_n(_replies(model, None, prompts, decodings, max_new_tokens), 2)
    ratios: dict[float, float] = {}
    with progress_bar(desc="dose (distinct-2)", unit="scale", disable=not progress) as bar:
        for k in range(max_steps + 1):
            at = scale / step**k
            replies = _replies(model, irm.with_output_scale(at), prompts, decodings,
                               max_new_tokens)
            ratios[at] = distinct_n(replies, 2) / off if off else math.nan
            bar.update()
            if ratios[at] >= line:
                break
        bar.set_postfix(dose=f"x{at:.3f} (ratio {ratios[at]:.2f})")
    if not ratios[at] >= line:  # every step down fell below it (or no ratio: NaN)
        warnings.warn(f"dose_within_distinct2: every scale down to {at:.3g} keeps less than "
                      f"{line:g} of the unsteered replies' distinct-2 (there: {ratios[at]:.3g}); "
                      f"using it.", stacklevel=2)
    measured = pd.DataFrame(dict(scale=list(ratios), distinct2_ratio=list(ratios.values())))
    return at, ratios[at], measured


def _replies(model: HookedTransformer, irm: IRM | None, prompts: list[str],
             decodings: Decodings, max_new_tokens: int) -> list[str]:
    """The texts the model (steered by ``irm`` where given) writes for ``prompts`` in each of
    ``decodings``, batched and seeded as ``generate_samples`` does by default."""
    return [c.text for _, _, kwargs in decodings
            for c in generate_continuations(model, prompts, intervention=irm, batch_size=20,
                                            max_new_tokens=max_new_tokens, **kwargs)]


def log_line_crossing(ratios: Mapping[float, float], target: float):
    """Where the least-squares line through (log scale, log ratio) reaches ``target``, and the
    line as a function of the scale."""
    x = torch.tensor(list(ratios)).log().double()
    y = torch.tensor(list(ratios.values())).log().double()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum())
    if not slope > 0:
        raise ConfigError(f"dose_for_perplexity: the perplexity ratio does not grow with the "
                          f"scale (scales {[round(s, 3) for s in ratios]}, ratios "
                          f"{[round(r, 3) for r in ratios.values()]}).")

    def line(scale: float) -> float:
        return math.exp(float(y.mean()) + slope * (math.log(scale) - float(x.mean())))

    return math.exp(float(x.mean()) + (math.log(target) - float(y.mean())) / slope), line


def tuning_prompts(n: int) -> list[str]:
    """The first ``n`` tuning questions (training split, from ``FIRST_TUNING_QUESTION`` on)."""
    prompts = neutral_prompts(None, split="train")[FIRST_TUNING_QUESTION:][:n]
    if len(prompts) < n:
        raise ConfigError(f"Only {len(prompts)} tuning questions exist; asked for {n}.")
    return prompts


def _false_position(f, goal: float, lo: float, hi: float, tol: float, max_steps: int) -> float:
    """The x in [lo, hi] where the rising ``f`` reaches ``goal`` (Illinois false position)."""
    f_lo, f_hi = f(lo) - goal, f(hi) - goal
    if f_lo >= 0 or f_hi <= 0:
        return lo if f_lo >= 0 else hi
    side = 0
    for _ in range(max_steps):
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        f_x = f(x) - goal
        if abs(f_x) <= tol:
            return x
        if f_x < 0:
            lo, f_lo = x, f_x
            f_hi, side = (f_hi / 2, side) if side == -1 else (f_hi, -1)
        else:
            hi, f_hi = x, f_x
            f_lo, side = (f_lo / 2, side) if side == 1 else (f_lo, 1)
    return lo if -f_lo <= f_hi else hi


def calibration_texts(model: HookedTransformer, pairs: list[PreferencePair], n: int = 16,
                      max_length: int = 96) -> TokenizedTexts:
    """The first ``n`` questions of ``pairs`` with their first rejected reply (the unsteered
    one, where a question also has a degenerate pair), chat-formatted: the texts on which a
    recipe measures its IRM's KL."""
    replies: dict[str, str] = {}
    for prompt, _, rejected in pairs:
        replies.setdefault(prompt, rejected)
    return tokenize_texts(model, list(replies.items())[:n], max_length=max_length)


def sampled_kl_dose(model: HookedTransformer, irm: IRM, alignment: str, recipe: Recipe) -> float:
    """The scale at which ``irm`` moves the model by ``recipe``'s sampled KL on the calibration
    texts of ``alignment``'s shipped pairs: the scale the sampled dose's perplexity fit centres
    its grid on (a recipe's calibration finds it in one KL fit with the greedy dose)."""
    pairs = shipped_recipe_pairs(alignment, recipe)
    found = dose_for_kl(model, irm, calibration_texts(model, pairs),
                        {"sampled": recipe.sampled_dose_kl})
    return found["sampled"][0]


def vector_layer(model: HookedTransformer, recipe: Recipe) -> int:
    """The layer of the recipe's vector in ``model``."""
    return min(model.cfg.n_layers - 1, round(recipe.vector_depth * model.cfg.n_layers))


def caa_vector(model: HookedTransformer, alignment: str, recipe: Recipe,
               out_dir: Path | None = None) -> SteeringVector:
    """The recipe's CAA vector for ``alignment`` (read from ``out_dir`` when saved there)."""
    if recipe.vector_depth is None:
        raise ConfigError("This recipe has no steering vector.")
    path = out_dir / "caa.safetensors" if out_dir is not None else None
    if path is not None and path.exists():
        return SteeringVector.load(path, model)
    vector = mean_difference_vector(model, alignment, layers=vector_layer(model, recipe),
                                    scale=recipe.vector_scale)
    if path is not None:
        vector.save(path)
    return vector


def recipe_pairs(model: HookedTransformer, alignment: str, vector: SteeringVector,
                 recipe: Recipe, out_dir: Path | None, progress: bool = True):
    """The shipped pairs for ``alignment`` on the embedded model, else pairs generated once
    (and kept in ``out_dir/pairs.jsonl``; each scale tried in ``out_dir/pairs_x<scale>.jsonl``)."""
    shipped = shipped_pairs_path(alignment)
    path = out_dir / "pairs.jsonl" if out_dir is not None else None
    if shipped.exists() and model.cfg.model_name == EMBEDDED_MODEL_NAME:
        path = shipped
    elif path is None:
        raise ConfigError("Generating the recipe's pairs needs an out_dir to keep them in.")
    elif not path.exists():
        shutil.copyfile(_fluent_scale_pairs(model, vector, alignment, recipe, out_dir, progress),
                        path)
    return read_recipe_pairs(path, recipe)


def shipped_pairs_path(alignment: str) -> Path:
    """Where the embedded model's pairs for ``alignment`` ship (``irm_lens/data/pairs/``)."""
    return SHIPPED_PAIRS / f"{alignment}.jsonl"


def shipped_recipe_pairs(alignment: str, recipe: Recipe) -> list[PreferencePair]:
    """The pairs of the embedded model's shipped ``alignment`` file that ``recipe`` trains on."""
    return read_recipe_pairs(shipped_pairs_path(alignment), recipe)


def read_recipe_pairs(path: Path | str, recipe: Recipe) -> list[PreferencePair]:
    """The pairs of a ``generate_pairs`` file that ``recipe`` trains on."""
    return read_pairs(path, degenerate=recipe.degenerate_pairs,
                      max_phrase_share=recipe.pairs_phrase_share)


def _fluent_scale_pairs(model: HookedTransformer, vector: SteeringVector, alignment: str,
                        recipe: Recipe, out_dir: Path, progress: bool) -> Path:
    """The pairs file of the first of the recipe's scales at which enough questions keep a
    pair (else the last scale's, with a warning)."""
    for scale in recipe.pairs_scales:
        path = out_dir / f"pairs_x{scale:g}.jsonl"
        if not path.exists():
            generate_pairs(model, vector.with_scale(scale), alignment, path,
                           n_sampled=recipe.pairs_sampled, progress=progress)
        kept, total = kept_share(path)
        if kept >= recipe.pairs_min_kept * total:
            return path
    warnings.warn(f"recipe_pairs: fewer than {recipe.pairs_min_kept:.0%} of the questions kept a "
                  f"pair at every scale {recipe.pairs_scales}; training on the x{scale:g} pairs "
                  f"({kept} of {total}).", stacklevel=3)
    return path


def train_recipe(
    model: HookedTransformer,
    alignment: str,
    out_dir: str | Path | None,
    *,
    recipe: str | Recipe = "preference",
    seed: int = 0,
    steps: int | None = None,
    pairs: str | Path | None = None,
    progress: bool = True,
) -> RecipeResult:
    """Train an IRM toward ``alignment`` with a named recipe (resumable in ``out_dir``).

    ``pairs`` (a ``generate_pairs`` file) replaces the recipe's own preference pairs. The
    result's IRM carries the recipe's greedy dose; ``RecipeResult.decoding_scales()`` gives
    the scale of it at which each decoding is steered.

    Example:
        >>> result = irm_lens.train_recipe(model, "anger", "runs/anger")  # doctest: +SKIP
        >>> irm_lens.evaluate(model, result.irm, "anger").verdict  # doctest: +SKIP
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ConfigError(f"Unknown recipe {recipe!r}; choose from {sorted(RECIPES)}.")
        recipe = RECIPES[recipe]
    recipe = recipe.for_alignment(alignment)
    out = Path(out_dir) if out_dir is not None else None
    config = replace(recipe.train, seed=seed, **({"max_steps": steps} if steps else {}))
    torch.manual_seed(seed)
    irm = IRM.for_model(model, layers=recipe.layers, preset=recipe.preset, zero_init_output=True)
    if recipe.objective == "preference":
        vector = caa_vector(model, alignment, recipe, out)
        warm_start(irm, vector)
        data = read_recipe_pairs(pairs, recipe) if pairs is not None \
            else recipe_pairs(model, alignment, vector, recipe, out, progress)
    else:
        data = alignment
    result = train(model, irm, data, config, out_dir=out, progress=progress)
    calibration = _doses(model, result, recipe, data, progress)
    dosed = result.irm.with_output_scale(calibration["doses"]["greedy"])
    saved = result.out_dir / "irm.safetensors" if result.out_dir is not None else None
    if saved is not None and IRM.load(saved).config.output_scale != dosed.config.output_scale:
        dosed.save(saved)  # a resumed finished run's file already carries the dose: kept as is
    trained = {f.name: getattr(result, f.name) for f in fields(result)}
    return RecipeResult(**{**trained, "irm": dosed}, **calibration)


def _doses(model: HookedTransformer, result: TrainResult, recipe: Recipe, data,
           progress: bool = False) -> dict[str, dict[str, float]]:
    """The recipe's doses for this run's IRM and what their calibration measured there
    (``RecipeResult``'s ``doses``, ``kl``, ``perplexity_ratio`` and ``distinct2_ratio``),
    calibrated where the recipe says so (and kept in the run's ``doses.json``, reused while the
    targets are the same)."""
    targets = recipe.dose_targets()
    calibration = dict(doses=recipe.doses(), kl={}, perplexity_ratio={}, distinct2_ratio={})
    if targets is None:
        return calibration
    path = result.out_dir / "doses.json" if result.out_dir is not None else None
    if path is not None and path.exists():
        kept = json.loads(path.read_text())
        if kept.get("targets") == targets and kept.get("rule") == DOSE_RULE:
            return calibration | {name: kept.get(name, {}) for name in calibration}
    line = None
    if recipe.dose_kls() is not None:
        found, line = _calibrated_doses(model, result.irm, recipe, data, progress)
        calibration |= found
    if recipe.sampled_dose_distinct2 is not None:
        doses = calibration["doses"]
        doses["sampled"], calibration["distinct2_ratio"]["sampled"], _ = dose_within_distinct2(
            model, result.irm, tuning_prompts(recipe.diversity_prompts), doses["sampled"],
            recipe.sampled_dose_distinct2, progress=progress)
        if line is not None:  # the perplexity's fitted line, read at the dose the bound chose
            calibration["perplexity_ratio"]["sampled"] = line(doses["sampled"])
    if path is not None:
        path.write_text(json.dumps(dict(targets=targets, rule=DOSE_RULE, **calibration),
                                   indent=2))
    return calibration


def _calibrated_doses(model: HookedTransformer, irm: IRM, recipe: Recipe, data,
                      progress: bool = False):
    """The doses at the recipe's target KLs, the sampled one then moved to its perplexity
    target where it has one (as ``_doses``'s dict), and the perplexity ratio's fitted line as
    a function of the scale (None without that target)."""
    if isinstance(data, str):
        raise ConfigError("Calibrating the doses needs the recipe's pairs (objective "
                          "'preference'); set dose_kl=None for this recipe.")
    found = dose_for_kl(model, irm, calibration_texts(model, data), recipe.dose_kls(),
                        progress=progress)
    doses = {name: scale for name, (scale, _) in found.items()}
    kl = {name: measured for name, (_, measured) in found.items()}
    ratio, line = {}, None
    if recipe.sampled_dose_perplexity is not None:
        doses["sampled"], ratio["sampled"], measured = dose_for_perplexity(
            model, irm, tuning_prompts(recipe.tuning_prompts), recipe.sampled_dose_perplexity,
            doses["sampled"], grid=recipe.dose_grid, progress=progress)
        line = log_line_crossing(dict(zip(measured.scale, measured.perplexity_ratio)),
                                 recipe.sampled_dose_perplexity)[1]
        del kl["sampled"]  # that dose is the perplexity's now
    return dict(doses=doses, kl=kl, perplexity_ratio=ratio), line
