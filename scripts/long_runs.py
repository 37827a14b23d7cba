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
tables (``curves.csv``, ``forecast_by_step.csv``, ``runs.csv``), every checkpoint's per-index
mass (``masses.pt``) and one figure per run (``curve-<run>.html``) are written under ``--out``.
``--summarize DIR [DIR ...]`` reads those of one or more ``--out`` directories and prints, by
step, the runs' dominance, their agreement with each other (``cross_run_agreement``) and the
forecast's hits:

    python scripts/long_runs.py --summarize runs/long/s0 runs/long/s1 --out runs/long/summary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import irm_lens
from irm_lens.analysis.stats import spearman
from irm_lens.report.figures import dominance_curve_figure

# the steps the summary tables show
SUMMARY_STEPS = (100, 200, 500, 1000, 1500, 2000)


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
    rows["forecast_spearman"] = [spearman(forecast.scores, curve.mass_at(int(step)))
                                 for step in rows["step"]]
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


def summarize(dirs: list[Path], out: Path) -> None:
    """Print (and write under ``out``) the summary tables of finished ``--out`` directories."""
    curves = pd.concat(pd.read_csv(d / "curves.csv") for d in dirs)
    by_step = pd.concat(pd.read_csv(d / "forecast_by_step.csv") for d in dirs)
    masses = {name: saved for d in dirs for name, saved in torch.load(d / "masses.pt").items()}
    steps = [s for s in SUMMARY_STEPS if s in set(curves["step"])]
    growth = curves[curves.step.isin(steps)].pivot_table(
        index=["run", "view"], columns="step", values="ratio_to_uniform").round(2)
    tops = curves[curves.step.isin(steps)].pivot_table(
        index=["run", "view"], columns="step", values="top", aggfunc="first")
    forecast = by_step[by_step.step.isin(steps)].groupby("step").agg(
        named=("named", "sum"), n_runs=("run", "count"),
        median_rank_of_top=("forecast_rank_of_top", "median"),
        spearman=("forecast_spearman", "mean"))
    agreement = []
    for group, names in _groups(masses).items():
        rebuilt = {n: _rebuilt(curves[curves.run == n], n, masses[n]["mass"]) for n in names}
        agreement.append(irm_lens.cross_run_agreement(rebuilt).assign(runs=group))
    agreement = pd.concat(agreement)
    agreement = agreement[agreement.step.isin(steps)]
    out.mkdir(parents=True, exist_ok=True)
    for name, table in dict(growth=growth, tops=tops, forecast=forecast,
                            agreement=agreement).items():
        table.to_csv(out / f"{name}.csv")
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(f"\n{name}:\n{table.round(3).to_string()}")


def _rebuilt(table: pd.DataFrame, name: str, mass: torch.Tensor) -> irm_lens.DominanceCurve:
    """A saved curve, enough of it for ``cross_run_agreement`` (its steps and masses)."""
    return irm_lens.DominanceCurve(table, Path(name), (), mass.shape[1], (), mass)


def _groups(masses: dict) -> dict[str, list[str]]:
    """The runs compared with each other: all of them, those of each alignment, and those of
    each alignment and layer set (the seeds of one setting)."""
    groups = {"every run": sorted(masses)}
    for name in sorted(masses):  # e.g. anger-every4-nol1-s0
        groups.setdefault(name.split("-")[0], []).append(name)
        groups.setdefault(name.rsplit("-", 2)[0], []).append(name)
    return {g: names for g, names in groups.items() if len(names) >= 2}


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
    p.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="DIR",
                   help="train nothing: summarize these finished --out directories")
    args = p.parse_args()
    out = Path(args.out)
    if args.summarize:
        return summarize(args.summarize, out)
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
    curves, by_step, finals, masses = [], [], [], {}
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
        masses[run.name] = dict(steps=curve.steps, mass=curve.mass)
        torch.save(masses, out / "masses.pt")
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
