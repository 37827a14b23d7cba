"""The paper's grid of training runs (alignments x layer sets x L1 x seeds), run or resumed.

Each cell of the grid is an ordinary ``irm_lens.train`` run in its own directory under the
sweep directory, so an interrupted sweep continues where it stopped (finished runs are reused,
an interrupted one resumes from its last checkpoint), and a sweep can be fanned out as
independent jobs with ``shard=(i, n)``: job ``i`` of ``n`` trains every ``n``-th run. The
cross-run comparison lives in ``irm_lens.analysis.outputs.compare_runs``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch
from transformer_lens import HookedTransformer

from irm_lens.errors import ConfigError
from irm_lens.irm import IRM
from irm_lens.train import TrainConfig, paper_l1, train


@dataclass(frozen=True)
class SweepRun:
    """One cell of the grid and where its run directory is."""

    alignment: str
    layers: str
    l1: bool
    seed: int
    out_dir: Path

    @property
    def name(self) -> str:
        return self.out_dir.name

    @property
    def irm_path(self) -> Path:
        return self.out_dir / "irm.safetensors"

    @property
    def done(self) -> bool:
        """Whether the run has finished (its best IRM and final metrics table exist)."""
        return self.irm_path.exists() and (self.out_dir / "metrics.csv").exists()

    def load_irm(self, model: HookedTransformer) -> IRM:
        return IRM.load(self.irm_path, model)


def sweep_runs(
    out_dir: str | Path,
    alignments: Iterable[str] = ("anger", "sadness"),
    layer_sets: Iterable[str] = ("all", "every4"),
    l1: Iterable[bool] = (False,),
    seeds: Iterable[int] = (0, 1),
) -> list[SweepRun]:
    """The grid's runs in a fixed order, each with its run directory under ``out_dir``."""
    out_dir = Path(out_dir)
    runs = [
        SweepRun(a, ls, use_l1, seed, out_dir / f"{a}-{ls}-{'l1' if use_l1 else 'nol1'}-s{seed}")
        for a, ls, use_l1, seed in itertools.product(alignments, layer_sets, l1, seeds)
    ]
    if not runs:
        raise ConfigError("The sweep grid is empty: give at least one alignment, layer set and seed.")
    return runs


def run_sweep(
    model: HookedTransformer,
    out_dir: str | Path,
    alignments: Iterable[str] = ("anger", "sadness"),
    layer_sets: Iterable[str] = ("all", "every4"),
    l1: Iterable[bool] = (False,),
    seeds: Iterable[int] = (0, 1),
    *,
    config=None,
    preset: str = "small",
    zero_init_output: bool = True,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> list[SweepRun]:
    """Train (or resume, or reuse) every run of the grid that belongs to ``shard``.

    Args:
        model: The frozen host model.
        out_dir: The sweep directory; run ``{alignment}-{layers}-{l1|nol1}-s{seed}`` goes in its
            own subdirectory.
        alignments, layer_sets, l1, seeds: The grid (paper: 3 alignments x {all, q1..q4,
            every4} x L1 on/off). With L1 on the coefficient is ``paper_l1`` (1e-4 / n_layers).
        config: The ``TrainConfig`` shared by every run (its ``seed`` and ``l1`` are set per
            run). Default: a short run that fits a 2-core CPU (100 steps, 64 tokens, lr 1e-3).
        preset: IRM size preset.
        zero_init_output: Start each IRM at zero output.
        shard: ``(i, n)``: train only runs ``i, i+n, i+2n, ...`` (fan a sweep out as ``n`` jobs).
        progress: Progress bars.

    Returns:
        Every run of the grid (also those of other shards; check ``run.done``).
    """
    index, n_shards = shard
    if not (isinstance(n_shards, int) and n_shards >= 1 and 0 <= index < n_shards):
        raise ConfigError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}.")
    if config is None:
        config = TrainConfig(
            lr=1e-3, max_steps=100, max_length=64, eval_every=50, max_val_batches=4
        )
    runs = sweep_runs(out_dir, alignments, layer_sets, l1, seeds)
    for i, run in enumerate(runs):
        if i % n_shards != index or run.done:
            continue
        print(f"sweep run {i + 1}/{len(runs)}: {run.name}", flush=True)
        torch.manual_seed(run.seed)
        irm = IRM.for_model(
            model, layers=run.layers, preset=preset, zero_init_output=zero_init_output
        )
        run_config = replace(config, seed=run.seed, l1=paper_l1(irm.config) if run.l1 else 0.0)
        train(model, irm, run.alignment, run_config, out_dir=run.out_dir, progress=progress)
    return runs
