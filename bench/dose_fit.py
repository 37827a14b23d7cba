"""Benchmark: a trained IRM's sampled-dose fit on five scales against three, alternated.

    python bench/dose_fit.py --irm runs/main/irm [--alignment anger] [--rounds 2]

``dose_for_perplexity`` as the recipe calls it (its 40 tuning questions, its perplexity target,
around the dose of its sampled KL; the unsteered replies read from the shipped precomputed
results, as in the main job), on ``DOSE_GRID`` and on the alignment's own grid (anger's three
scales, ``Recipe.dose_grid``), in turn, ``--rounds`` times: the time each takes and the dose it
finds, so that the saving is measured in one run, on the same machine state.
"""

from __future__ import annotations

import argparse
import time

import irm_lens
from irm_lens.recipes import (DOSE_GRID, RECIPES, dose_for_perplexity, sampled_kl_dose,
                              tuning_prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--irm", required=True, help="a trained IRM (file or run directory)")
    parser.add_argument("--alignment", default="anger")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    recipe = RECIPES["preference"].for_alignment(args.alignment)
    if recipe.dose_grid == DOSE_GRID:
        parser.error(f"{args.alignment}'s recipe fits its sampled dose on DOSE_GRID itself; "
                     "there is no other grid to compare with.")
    model = irm_lens.load_model()
    irm = irm_lens.IRM.load(args.irm, model).with_output_scale(1.0)
    near = sampled_kl_dose(model, irm, args.alignment, recipe)
    prompts = tuning_prompts(recipe.tuning_prompts)
    grids = (DOSE_GRID, recipe.dose_grid)
    seconds: tuple[list[float], list[float]] = ([], [])
    for round_ in range(args.rounds):
        for grid, timed in zip(grids, seconds):
            start = time.perf_counter()
            dose = dose_for_perplexity(model, irm, prompts, recipe.sampled_dose_perplexity, near,
                                       grid=grid)[0]
            timed.append(time.perf_counter() - start)
            print(f"round {round_}: scales {grid}, dose {dose:.4f}, {timed[-1]:.1f} s", flush=True)
    full, own = (sum(timed) / len(timed) for timed in seconds)
    print(f"mean: {len(DOSE_GRID)} scales {full:.1f} s, {len(recipe.dose_grid)} {own:.1f} s; "
          f"saved {full - own:.1f} s ({own / full:.2f}x the time)")


if __name__ == "__main__":
    main()
