"""The steering study of docs/training.md: trained IRMs beside CAA, ActAdd and prompting.

For one alignment: build the CAA vectors (one per layer) and the ActAdd vector, train one IRM
per seed with the chosen recipe, then measure everything with ``compare_steering`` on disjoint
sets of held-out prompts, and compare each IRM's lift with the best fluent CAA lift on the same
prompts. Every stage is saved under ``--out`` and skipped when already there, so an interrupted
study continues where it stopped (training resumes from its checkpoints).

    python scripts/steering_study.py --alignment anger --seeds 0,1,2 --sets 3 --out runs/study/anger

``--sets 1,2,0`` measures the same three sets in another order (the held-out ones first).
``--sets rest`` measures the prompts no set, pair or dose tuning has asked (``rest_prompts``).
``--summarise`` measures nothing: it reads every point already measured on the sets (each IRM at
its recipe doses, CAA at every scale) and writes ``summary_head_to_head.csv``, each IRM point
beside the best fluent CAA point and head to head with it, without loading the model.

Prompt sets are ``--n-prompts`` prompts each, starting at ``--first-prompt`` (prompts before it
are left for choosing settings); the unsteered texts are generated once per set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import irm_lens
from irm_lens.compare import DECODINGS as BOTH
from irm_lens.data.corpora import neutral_prompts
from irm_lens.evaluate import DegenerationThresholds, eval_prompts
from irm_lens.recipes import FIRST_TUNING_QUESTION, RECIPES, train_recipe
from irm_lens.report.figures import dose_response_figure

# The held-out sets of the studies (sets 0-2), and the tuning questions dose tuning reads
# (``dose_tuning.py --n-prompts``'s default, from ``FIRST_TUNING_QUESTION`` on): what ``rest``
# leaves out besides the first ``--first-prompt`` prompts and the pairs' questions.
N_SETS = 3
DOSE_TUNING_QUESTIONS = 160


def _vectors(model, args, out: Path) -> dict[str, irm_lens.SteeringVector]:
    vectors = {}
    for layer in args.caa_layers:
        path = out / f"caa_layer{layer}.safetensors"
        if not path.exists():
            irm_lens.mean_difference_vector(model, args.alignment, layers=layer).save(path)
        vectors[f"caa_layer{layer}"] = irm_lens.SteeringVector.load(path, model)
    path = out / "actadd.safetensors"
    if not path.exists():
        positive, negative = irm_lens.steering.ACTADD_PAIRS[args.alignment]
        irm_lens.actadd_vector(model, positive, negative, layers=args.actadd_layer).save(path)
    vectors["actadd"] = irm_lens.SteeringVector.load(path, model)
    return vectors


def rest_prompts(args) -> list[str]:
    """The prompts left over by everything else: the held-out prompts after the three sets,
    and the training questions after the tuning questions that dose tuning reads
    (``dose_tuning.py``'s 160 from ``FIRST_TUNING_QUESTION``; every pair asked earlier ones)."""
    held_out = neutral_prompts(None, split="eval")[args.first_prompt + N_SETS * args.n_prompts:]
    tuned = FIRST_TUNING_QUESTION + DOSE_TUNING_QUESTIONS
    return held_out + neutral_prompts(None, split="train")[tuned:]


def _parse_sets(text: str) -> list[int | str]:
    """``--sets``: a count N (sets 0..N-1), or set numbers and ``rest`` separated by commas."""
    names = [k for k in text.split(",") if k]
    if not names or not all(k == "rest" or k.isdigit() for k in names):
        raise SystemExit(f"--sets takes a count or set numbers and 'rest' separated by commas, "
                         f"got {text!r}")
    if "," not in text and names[0] != "rest":
        return list(range(int(names[0])))
    return [k if k == "rest" else int(k) for k in names]


def _set_prompts(k: int | str, args) -> tuple[list[str], str]:
    """Set ``k``'s prompts and how to name them."""
    if k == "rest":
        prompts = rest_prompts(args)
        return prompts, f"{len(prompts)} prompts no set, pair or tuning asked"
    first = args.first_prompt + k * args.n_prompts
    prompts = eval_prompts(None, args.n_prompts, first)
    return prompts, f"prompts {first}-{first + args.n_prompts - 1}"


def _measure_set(model, interventions: dict, points: dict, args, prompts: list[str],
                 where: Path, named: str) -> irm_lens.SteeringComparison:
    """Every intervention at each of its points (scale, decodings) on one prompt set. Each
    point's rows and samples are saved as it is measured (``where/<name>@<scale>.parquet``, or
    ``<name>@<scale>-<decoding>.parquet`` for one decoding), the unsteered samples once per
    decoding, and reused on a rerun, so that adding a scale or an intervention measures only
    what is new. ``comparison.csv`` lists every point the directory holds, this call's and
    earlier ones'; the figure and the returned comparison hold this call's."""
    where.mkdir(parents=True, exist_ok=True)
    kwargs = dict(prompts=prompts, max_new_tokens=args.max_new_tokens)
    tables, samples = [], []
    for name, intervention in interventions.items():
        for scale, decodings in points[name]:
            tail = "" if tuple(decodings) == BOTH else "-" + "-".join(decodings)
            done = where / f"{name}@{scale:g}{tail}.parquet"
            if not done.exists():
                start = time.perf_counter()
                kept = _unsteered(where)
                # without samples for these decodings, this point generates them, and they are kept
                off = kept if kept is not None and set(decodings) <= set(kept.decoding) else None
                result = irm_lens.compare_steering(model, {name: intervention}, args.alignment,
                                                   scales={name: [scale]}, decodings=decodings,
                                                   unsteered=off, progress=False, **kwargs)
                if off is None:
                    new = result.samples[result.samples.intervention == "unsteered"]
                    if kept is not None:
                        new = new[~new.decoding.isin(set(kept.decoding))]
                    new.to_parquet(
                        where / f"unsteered-{'-'.join(sorted(set(new.decoding)))}.parquet")
                result.samples[result.samples.intervention == name].to_parquet(
                    done.with_suffix(".samples.parquet"))
                result.table.to_parquet(done)
                print(f"{where.name} ({named}): {name} x{scale:g}"
                      f" {'/'.join(decodings)} measured in {time.perf_counter() - start:.0f} s",
                      flush=True)
            tables.append(pd.read_parquet(done))
            samples.append(pd.read_parquet(done.with_suffix(".samples.parquet")))
    table = pd.concat(tables, ignore_index=True)
    pd.concat([pd.read_parquet(path) for path in _point_paths(where)], ignore_index=True
              ).drop_duplicates(["intervention", "scale", "decoding"]).to_csv(
                  where / "comparison.csv", index=False)
    comparison = _set_comparison(where, args.alignment, table, samples)
    comparison.samples.to_csv(where / "samples.csv", index=False)
    dose_response_figure(comparison).write_html(where / "dose_response.html", include_plotlyjs=True)
    return comparison


def _read_set(where: Path, alignment: str, irm_scales: dict[str, dict[str, float]]
              ) -> irm_lens.SteeringComparison:
    """The points measured in one set directory: CAA at every scale, and each IRM at its
    recipe dose per decoding (``irm_scales``; points at other doses are left out)."""
    names = _point_paths(where)
    if not names:
        raise SystemExit(f"{where} holds no measured point.")
    table = pd.concat([pd.read_parquet(path) for path in names], ignore_index=True)
    samples = pd.concat([pd.read_parquet(path.with_suffix(".samples.parquet")) for path in names],
                        ignore_index=True)

    def recipe_point(row) -> bool:
        if row.intervention.startswith("caa"):
            return True
        dose = irm_scales.get(row.intervention, {}).get(row.decoding)
        return dose is not None and bool(np.isclose(row.scale, dose))

    # a point measured twice (alone and with the other decoding) is the same generation
    table = table[table.apply(recipe_point, axis=1)].drop_duplicates(
        ["intervention", "scale", "decoding"])
    samples = samples.drop_duplicates(["intervention", "scale", "decoding", "prompt", "sample"])
    return _set_comparison(where, alignment, table.reset_index(drop=True), [samples])


def _point_paths(where: Path) -> list[Path]:
    """The table file of every point measured in a set directory (not the samples files, not
    the unsteered samples)."""
    return [path for path in sorted(where.glob("*.parquet"))
            if not path.name.endswith(".samples.parquet") and not path.name.startswith("unsteered")]


def _set_comparison(where: Path, alignment: str, table: pd.DataFrame,
                    samples: list[pd.DataFrame]) -> irm_lens.SteeringComparison:
    """One set directory's points (``table``, and their steered ``samples``) with its unsteered
    samples, as one comparison."""
    everything = pd.concat([_unsteered(where), *samples], ignore_index=True)
    return irm_lens.SteeringComparison(alignment, table, everything, (), DegenerationThresholds())


def _summarise(args, seeds: list[int]) -> pd.DataFrame:
    """``--summarise``: the head-to-head summary of every set, from the points on disk."""
    out = Path(args.out)
    irm_scales = {}
    for seed in seeds:
        path = out / f"irm_seed{seed}" / "doses.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: --summarise reads each seed's recipe doses "
                             f"from its run (run the study once without --summarise).")
        doses = json.loads(path.read_text())["doses"]
        # each decoding's dose as a scale of the saved IRM (RecipeResult.decoding_scales)
        irm_scales[f"irm_seed{seed}"] = {name: dose / doses["greedy"]
                                         for name, dose in doses.items()}
    verdicts = []
    for k in args.sets:
        comparison = _read_set(out / f"set{k}", args.alignment, irm_scales)
        verdicts.append(_verdict(comparison, list(irm_scales)).assign(
            alignment=args.alignment, set=k, prompts=_set_prompts(k, args)[1]))
    return pd.concat(verdicts, ignore_index=True)


