"""Long IRM runs and their dominance curves (docs/findings-smollm2.md, "Training length").

Train the sweep's small IRMs for ``--steps`` steps, keeping every checkpoint, on the embedded
model or on the planted model (``--plant INDEX``: ``plant_outlier`` at its defaults, as
scripts/planted_organism.py), then read each run's dominance curve from its checkpoints
(``dominance_curve``, nothing retrained) and ask: does the top index's share grow with steps,
which index wins at the end, and does the frozen-model forecast name the top index more often as
the run gets longer?

    python scripts/long_runs.py --steps 2000 --batch-size 2 --alignments anger \\
        --layer-sets every4 --plant 100 --out runs/long/planted

Runs resume from their checkpoints (the sweep's run directories under ``--out/sweep``); the
tables (``curves.csv``, ``forecast_by_step.csv``, ``runs.csv``) and one figure per run
(``curve-<run>.html``) are written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import irm_lens
from irm_lens.report.figures import dominance_curve_figure


def _plant(model, index: int, out: Path) -> None:
    planted = irm_lens.plant_outlier(model, index)
    facts = dict(index=index, value=planted.value, loss_before=planted.loss_before,
                 loss_after=planted.loss_after, kl=planted.kl)
    (out / "planted.json").write_text(json.dumps(facts, indent=2))
    print("planted: " + ", ".join(f"{k} {v:.4g}" for k, v in facts.items()), flush=True)


def _forecast_by_step(curve: irm_lens.DominanceCurve, forecast) -> pd.DataFrame:
    """At each checkpoint: the abs view's top index, the forecast's top-1, and the rank the
    forecast gives the observed top (1: named)."""
    ranking = forecast.ranking
    rows = curve.view("abs")[["step", "top", "ratio_to_uniform"]].copy()
    rows["forecast_top"] = forecast.top
    rows["forecast_rank_of_top"] = [ranking.index(int(t)) + 1 for t in rows["top"]]
    rows["named"] = rows["top"] == forecast.top
    return rows


def _final_row(name: str, curve: irm_lens.DominanceCurve, forecast, seconds: float) -> dict:
    last = {view: curve.view(view).iloc[-1] for view in ("abs", "signed", "bias")}
    row = dict(run=name, steps=int(last["abs"]["step"]), train_s=round(seconds),
               settled_step=curve.settled_step("abs"), forecast_top=forecast.top)
    for view, r in last.items():
        row |= {f"{view}_top": int(r["top"]), f"{view}_x_uniform": float(r["ratio_to_uniform"]),
                f"{view}_margin": float(r["margin"])}
        if "tracked" in r:
            row |= {f"{view}_tracked_rank": int(r["tracked_rank"]),
                    f"{view}_tracked_x_uniform": float(r["tracked_share"]) * curve.d_model}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alignments", default="anger,sadness")
    p.add_argument("--layer-sets", default="all,every4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--plant", type=int, default=None,
                   help="plant a 1512-like outlier at this index first (and track it)")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    model = irm_lens.load_model()
    if args.plant is not None:
        _plant(model, args.plant, out)
    # the sweep's short-run settings, run for longer: no early stop, every checkpoint kept
    config = irm_lens.TrainConfig(
        lr=1e-3, max_steps=args.steps, batch_size=args.batch_size, max_length=64,
        eval_every=args.checkpoint_every, max_val_batches=4, patience=args.steps,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=0,
    )
    alignments = args.alignments.split(",")
    forecasts = {a: irm_lens.predict_dominant(model, alignment=a, progress=False)
                 for a in alignments}
    curves, by_step, finals = [], [], []
    for run in irm_lens.sweep_runs(out / "sweep", alignments, args.layer_sets.split(","),
                                   (False,), [int(s) for s in args.seeds.split(",")]):
        start = time.perf_counter()
        irm_lens.run_sweep(model, out / "sweep", (run.alignment,), (run.layers,), (False,),
                           (run.seed,), config=config, progress=False)
        seconds = time.perf_counter() - start
        curve = irm_lens.dominance_curve(model, run.out_dir, n_prompts=args.n_prompts,
                                         max_new_tokens=args.max_new_tokens, track=args.plant,
                                         progress=False)
        forecast = forecasts[run.alignment].for_layers(curve.layers)
        curves.append(curve.table.assign(run=run.name))
        by_step.append(_forecast_by_step(curve, forecast).assign(run=run.name))
        finals.append(_final_row(run.name, curve, forecast, seconds))
        dominance_curve_figure(curve).write_html(out / f"curve-{run.name}.html",
                                                 include_plotlyjs=True)
        print(pd.DataFrame([finals[-1]]).round(3).to_string(index=False), flush=True)
        pd.concat(curves).to_csv(out / "curves.csv", index=False)
        pd.concat(by_step).to_csv(out / "forecast_by_step.csv", index=False)
        pd.DataFrame(finals).to_csv(out / "runs.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(pd.DataFrame(finals).round(3).to_string(index=False))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
