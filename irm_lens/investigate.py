"""The main job: the paper's investigation end to end, in one call.

Alignment data -> train an IRM (resumable) -> its outputs, striations and dominant neuron ->
every analysis of that neuron -> the steered generations measured -> one HTML report. Each stage
prints what it did and how long it took; the stage times are kept in the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from irm_lens.analysis.dossier import NeuronDossier, explain
from irm_lens.analysis.outputs import (
    DominantNeurons,
    IRMOutputs,
    collect_irm_outputs,
    dominant_neurons,
)
from irm_lens.evaluate import EvalResult, evaluate
from irm_lens.irm import IRM
from irm_lens.report import report
from irm_lens.train import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class InvestigationSettings:
    """How big each stage is. The defaults fit a 2-core CPU and the embedded model (about 7
    minutes, see README); raise them on a GPU (e.g. ``preset="paper"``, more steps and prompts).
    """

    alignment: str = "anger"
    layers: str = "all"
    preset: str = "small"
    steps: int = 100
    lr: float = 1e-3
    max_length: int = 64
    batch_size: int = 8
    seed: int = 0
    n_prompts: int = 12
    max_new_tokens: int = 20
    n_random: int = 4
    eval_prompts: int = 16


@dataclass
class Investigation:
    """Everything the main job produced, and where it wrote it."""

    out_dir: Path
    report_path: Path
    training: TrainResult | None  # None when an IRM was given
    outputs: IRMOutputs
    dominant: DominantNeurons
    dossier: NeuronDossier
    evaluation: EvalResult
    stage_seconds: dict[str, float] = field(default_factory=dict)


def investigate(
    model: HookedTransformer,
    out_dir: str | Path = "runs/main",
    settings: InvestigationSettings = InvestigationSettings(),
    *,
    irm: IRM | None = None,
    progress: bool = True,
) -> Investigation:
    """Train an IRM toward ``settings.alignment`` and explain the neuron it relies on.

    Args:
        model: The frozen host model.
        out_dir: Where the run directory (``out_dir/irm``) and ``report.html`` go. Running the
            same call again resumes or reuses the training run.
        settings: Sizes of every stage.
        irm: A trained IRM to investigate instead of training one.
        progress: Progress bars and stage lines.
    """
    out_dir = Path(out_dir)
    s = settings
    times: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        times[name] = time.perf_counter() - start
        if progress:
            print(f"[{name}] done in {times[name]:.0f} s", flush=True)

    t = time.perf_counter()
    if irm is None:
        torch.manual_seed(s.seed)
        irm = IRM.for_model(model, layers=s.layers, preset=s.preset, zero_init_output=True)
        config = TrainConfig(lr=s.lr, max_steps=s.steps, max_length=s.max_length,
                             batch_size=s.batch_size, eval_every=max(1, s.steps // 2),
                             max_val_batches=4, seed=s.seed)
        training = train(model, irm, s.alignment, config, out_dir=out_dir / "irm",
                         progress=progress)
        irm = training.irm
        if progress:
            print(f"validation loss {training.baseline_val_loss:.3f} without the IRM -> "
                  f"{training.best_val_loss:.3f} with it ({training.stop_reason})")
    else:
        training = None
    stage("train", t)

    t = time.perf_counter()
    outputs = collect_irm_outputs(model, irm, n_prompts=s.n_prompts,
                                  max_new_tokens=s.max_new_tokens, per_token=True,
                                  progress=progress)
    dominant = dominant_neurons(outputs)
    stage("IRM outputs", t)
    if progress:
        print(f"dominant neuron: {dominant.top} "
              f"({dominant.table['share'].iloc[0]:.2%} of the IRM's |output|)")

    t = time.perf_counter()
    dossier = explain(model, dominant.top, irm, s.alignment, list(outputs.prompts),
                      n_random=s.n_random, max_new_tokens=s.max_new_tokens, outputs=outputs,
                      progress=progress)
    stage("analyses", t)

    t = time.perf_counter()
    evaluation = evaluate(model, irm, s.alignment, n_prompts=s.eval_prompts,
                          max_new_tokens=s.max_new_tokens, progress=progress)
    stage("evaluation", t)
    if progress:
        print(evaluation.verdict)

    t = time.perf_counter()
    notes = [
        f"The main job on {model.cfg.model_name}: an IRM trained toward {s.alignment} "
        f"({s.preset} preset, layers {s.layers}, {s.steps} steps), its dominant neuron "
        f"{dominant.top} analysed against {s.n_random} random indices.",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".",
    ]
    path = report(
        out_dir / "report.html", title=f"irm_lens: {s.alignment} on {model.cfg.model_name}",
        run_dir=training.out_dir if training is not None else None, outputs=outputs,
        dossier=dossier, evaluation=evaluation, notes=notes,
    )
    stage("report", t)
    return Investigation(out_dir, path, training, outputs, dominant, dossier, evaluation, times)
