"""Choose the dose (output scale) of trained IRMs on questions no evaluation set uses.

The held-out evaluation prompts are the studies' test sets, so the dose is chosen on
*training-split* questions that the pair generator never asked (by default the 160 from index
940 on: the shipped anger pairs asked questions 0-939). Every IRM and vector is measured at every
scale against one unsteered run, the same decodings as ``scripts/steering_study.py``.

    python scripts/dose_tuning.py --alignment anger --out runs/dose/anger \\
        --irm runs/study2/anger/irm_seed0 --irm-scales 0.6,0.8,1 \\
        --vector runs/study2/anger/caa_layer12.safetensors --vector-scales 2,3,4

Once one seed's doses are chosen, ``--targets-at GREEDY,SAMPLED`` prints the calibration
targets (``irm_lens.recipes.targets_at``) that give its IRM those doses, for
``Recipe.alignment_targets`` (instead of a dose table: the KLs on the calibration texts, and one
sampled generation of the first 40 tuning questions unsteered and at the sampled dose):

    python scripts/dose_tuning.py --alignment joy --out runs/dose/joy \\
        --irm runs/study5/joy/irm_seed0 --targets-at 1.05,1.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import irm_lens
from irm_lens.data.corpora import neutral_prompts
from irm_lens.recipes import FIRST_TUNING_QUESTION, RECIPES, recipe_pairs, targets_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignment", default="anger")
    p.add_argument("--irm", action="append", default=[], help="an IRM directory (repeatable)")
    p.add_argument("--irm-scales", default="0.6,0.8,1")
    p.add_argument("--vector", action="append", default=[], help="a SteeringVector file")
    p.add_argument("--vector-scales", default="2,3,4")
    p.add_argument("--first-question", type=int, default=FIRST_TUNING_QUESTION)
    p.add_argument("--n-prompts", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--decodings", default="greedy,sampled",
                   help="measure these decodings only (the first run measures both)")
    p.add_argument("--set", action="append", default=[], dest="settings",
                   help="with --targets-at: a setting of the recipe variant the IRM was trained "
                        "with (pairs_phrase_share=0.1; as scripts/recipe_trial.py), whose pairs "
                        "give the calibration texts")
    p.add_argument("--targets-at", default=None,
                   help="GREEDY,SAMPLED doses (output scales) of the one --irm: print the "
                        "recipe targets that give them, instead of measuring")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = irm_lens.load_model()
    if args.targets_at:
        _print_targets(model, args)
        return
    questions = neutral_prompts(None, split="train")
    prompts = questions[args.first_question:args.first_question + args.n_prompts]
    if len(prompts) < args.n_prompts:
        raise SystemExit(f"only {len(prompts)} training questions from {args.first_question} on")
    interventions, scales = {}, {}
    for path in args.irm:
        name = Path(path).name
        interventions[name] = irm_lens.IRM.load(Path(path) / "irm.safetensors", model)
        scales[name] = [float(s) for s in args.irm_scales.split(",")]
    for path in args.vector:
        name = Path(path).stem
        interventions[name] = irm_lens.SteeringVector.load(path, model)
        scales[name] = [float(s) for s in args.vector_scales.split(",")]
    unsteered_path = out / "unsteered.parquet"
    unsteered = pd.read_parquet(unsteered_path) if unsteered_path.exists() else None
    decodings = tuple(args.decodings.split(","))
    if unsteered is None and len(decodings) < 2:
        raise SystemExit("the first run of a directory measures both decodings (its unsteered run)")
    result = irm_lens.compare_steering(model, interventions, args.alignment, scales=scales,
                                       prompts=prompts, max_new_tokens=args.max_new_tokens,
                                       unsteered=unsteered, decodings=decodings)
    if unsteered is None:
        result.samples[result.samples.intervention == "unsteered"].to_parquet(unsteered_path)
    tag = "+".join(f"{name}@{','.join(f'{x:g}' for x in scales[name])}" for name in interventions)
    tag += "" if len(decodings) == 2 else "-" + decodings[0]
    result.table.to_csv(out / f"dose_{tag}.csv", index=False)
    result.samples.to_csv(out / f"samples_{tag}.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(result.table.drop(columns=["off"]).round(3).to_string(index=False))


def _print_targets(model, args) -> None:
    if len(args.irm) != 1:
        raise SystemExit("--targets-at takes exactly one --irm")
    greedy, sampled = (float(x) for x in args.targets_at.split(","))
    recipe = RECIPES["preference"].with_settings(args.settings)
    irm = irm_lens.IRM.load(Path(args.irm[0]) / "irm.safetensors", model)
    # the shipped pairs on the embedded model, else those the run generated
    pairs = recipe_pairs(model, args.alignment, None, recipe, Path(args.irm[0]), progress=False)
    targets = targets_at(model, irm, pairs, dict(greedy=greedy, sampled=sampled), recipe)
    text = json.dumps({args.alignment: targets}, indent=2)
    print(text)
    (Path(args.out) / "targets.json").write_text(text)


if __name__ == "__main__":
    main()
