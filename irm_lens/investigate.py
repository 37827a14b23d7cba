"""The main job: the paper's investigation end to end, in one call.

Alignment data -> train an IRM with a recipe (resumable; the default, ``"preference"``, starts
from a CAA vector and learns from preference pairs) -> its outputs, striations and dominant
neuron -> every analysis of that neuron -> the steered generations measured beside the CAA
vector and a persona prompt on the same prompts -> one HTML report. Each stage prints what it
did and how long it took; the stage times are kept in the result.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from transformer_lens import HookedTransformer

from irm_lens.analysis.dossier import NeuronDossier, explain
from irm_lens.analysis.outputs import (
    DominantNeurons,
    IRMOutputs,
    collect_irm_outputs,
    dominant_neurons,
)
from irm_lens.compare import SteeringComparison, compare_steering
from irm_lens.data.precomputed import ENV_SWITCH, Lookup, precomputation
from irm_lens.irm import IRM
from irm_lens.recipes import RECIPES, Recipe, RecipeResult, caa_vector, train_recipe
from irm_lens.report import report
from irm_lens.report.summary import findings
from irm_lens.steering import Intervention, Prompting


@dataclass(frozen=True)
class InvestigationSettings:
    """How big each stage is. The defaults fit a 2-core CPU and the embedded model (about 7
    minutes, see README); raise them on a GPU (e.g. ``preset="paper"``, more steps and prompts).

    ``recipe`` names a ``irm_lens.recipes.RECIPES`` entry; ``layers``, ``preset`` and ``steps``
    override its own (None: the recipe's); ``pairs`` (a ``generate_pairs`` file) its pairs.
    """

    alignment: str = "anger"
    recipe: str = "preference"
    pairs: str | None = None
    layers: str | None = None
    preset: str | None = None
    steps: int | None = None
    seed: int = 0
    n_prompts: int = 12
    max_new_tokens: int = 20
    n_random: int = 4
    eval_prompts: int = 40
    eval_new_tokens: int = 32


@dataclass
class Investigation:
    """Everything the main job produced, and where it wrote it."""

    out_dir: Path
    report_path: Path
    training: RecipeResult | None  # None when an IRM was given
    outputs: IRMOutputs
    dominant: DominantNeurons
    dossier: NeuronDossier
    steering: SteeringComparison
    stage_seconds: dict[str, float] = field(default_factory=dict)
    precomputed: list[Lookup] = field(default_factory=list)  # every lookup of shipped results

    @property
    def verdict(self) -> str:
        """The IRM's evaluation verdict, beside its baselines."""
        return steering_verdict(self.steering)


def steering_verdict(steering: SteeringComparison) -> str:
    """One line per intervention and decoding: lift [CI], fluency checks, verdict."""
    lines = []
    for row in steering.table.itertuples():
        scale = f" x{row.scale:g}" if row.scale != 1.0 else ""
        lines.append(
            f"{row.intervention}{scale} {row.decoding}: {steering.alignment} lift {row.lift:+.3f} "
            f"[95% CI {row.ci_low:+.3f}, {row.ci_high:+.3f}], distinct-2 ratio "
            f"{row.distinct2_ratio:.2f}, perplexity ratio {row.perplexity_ratio:.1f}: {row.verdict}"
        )
    return "\n".join(lines)


def main_job_baselines(model: HookedTransformer, alignment: str, recipe: Recipe,
                       run_dir: Path | None = None) -> dict[str, Intervention]:
    """What the main job measures its IRM beside: the tone persona prompt and, for a recipe
    that starts from one, the recipe's CAA vector (read from ``run_dir`` where saved there)."""
    baselines: dict[str, Intervention] = {"prompting": Prompting.persona(alignment)}
    if recipe.vector_depth is not None:  # the IRM's starting point, as the baseline to beat
        vector = caa_vector(model, alignment, recipe.for_alignment(alignment), run_dir)
        baselines[f"caa (layer {vector.config.layers[0]} x{vector.config.scale:g})"] = vector
    return baselines


def main_job_comparison(model: HookedTransformer, interventions: dict[str, Intervention],
                        settings: InvestigationSettings,
                        scales: dict[str, Sequence[float] | dict[str, float]] | None = None,
                        progress: bool = True) -> SteeringComparison:
    """The main job's evaluation: ``interventions`` measured on its prompts and decodings
    (``compare_steering``, at ``scales``)."""
    return compare_steering(model, interventions, settings.alignment,
                            n_prompts=settings.eval_prompts,
                            max_new_tokens=settings.eval_new_tokens, scales=scales or (1.0,),
                            progress=progress)


def investigate(
    model: HookedTransformer,
    out_dir: str | Path = "runs/main",
    settings: InvestigationSettings = InvestigationSettings(),
    *,
    irm: IRM | None = None,
    progress: bool = True,
) -> Investigation:
    """Train an IRM toward ``settings.alignment`` and explain the neuron it relies on.

    Args:
        model: The frozen host model.
        out_dir: Where the run directory (``out_dir/irm``) and ``report.html`` go. Running the
            same call again resumes or reuses the training run.
        settings: Sizes of every stage.
        irm: A trained IRM to investigate instead of training one.
        progress: Progress bars and stage lines.

    What the embedded model computes before and beside training that no trained IRM enters is
    read from the shipped precomputed results (``irm_lens.data.precomputed``; the job says how
    many): the reference margins, the CAA vector's means, and the unsteered, persona and CAA
    replies with their perplexities. ``IRM_LENS_PRECOMPUTED=0`` computes them too.
    """
    with precomputation() as lookups:
        return _investigate(model, Path(out_dir), settings, irm, progress, lookups)


def precomputed_summary(lookups: list[Lookup]) -> str:
    """Which results a run read from the shipped precomputed ones, per kind."""
    kinds = Counter(lookup.key.rsplit("-", 1)[0] for lookup in lookups if lookup.found)
    read = ", ".join(f"{kind} {n}" for kind, n in kinds.items()) or "none"
    return f"Read from the shipped precomputed results: {read} ({ENV_SWITCH}=0 computes them)."


def _investigate(model: HookedTransformer, out_dir: Path, settings: InvestigationSettings,
                 irm: IRM | None, progress: bool, lookups: list[Lookup]) -> Investigation:
    s = settings
    times: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        times[name] = time.perf_counter() - start
        if progress:
            print(f"[{name}] done in {times[name]:.0f} s", flush=True)

    recipe = RECIPES[s.recipe]
    recipe = replace(recipe, **{k: v for k, v in (("layers", s.layers), ("preset", s.preset))
                                if v is not None})
    t = time.perf_counter()
    training = None
    if irm is None:
        training = train_recipe(model, s.alignment, out_dir / "irm", recipe=recipe, seed=s.seed,
                                steps=s.steps, pairs=s.pairs, progress=progress)
        irm = training.irm
        if progress:
            print(f"validation loss {training.baseline_val_loss:.3f} without the IRM -> "
                  f"{training.best_val_loss:.3f} with it ({training.stop_reason})")
    stage("train", t)

    t = time.perf_counter()
    outputs = collect_irm_outputs(model, irm, n_prompts=s.n_prompts,
                                  max_new_tokens=s.max_new_tokens, per_token=True,
                                  progress=progress)
    dominant = dominant_neurons(outputs)
    stage("IRM outputs", t)
    if progress:
        print(f"dominant neuron: {dominant.top} "
              f"({dominant.table['share'].iloc[0]:.2%} of the IRM's |output|)")

    t = time.perf_counter()
    dossier = explain(model, dominant.top, irm, s.alignment, list(outputs.prompts),
                      n_random=s.n_random, max_new_tokens=s.max_new_tokens, outputs=outputs,
                      progress=progress)
    stage("analyses", t)

    t = time.perf_counter()
    baselines = {"irm": irm, **main_job_baselines(model, s.alignment, recipe, out_dir / "irm")}
    # Each decoding at the recipe's dose for it (a trained IRM carries the greedy one); a given
    # IRM is measured, and judged, as it is.
    chosen = training.decoding_scales() if training is not None else None
    steering = main_job_comparison(model, baselines, s, {"irm": chosen or [1.0]}, progress)
    stage("evaluation", t)
    if progress:
        print(steering_verdict(steering))
        # the IRM beside its best aligned baseline, per decoding (the report's findings)
        for claim in findings(steering=steering, subject_scales=chosen).itertuples():
            print(f"{claim.claim}: {claim.finding}: {claim.verdict}")
        print(precomputed_summary(lookups))

    t = time.perf_counter()
    trained = (f"trained toward {s.alignment} with the {s.recipe!r} recipe ({recipe.preset} "
               f"preset, layers {recipe.layers})") if training is not None else "given"
    notes = [
        f"The main job on {model.cfg.model_name}: an IRM {trained}, measured beside "
        f"{', '.join(n for n in baselines if n != 'irm')} on the same prompts; its dominant "
        f"neuron {dominant.top} analysed against {s.n_random} random indices.",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".",
        precomputed_summary(lookups),
    ]
    path = report(
        out_dir / "report.html", title=f"irm_lens: {s.alignment} on {model.cfg.model_name}",
        run_dir=training.out_dir if training is not None else None, outputs=outputs,
        dossier=dossier, steering=steering, notes=notes,
        subject_scales=chosen,
    )
    stage("report", t)
    return Investigation(out_dir, path, training, outputs, dominant, dossier, steering, times,
                         lookups)
