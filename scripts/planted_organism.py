"""The planted model organism of docs/findings-smollm2.md: train IRMs on a model whose answer is known.

Plant a 1512-like outlier at one index of the embedded model (``plant_outlier``: a channel
``--magnitude`` times each token's median |resid| from ``--from-layer`` on, norm weights near
zero there), report what the edit costs on held-out text, then train the sweep's short IRMs on
the planted model and ask: is the planted index their top index (and by how much over a uniform
share), does the frozen-model forecast name it, and how much of a push on it goes through the
RMSNorm scales (``norm_scale_split``, against random indices; the IRM's own push, per run)?

    python scripts/planted_organism.py --index 100 --out runs/organism

Every run is resumable (the sweep's run directories); the tables are written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import irm_lens
from irm_lens.analysis.prediction import check_prediction


def _plant(model, args, out: Path) -> irm_lens.PlantedOutlier:
    start = time.perf_counter()
    planted = irm_lens.plant_outlier(model, args.index, magnitude=args.magnitude,
                                     from_layer=args.from_layer, norm_weight=args.norm_weight)
    facts = dict(index=planted.index, from_layer=planted.from_layer, value=planted.value,
                 min_ratio=planted.min_ratio,
                 max_compensation_error=float(planted.compensation_error.max()),
                 loss_before=planted.loss_before, loss_after=planted.loss_after, kl=planted.kl,
                 seconds=time.perf_counter() - start)
    (out / "planted.json").write_text(json.dumps(facts, indent=2))
    print("planted: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in facts.items()), flush=True)
    signature = irm_lens.outlier_signature(model, args.index)
    signature.to_csv(out / "signature.csv", index=False)
    print(signature.round(2).to_string(index=False), flush=True)
    return planted


def _split(model, args, irm=None) -> pd.DataFrame:
    """A fixed push enters at ``from_layer`` (every norm that reads it from there is edited);
    an IRM pushes at its own layers."""
    split = irm_lens.norm_scale_split(model, args.index, alignment="anger", irm=irm,
                                      layer=None if irm is not None else args.from_layer,
                                      n_random=args.n_random, progress=False)
    print(split.finding(), flush=True)
    return split.summary()


def _runs(model, args, out: Path) -> pd.DataFrame:
    config = irm_lens.TrainConfig(lr=1e-3, max_steps=args.steps, max_length=64, eval_every=50,
                                  max_val_batches=4)
    runs = irm_lens.run_sweep(model, out / "sweep", args.alignments, args.layer_sets, (False,),
                              args.seeds, config=config, progress=False)
    forecasts = {a: irm_lens.predict_dominant(model, alignment=a, progress=False)
                 for a in args.alignments}
    rows, predictions, observed, splits = [], {}, {}, []
    for run in runs:
        irm = run.load_irm(model)
        outputs = irm_lens.collect_irm_outputs(model, irm, n_prompts=16, max_new_tokens=16,
                                               progress=False)
        mass = outputs.neuron_mass.double()
        share = mass / mass.sum()
        ranked = share.argsort(descending=True)
        predictions[run.name] = forecasts[run.alignment].for_layers(irm.config.layers)
        observed[run.name] = outputs.neuron_mass
        rows.append(dict(run=run.name, top=int(ranked[0]), planted_rank=int(
            (ranked == args.index).nonzero()[0, 0]) + 1, planted_share=float(share[args.index]),
            planted_x_uniform=float(share[args.index] * len(share)),
            top_x_uniform=float(share[ranked[0]] * len(share)),
            forecast_top=predictions[run.name].top))
        splits.append(_split(model, args, irm).assign(run=run.name))
        print(rows[-1], flush=True)
    check = check_prediction(predictions, observed)
    check.runs.to_csv(out / "forecast_check.csv", index=False)
    print(check.summary.to_string(index=False), flush=True)
    pd.concat(splits, ignore_index=True).to_csv(out / "norm_scale_by_run.csv", index=False)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=int, default=100)
    p.add_argument("--magnitude", type=float, default=3.0)
    p.add_argument("--from-layer", type=int, default=1)
    p.add_argument("--norm-weight", type=float, default=5e-5)
    p.add_argument("--alignments", default="anger,sadness")
    p.add_argument("--layer-sets", default="all,every4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n-random", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.alignments = args.alignments.split(",")
    args.layer_sets = args.layer_sets.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = irm_lens.load_model()
    planted = _plant(model, args, out)
    with planted.original_weights(model):
        print("unedited model:", end=" ")
        unedited = _split(model, args)
    print("planted model:", end=" ")
    pd.concat([unedited.assign(model="unedited"), _split(model, args).assign(model="planted")]
              ).to_csv(out / "norm_scale_fixed_push.csv", index=False)
    table = _runs(model, args, out)
    table.to_csv(out / "runs.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
