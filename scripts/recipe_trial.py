"""Train one variant of a recipe (``--set train.kl=0.3 --set vector_scale=3``), resumable.

A trial of docs/training.md: the variant is trained in ``--out`` and then measured on the
tuning questions by ``scripts/dose_tuning.py --irm <out>``.

    python scripts/recipe_trial.py --set train.chosen_lm=0 --out runs/trials/lm0
"""

from __future__ import annotations

import argparse

import torch

import irm_lens
from irm_lens.recipes import RECIPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignment", default="anger")
    p.add_argument("--recipe", default="preference", choices=RECIPES)
    p.add_argument("--set", action="append", default=[], dest="settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    recipe = RECIPES[args.recipe].with_settings(args.settings)
    print(recipe, flush=True)
    model = irm_lens.load_model()
    result = irm_lens.train_recipe(model, args.alignment, args.out, recipe=recipe, seed=args.seed)
    print(f"{result.stop_reason}, {result.wall_time_s:.0f} s; validation "
          f"{result.baseline_val_loss:.4f} -> {result.best_val_loss:.4f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