def _unsteered(where: Path) -> pd.DataFrame | None:
    """The unsteered samples kept for a set so far (every decoding measured), or None."""
    parts = sorted(where.glob("unsteered*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else None


def _verdict(comparison: irm_lens.SteeringComparison, irm_names: list[str]) -> pd.DataFrame:
    """Each IRM's lift beside the best fluent CAA lift, per decoding (``at_least_caa`` is
    empty where this run measured no CAA point in that decoding: nothing to compare with), and
    the two head to head, prompt by prompt (``vs_caa``: the IRM's lift minus CAA's, with its
    95% CI and ``reading``: above, level or below)."""
    table = comparison.table
    caa = table[table.intervention.str.startswith("caa")]
    rows = []
    for decoding, group in table.groupby("decoding", sort=False):
        measured = bool((caa.decoding == decoding).any())
        best = caa[(caa.decoding == decoding) & caa.fluent].sort_values("lift").tail(1)
        best_lift = float(best.lift.iloc[0]) if len(best) else float("nan")
        for name in irm_names:
            for _, row in group[group.intervention == name].iterrows():
                rows.append(_verdict_row(name, decoding, row, best, best_lift, measured)
                            | _head_to_head(comparison, row, best))
    return pd.DataFrame(rows)


def _head_to_head(comparison: irm_lens.SteeringComparison, row: pd.Series,
                  best: pd.DataFrame) -> dict:
    """The IRM point ``row`` against the best fluent CAA point, paired by prompt (nan where
    CAA has no fluent point)."""
    if not len(best):
        return dict(vs_caa=float("nan"), vs_caa_low=float("nan"), vs_caa_high=float("nan"),
                    reading="")
    paired = comparison.head_to_head((row.intervention, row.scale),
                                     (best.intervention.iloc[0], best.scale.iloc[0]), row.decoding)
    return dict(vs_caa=paired.difference, vs_caa_low=paired.ci_low, vs_caa_high=paired.ci_high,
                reading=paired.reading)


def _verdict_row(name: str, decoding: str, row: pd.Series, best: pd.DataFrame,
                 best_lift: float, caa_measured: bool) -> dict:
    return dict(
        irm=name, scale=row.scale, decoding=decoding, lift=row.lift, ci_low=row.ci_low,
        ci_high=row.ci_high, fluent=row.fluent, aligned=row.verdict == "aligned",
        best_fluent_caa=best_lift,
        best_caa=f"{best.intervention.iloc[0]} x{best.scale.iloc[0]:g}" if len(best) else "",
        # no fluent CAA point at all: CAA's fluent lift is nothing to beat
        at_least_caa=bool(row.verdict == "aligned" and (not len(best) or row.lift >= best_lift))
        if caa_measured else None,
    )


def _both(scales: str) -> list[tuple[float, tuple[str, ...]]]:
    return [(float(s), BOTH) for s in scales.split(",")]


def _irm_points(result, irm_scales: str) -> list[tuple[float, tuple[str, ...]]]:
    """The IRM's points: each decoding at the recipe's scale for it, or given multiples."""
    if irm_scales != "recipe":
        return _both(irm_scales)
    scales = result.decoding_scales()
    if scales["greedy"] == scales["sampled"]:
        return [(scales["greedy"], BOTH)]
    return [(scales[name], (name,)) for name in BOTH]


def _only(points: dict, decodings: tuple[str, ...]) -> dict:
    """Each intervention's points in ``decodings`` only (a point left without one is dropped)."""
    unknown = set(decodings) - set(BOTH)
    if unknown:
        raise SystemExit(f"--decodings takes some of {BOTH}, got {sorted(unknown)}")
    kept = {}
    for name, pts in points.items():
        kept[name] = [(scale, tuple(d for d in BOTH if d in decs and d in decodings))
                      for scale, decs in pts]
        kept[name] = [(scale, decs) for scale, decs in kept[name] if decs]
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignment", default="anger")
    p.add_argument("--recipe", default="preference", choices=RECIPES)
    p.add_argument("--set", action="append", default=[], dest="settings",
                   help="a recipe setting for a variant (train.entropy=0.1; repeatable; as "
                        "scripts/recipe_trial.py)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sets", default="3",
                   help="how many prompt sets (N: sets 0..N-1), or which, in the order to measure "
                        "them ('1,2,0'; '2,' is set 2 alone): set k holds the k-th n-prompts after "
                        "--first-prompt; 'rest' the prompts no set, pair or tuning asked")
    p.add_argument("--n-prompts", type=int, default=160)
    p.add_argument("--first-prompt", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--caa-layers", default="12")
    p.add_argument("--caa-scales", default="2,3,4")
    p.add_argument("--actadd-layer", type=int, default=6)
    p.add_argument("--actadd-scales", default="4,8")
    p.add_argument("--baseline-sets", type=int, default=None,
                   help="measure ActAdd and prompting on the first N sets only (default: all); "
                        "CAA and the IRMs are measured on every set")
    p.add_argument("--irm-scales", default="recipe",
                   help="multiples of each trained IRM's greedy dose to measure in both decodings "
                        "(default 'recipe': each decoding at the recipe's dose for it, alone)")
    p.add_argument("--interventions", default=None,
                   help="measure only these (comma-separated names: caa_layer12, actadd, "
                        "prompting, irm_seed0, ...) on the sets; the rest are left out")
    p.add_argument("--decodings", default="greedy,sampled",
                   help="measure these decodings only (e.g. 'sampled' after a change of the "
                        "sampled dose)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--summarise", action="store_true",
                   help="measure nothing: put the points measured on --sets head to head with "
                        "CAA (summary_head_to_head.csv; the seeds' doses from their doses.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.caa_layers = [int(x) for x in args.caa_layers.split(",")]
    args.sets = _parse_sets(args.sets)
    out = Path(args.out)
    if args.summarise:
        summary = _summarise(args, [int(s) for s in args.seeds.split(",")])
        summary.to_csv(out / "summary_head_to_head.csv", index=False)
        with pd.option_context("display.width", 220, "display.max_columns", 20):
            print(summary.round(3).to_string(index=False))
        return
    out.mkdir(parents=True, exist_ok=True)

    recipe = RECIPES[args.recipe].with_settings(args.settings)
    model = irm_lens.load_model()
    interventions: dict = dict(_vectors(model, args, out))
    points = {name: _both(args.caa_scales) for name in interventions}
    points["actadd"] = _both(args.actadd_scales)
    interventions["prompting"] = irm_lens.Prompting.persona(args.alignment)
    points["prompting"] = _both("1")  # a prompt has no scale: measured once
    irm_names = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = time.perf_counter()
        result = train_recipe(model, args.alignment, out / f"irm_seed{seed}", recipe=recipe,
                              seed=seed, steps=args.steps)
        print(f"seed {seed}: {result.stop_reason}, {result.wall_time_s:.0f} s of training "
              f"({time.perf_counter() - start:.0f} s with the vector); validation "
              f"{result.baseline_val_loss:.4f} -> {result.best_val_loss:.4f}", flush=True)
        print(f"seed {seed}: doses " + ", ".join(f"{k} {v:.3f}" for k, v in result.doses.items())
              + (" (KL " + ", ".join(f"{k} {v:.4f}" for k, v in result.kl.items()) + ")"
                 if result.kl else "")
              + (" (perplexity ratio " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                   result.perplexity_ratio.items()) + ")"
                 if result.perplexity_ratio else "")
              + (" (distinct-2 ratio " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                   result.distinct2_ratio.items()) + ")"
                 if result.distinct2_ratio else ""), flush=True)
        interventions[f"irm_seed{seed}"] = result.irm  # its greedy dose is in its output_scale
        points[f"irm_seed{seed}"] = _irm_points(result, args.irm_scales)
        irm_names.append(f"irm_seed{seed}")

    points = _only(points, tuple(args.decodings.split(",")))
    verdicts = []
    for k in args.sets:
        prompts, named = _set_prompts(k, args)
        measured = {name: x for name, x in interventions.items() if args.baseline_sets is None
                    or (k != "rest" and k < args.baseline_sets)
                    or name not in ("actadd", "prompting")}
        if args.interventions:
            measured = {name: x for name, x in measured.items()
                        if name in args.interventions.split(",")}
        comparison = _measure_set(model, measured, points, args, prompts, out / f"set{k}", named)
        with pd.option_context("display.width", 220, "display.max_columns", 20):
            print(comparison.table.drop(columns=["off"]).round(3).to_string(index=False),
                  flush=True)
        verdicts.append(_verdict(comparison, irm_names).assign(set=k, prompts=named))
    summary = pd.concat(verdicts, ignore_index=True)
    summary.to_csv(out / "summary.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(summary.round(3).to_string(index=False))
    (out / "study.json").write_text(json.dumps(vars(args), indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
