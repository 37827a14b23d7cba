"""Training recipes: everything that makes an IRM steer, in one named bundle.

* ``"preference"`` (the default of ``irm-lens train --recipe`` and of the main job): a
  mean-difference (CAA) vector of the alignment's built-in texts warm-starts the IRM's output
  bias, so the untrained IRM already is that vector; it is then trained with the preference
  objective on pairs of the same training question answered by the model steered by that vector
  (the chosen, tone-carrying reply) and unsteered (the rejected one), with the fluency KL term
  and no cross-entropy on the chosen replies (it narrowed the phrasing); the trained IRM is
  used at a dose of 0.75 (its ``output_scale``) for greedy decoding and 0.9 for sampled
  decoding (``Recipe.decoding_scales``: sampling tolerates the stronger push).
  The pairs are generated once (``generate_pairs``, at ``pairs_scale``) and reused; the
  embedded model's ``anger`` pairs ship with the package (``irm_lens/data/pairs/``).
* ``"paper"``: the paper's objective, cross-entropy on the built-in alignment texts, from a
  zero-initialised IRM (the main job before the preference recipe).

The measurements behind the choice are in docs/training.md ("The steering study" and
"Diversity").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from irm_lens.errors import ConfigError
from irm_lens.irm import IRM
from irm_lens.models import EMBEDDED_MODEL_NAME
from irm_lens.pairs import generate_pairs, read_pairs
from irm_lens.steering import SteeringVector, mean_difference_vector, warm_start
from irm_lens.train import TrainConfig, TrainResult, train

SHIPPED_PAIRS = Path(__file__).parent / "data" / "pairs"


@dataclass(frozen=True)
class Recipe:
    """A training recipe (see the module docstring).

    Attributes:
        objective: ``TrainConfig.objective``.
        layers / preset: The IRM (``IRM.for_model``), always zero-initialised.
        vector_depth / vector_scale: The CAA vector of the warm start, at the layer this far
            through the model (0.4: layer 12 of SmolLM2's 30, 13 of Llama 2's 32; None: no
            warm start), and its scale.
        pairs_scale / pairs_sampled: The vector's scale when it writes the chosen replies of the
            pairs, and its sampled candidates per question (at 4, 40-49% of the embedded
            model's questions kept a pair; at 5, 16%).
        degenerate_pairs: Also train on (question, chosen, degenerate steered reply) pairs.
        dose: The trained IRM's ``output_scale``: below 1 it trades lift for diversity (chosen
            on training questions no pair asked, ``scripts/dose_tuning.py``). The IRM the
            recipe returns, and saves as the run's ``irm.safetensors``, carries it.
        sampled_dose: The dose for sampled decoding where it differs from ``dose`` (None: the
            same). Greedy decoding repeats the steered phrases first, sampling tolerates a
            stronger push; each decoding's dose is chosen on the tuning questions, as CAA's
            scale is per decoding in every comparison. ``decoding_scales`` gives it as a scale
            of the dosed IRM.
        train: The optimisation settings (``max_steps`` is the recipe's length).
    """

    objective: str
    layers: str = "all"
    preset: str = "small"
    vector_depth: float | None = 0.4
    vector_scale: float = 4.0
    pairs_scale: float = 4.0
    pairs_sampled: int = 3
    degenerate_pairs: bool = True
    dose: float = 1.0
    sampled_dose: float | None = None
    train: TrainConfig = TrainConfig()

    def decoding_scales(self) -> dict[str, float]:
        """The scale of the dosed IRM (``output_scale == dose``) at which each decoding is
        steered: 1 for greedy, ``sampled_dose / dose`` for sampled."""
        sampled = 1.0 if self.sampled_dose is None else self.sampled_dose / self.dose
        return {"greedy": 1.0, "sampled": sampled}


RECIPES: dict[str, Recipe] = {
    "preference": Recipe(
        objective="preference",
        dose=0.75,
        sampled_dose=0.9,
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
    (and kept in ``out_dir/pairs.jsonl``)."""
    shipped = SHIPPED_PAIRS / f"{alignment}.jsonl"
    path = out_dir / "pairs.jsonl" if out_dir is not None else None
    if shipped.exists() and model.cfg.model_name == EMBEDDED_MODEL_NAME:
        path = shipped
    elif path is None:
        raise ConfigError("Generating the recipe's pairs needs an out_dir to keep them in.")
    elif not path.exists():
        generate_pairs(model, vector.with_scale(recipe.pairs_scale), alignment, path,
                       n_sampled=recipe.pairs_sampled, progress=progress)
    return read_pairs(path, degenerate=recipe.degenerate_pairs)


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
) -> TrainResult:
    """Train an IRM toward ``alignment`` with a named recipe (resumable in ``out_dir``).

    ``pairs`` (a ``generate_pairs`` file) replaces the recipe's own preference pairs.

    Example:
        >>> result = irm_lens.train_recipe(model, "anger", "runs/anger")  # doctest: +SKIP
        >>> irm_lens.evaluate(model, result.irm, "anger").verdict  # doctest: +SKIP
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ConfigError(f"Unknown recipe {recipe!r}; choose from {sorted(RECIPES)}.")
        recipe = RECIPES[recipe]
    out = Path(out_dir) if out_dir is not None else None
    config = replace(recipe.train, seed=seed, **({"max_steps": steps} if steps else {}))
    torch.manual_seed(seed)
    irm = IRM.for_model(model, layers=recipe.layers, preset=recipe.preset, zero_init_output=True)
    if recipe.objective == "preference":
        vector = caa_vector(model, alignment, recipe, out)
        warm_start(irm, vector)
        data = read_pairs(pairs, degenerate=recipe.degenerate_pairs) if pairs is not None \
            else recipe_pairs(model, alignment, vector, recipe, out, progress)
    else:
        data = alignment
    result = train(model, irm, data, config, out_dir=out, progress=progress)
    if recipe.dose == 1.0:
        return result
    dosed = result.irm.with_output_scale(recipe.dose)
    saved = result.out_dir / "irm.safetensors" if result.out_dir is not None else None
    if saved is not None and IRM.load(saved).config.output_scale != recipe.dose:
        dosed.save(saved)  # a resumed finished run's file already carries the dose: kept as is
    return replace(result, irm=dosed)
