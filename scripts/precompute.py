"""Write the embedded model's shipped precomputed results (``irm_lens/data/precomputed/``).

Everything the default recipe and the main job compute that no trained IRM enters, run here
under ``precomputation("record")`` exactly as they run it, so that each result is saved under
the key their lookup computes:
- per alignment and seed, the reference margins on the recipe's training and validation splits
  of the shipped pairs (``train`` otherwise spends about two minutes on them);
- per alignment, the means the recipe's CAA vector is the difference of, the unsteered replies
  its dose calibration compares with (``unsteered_calibration``), and the main job's evaluation
  of its baselines: the unsteered, persona-prompted and CAA-steered replies to its prompts, in
  both decodings, with their perplexities.
Already shipped keys are reported and kept; a shipped key no longer produced is listed as stale.

    python scripts/precompute.py --alignments anger,sadness,joy --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import replace

import irm_lens
from irm_lens.data.dataset import split_texts
from irm_lens.data.precomputed import PRECOMPUTED, precomputation
from irm_lens.investigate import (InvestigationSettings, main_job_baselines,
                                  main_job_comparison)
from irm_lens.recipes import RECIPES, caa_vector, shipped_recipe_pairs, unsteered_calibration
from irm_lens.train import split_objectives


def record(name: str, lookups: list, run) -> None:
    """Run ``run()`` and say which of its lookups were shipped already and which it wrote."""
    start, before = time.perf_counter(), len(lookups)
    run()
    made = Counter("shipped" if lookup.found else "written" for lookup in lookups[before:])
    print(f"{name}: {made['shipped']} already shipped, {made['written']} written "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignments", default="anger,sadness,joy")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipe", default="preference")
    args = p.parse_args()
    model = irm_lens.load_model()
    with precomputation("record") as lookups:
        for alignment in args.alignments.split(","):
            recipe = RECIPES[args.recipe].for_alignment(alignment)
            pairs = shipped_recipe_pairs(alignment, recipe)
            for seed in (int(s) for s in args.seeds.split(",")):
                config = replace(recipe.train, seed=seed)
                record(f"{alignment} seed {seed}: reference margins", lookups,
                       lambda: split_objectives(model, split_texts(pairs, seed=seed), config))
            record(f"{alignment}: CAA means", lookups,
                   lambda: caa_vector(model, alignment, recipe))
            record(f"{alignment}: unsteered calibration", lookups,
                   lambda: unsteered_calibration(model, recipe))
            settings = InvestigationSettings(alignment=alignment, recipe=args.recipe)
            baselines = main_job_baselines(model, alignment, RECIPES[args.recipe])
            record(f"{alignment}: the main job's baselines", lookups, lambda: main_job_comparison(
                model, baselines, settings, progress=False))
    wanted = {lookup.key for lookup in lookups}
    stale = sorted(f.stem for f in PRECOMPUTED.glob("*.safetensors") if f.stem not in wanted)
    print(f"{len(list(PRECOMPUTED.glob('*.safetensors')))} files shipped, "
          f"{sum(f.stat().st_size for f in PRECOMPUTED.glob('*.safetensors')) / 1e3:.0f} KB")
    if stale:
        print("not produced by these recipes and seeds (delete if unused):", *stale, sep="\n  ")


if __name__ == "__main__":
    main()
