"""Write the embedded model's shipped precomputed results (``irm_lens/data/precomputed/``).

For each alignment's shipped pairs and each seed, the default recipe's training and validation
splits are tokenised as ``train`` tokenises them, and the frozen model's reference margins on
them are computed and saved under their content key. ``train`` (and so the main job) then reads
them instead of spending about two minutes before its first step. Already shipped keys are
reported and kept; a key no longer produced by the recipes is listed as stale.

    python scripts/precompute.py --alignments anger,sadness,joy --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import irm_lens
from irm_lens.data.dataset import split_texts
from irm_lens.data.precomputed import PRECOMPUTED, save_precomputed
from irm_lens.recipes import RECIPES, SHIPPED_PAIRS, read_recipe_pairs
from irm_lens.train import split_objectives


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignments", default="anger,sadness,joy")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipe", default="preference")
    args = p.parse_args()
    model = irm_lens.load_model()
    wanted = set()
    for alignment in args.alignments.split(","):
        recipe = RECIPES[args.recipe].for_alignment(alignment)
        pairs = read_recipe_pairs(SHIPPED_PAIRS / f"{alignment}.jsonl", recipe)
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            config = replace(recipe.train, seed=seed)
            objectives = split_objectives(model, split_texts(pairs, seed=seed), config)
            for split, objective in zip(("train", "val"), objectives):
                key = objective.reference_key
                wanted.add(key)
                if (PRECOMPUTED / f"{key}.safetensors").exists():
                    print(f"{alignment} seed {seed} {split}: {key} already shipped")
                    continue
                save_precomputed(key, {"ref_margin": objective.ref_margin})
                print(f"{alignment} seed {seed} {split}: {len(objective)} pairs -> {key}")
            print(f"{alignment} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    stale = sorted(f.stem for f in PRECOMPUTED.glob("reference-margins-*.safetensors")
                   if f.stem not in wanted)
    if stale:
        print("not produced by these recipes and seeds (delete if unused):", *stale, sep="\n  ")


if __name__ == "__main__":
    main()
