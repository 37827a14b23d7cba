"""How precise is a trained IRM's sampled dose? The perplexity fit measured on several tuning seeds.

The recipe's sampled dose (``dose_for_perplexity``) samples one reply to each of the 40 tuning
questions at ``near`` x each scale of its grid and fits a line through (log scale, log
perplexity ratio): the five of ``DOSE_GRID``, (0.8, 0.9, 1.0, 1.1, 1.2), or anger's three since
2026-12-07, (0.8, 1.0, 1.2). This script measures the five points for each of
``--tuning-seeds`` (the seed of the sampled replies; the recipe uses 0), and prints the dose the
five points give and the dose three of them (0.8, 1.0, 1.2) give, per seed: how much the dose
moves with the tuning seed, against how much it moves with two generations fewer. (Sadness's and
joy's recipes then bound the dose by distinct-2; that step is not measured here.)

    python scripts/dose_precision.py --irm runs/main/irm --alignment anger --tuning-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import irm_lens
from irm_lens.evaluate import Decodings, generated_perplexity
from irm_lens.recipes import (DOSE_GRID as GRID, RECIPES, TUNING_NEW_TOKENS, log_line_crossing,
                              sampled_kl_dose, tuning_prompts)

# anger's grid, read at the five points' scales
THREE = RECIPES["preference"].for_alignment("anger").dose_grid
assert set(THREE) <= set(GRID), (THREE, GRID)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--irm", required=True, help="a trained IRM (file or run directory)")
    p.add_argument("--alignment", default="anger")
    p.add_argument("--recipe", default="preference")
    p.add_argument("--tuning-seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="a CSV of every measured ratio")
    args = p.parse_args()
    recipe = RECIPES[args.recipe].for_alignment(args.alignment)
    if recipe.sampled_dose_kl is None or recipe.sampled_dose_perplexity is None:
        p.error(f"the {args.recipe!r} recipe does not fit its sampled dose to a perplexity "
                "(sampled_dose_kl and sampled_dose_perplexity); give one that does.")
    model = irm_lens.load_model()
    irm = irm_lens.IRM.load(args.irm, model).with_output_scale(1.0)
    start = time.perf_counter()
    near = sampled_kl_dose(model, irm, args.alignment, recipe)
    print(f"near (KL {recipe.sampled_dose_kl}): {near:.4f}", flush=True)
    prompts, rows = tuning_prompts(recipe.tuning_prompts), []
    kwargs = dict(max_new_tokens=TUNING_NEW_TOKENS)
    for seed in (int(s) for s in args.tuning_seeds.split(",")):
        decodings = Decodings(n_sampled=1, greedy=False, seed=seed)
        off = generated_perplexity(model, None, prompts, decodings, **kwargs)
        ratios = {near * g: generated_perplexity(model, irm.with_output_scale(near * g), prompts,
                                                 decodings, **kwargs) / off for g in GRID}
        rows += [dict(seed=seed, scale=s, perplexity_ratio=r) for s, r in ratios.items()]
        target = recipe.sampled_dose_perplexity
        five = log_line_crossing(ratios, target)[0]
        three = log_line_crossing({near * g: ratios[near * g] for g in THREE}, target)[0]
        inside = near * GRID[0] <= five <= near * GRID[-1]
        print(f"tuning seed {seed}: dose {five:.4f} from 5 points, {three:.4f} from 3 "
              f"({three / five - 1:+.1%}){'' if inside else ' (outside the measured scales)'}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
