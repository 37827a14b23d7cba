"""The ``irm-lens`` command line: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from irm_lens._io import atomic_write_json, atomic_write_text
from irm_lens.analysis.dossier import explain
from irm_lens.analysis.outputs import collect_irm_outputs, compare_runs, dominant_neurons
from irm_lens.analysis.prediction import predict_dominant, validate_prediction
from irm_lens.compare import compare_steering
from irm_lens.data.corpora import BUILTIN_ALIGNMENTS, neutral_prompts
from irm_lens.data.dataset import load_texts
from irm_lens.data.precomputed import ENV_SWITCH
from irm_lens.data.synthetic import SYNTHETIC_METHODS, generate_synthetic, read_synthetic
from irm_lens.errors import ConfigError, IRMLensError
from irm_lens.evaluate import evaluate
from irm_lens.generation import compare_generations
from irm_lens.investigate import InvestigationSettings, investigate
from irm_lens.irm import IRM, IRM_PRESETS, STEER_MODES
from irm_lens.models import load_model
from irm_lens.objectives import OBJECTIVES
from irm_lens.pairs import generate_pairs, read_pairs
from irm_lens.recipes import RECIPES, train_recipe
from irm_lens.report import report
from irm_lens.report.figures import dose_response_figure
from irm_lens.steering import (
    ACTADD_PAIRS,
    Prompting,
    SteeringVector,
    actadd_vector,
    mean_difference_vector,
    warm_start,
)
from irm_lens.sweeps import run_sweep
from irm_lens.train import TrainConfig, paper_l1, train

DEFAULT_PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of the new office?",
    "Describe the weather today.",
    "How was the meeting this morning?",
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model name or path (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    parser.add_argument(
        "--allow-download", action="store_true", help="let Hugging Face fetch missing weights"
    )
    parser.add_argument(
        "--recompute", action="store_true",
        help=f"compute what the embedded model's shipped precomputed results hold (reference "
             f"margins, CAA means, the baselines' replies) instead of reading them "
             f"({ENV_SWITCH}=0 does the same)",
    )


def _load(args: argparse.Namespace):
    if args.recompute:  # read by every lookup of irm_lens.data.precomputed in this process
        os.environ[ENV_SWITCH] = "0"
    return load_model(
        args.model, dtype=_DTYPES[args.dtype], device=args.device, allow_download=args.allow_download
    )


def _cmd_run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model = _load(args)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model "
          f"{model.cfg.d_model}, {args.dtype}, {model.cfg.device}) loaded in "
          f"{time.perf_counter() - start:.1f} s")
    settings = InvestigationSettings(
        alignment=args.alignment, recipe=args.recipe, pairs=args.pairs, layers=args.layers,
        preset=args.preset, steps=args.steps, seed=args.seed, n_prompts=args.n_prompts,
        max_new_tokens=args.max_new_tokens, n_random=args.n_random,
        eval_prompts=args.eval_prompts,
    )
    irm = IRM.load(args.irm, model) if args.irm else None
    result = investigate(model, args.out, settings, irm=irm)
    print(f"\nreport: {result.report_path.resolve()}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model = _load(args)
    print(
        f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model},"
        f" {args.dtype}, {model.cfg.device}) loaded in {time.perf_counter() - start:.1f} s"
    )
    if args.irm:
        irm = IRM.load(args.irm, model)
        origin = f"loaded from {args.irm}"
    else:
        torch.manual_seed(args.seed)
        irm = IRM.for_model(model, layers=args.layers, preset=args.preset)
        origin = f"untrained (random init, seed {args.seed}): expect noise, not an alignment"
    print(
        f"IRM: {origin}; reads {irm.config.read_site}, writes {irm.config.inject_site} of "
        f"{irm.config.n_injected} layers, {irm.config.n_params:,} parameters, scale {args.scale}"
    )
    if args.save_irm:
        print(f"IRM saved to {irm.save(args.save_irm)}")
    prompts = args.prompt or DEFAULT_PROMPTS
    generations = compare_generations(
        model,
        irm,
        prompts,
        scale=args.scale,
        chat=not args.no_chat,
        max_new_tokens=args.max_new_tokens,
    )
    for g in generations:
        print(f"\n>>> {g.prompt}\n  IRM off: {g.unsteered!r}\n  IRM on:  {g.steered!r}")
    if args.out:
        record = {
            "model": model.cfg.model_name,
            "irm_config": irm.config.to_dict(),
            "irm_origin": origin,
            "scale": args.scale,
            "generations": [asdict(g) for g in generations],
        }
        print(f"\nresults written to {atomic_write_json(args.out, record)}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.max_per_opening is not None and not args.synthetic:
        raise ConfigError("--max-per-opening caps the rows of a --synthetic file; give --synthetic.")
    if _uses_recipe(args):
        return _train_recipe(args)
    model = _load(args)
    torch.manual_seed(args.seed)
    irm = IRM.for_model(
        model, layers=args.layers, preset=args.preset, zero_init_output=args.zero_init,
        steer=args.steer,
    )
    if args.warm_start:
        warm_start(irm, SteeringVector.load(args.warm_start, model))
    if args.pairs:
        data = read_pairs(args.pairs, degenerate=args.with_degenerate)
    elif args.synthetic:
        # With --chat each answer is the reply to its own question, as evaluate() asks it.
        data = read_synthetic(args.synthetic, pairs=args.chat, max_per_opening=args.max_per_opening)
    elif args.data:
        data = load_texts(args.data, text_column=args.text_column,
                          prompt_column=args.prompt_column)
    else:
        data = args.alignment
    l1 = paper_l1(irm.config) if args.l1 == "paper" else float(args.l1)
    config = _train_config(args, l1=l1)
    source = args.pairs or args.synthetic or args.data or args.alignment
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # torchrun
    say(f"training a {irm.config.n_params:,}-parameter IRM on {source} "
        f"({irm.config.n_injected} layers, l1 {l1:g}) into {args.out}")
    result = train(model, irm, data, config, out_dir=args.out, resume=not args.no_resume)
    say(
        f"{result.stop_reason}; {result.steps} steps in {result.wall_time_s:.0f} s\n"
        f"validation loss {result.baseline_val_loss:.4f} without the IRM -> "
        f"{result.best_val_loss:.4f} with it (step {result.best_step}; perplexity "
        f"{result.baseline_val_perplexity:.2f} -> {result.val_perplexity:.2f})\n"
        f"best IRM: {result.out_dir / 'irm.safetensors'}"
    )
    return 0


# What a recipe fixes: set any of these and the recipe would silently drop it.
_RECIPE_FIXES = ("layers", "preset", "zero_init", "warm_start", "steer", "l1", "objective", "beta",
                 "chosen_lm", "kl", "entropy", "epochs", "batch_size", "max_length", "lr",
                 "eval_every", "max_val_batches", "checkpoint_every", "keep_checkpoints", "chat")


def _uses_recipe(args: argparse.Namespace) -> bool:
    """Whether ``train`` runs a named recipe: ``--recipe NAME``, or by default a bare
    ``--alignment`` run (no IRM or optimisation option given: those choose a run of your own)."""
    defaults = build_parser().parse_args(["train", "--alignment", "x", "--out", "x"])
    changed = [f"--{k.replace('_', '-')}" for k in _RECIPE_FIXES
               if getattr(args, k) != getattr(defaults, k)]
    if args.recipe in (None, "none"):
        return args.recipe is None and bool(args.alignment) and not changed
    if not args.alignment:
        raise ConfigError(f"--recipe {args.recipe} trains toward a built-in --alignment; drop "
                          "--recipe to train on --data, --synthetic or --pairs.")
    if changed:
        raise ConfigError(f"The {args.recipe!r} recipe fixes {', '.join(changed)}; drop --recipe "
                          "(or pass --recipe none) to choose them yourself.")
    return True


def _train_recipe(args: argparse.Namespace) -> int:
    """``train --alignment A [--recipe R]``: the named recipe, with only --steps and --seed."""
    args.recipe = args.recipe or "preference"
    print(f"training with the {args.recipe!r} recipe (irm_lens.recipes.RECIPES) into {args.out}")
    result = train_recipe(_load(args), args.alignment, args.out, recipe=args.recipe,
                          seed=args.seed, steps=args.steps)
    print(f"{result.stop_reason}; {result.steps} steps in {result.wall_time_s:.0f} s\n"
          f"validation loss {result.baseline_val_loss:.4f} without the IRM -> "
          f"{result.best_val_loss:.4f} with it (step {result.best_step})\n"
          f"best IRM: {result.out_dir / 'irm.safetensors'}\n"
          "doses: " + ", ".join(f"{name} {dose:.3g}" for name, dose in result.doses.items())
          + " (steer each decoding at its dose: --scale in evaluate is a multiple of the greedy"
          " one)")
    return 0


def _train_config(args: argparse.Namespace, **overrides):
    """The TrainConfig of the optimisation options shared by ``train`` and ``sweep``."""
    values = dict(
        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        max_epochs=args.epochs, max_steps=args.steps, eval_every=args.eval_every,
        max_val_batches=args.max_val_batches, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, chat_prompts=args.chat,
        objective=args.objective, beta=args.beta, chosen_lm=args.chosen_lm, kl=args.kl,
        entropy=args.entropy,
    )
    return TrainConfig(**{**values, **overrides})


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ConfigError(f"--l1 takes on, off or off,on; got {text!r}.")
    return text == "on"


def _cmd_sweep(args: argparse.Namespace) -> int:
    model = _load(args)
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    if len(shard) != 2:
        raise ConfigError(f"--shard must look like 0/2, got {args.shard!r}.")
    runs = run_sweep(
        model, args.out, args.alignments.split(","), args.layer_sets.split(","),
        [_on_off(x) for x in args.l1.split(",")],
        [int(s) for s in args.seeds.split(",")],
        config=_train_config(args), preset=args.preset, zero_init_output=not args.no_zero_init,
        shard=shard,
    )
    done = [r for r in runs if r.done]
    print(f"{len(done)} of {len(runs)} runs finished under {args.out}")
    for run in runs:
        print(f"  {'done ' if run.done else 'todo '} {run.name}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    model = _load(args)
    root = Path(args.sweep)
    dirs = sorted(p.parent for p in root.glob("*/irm.safetensors"))
    if args.runs:
        dirs = [root / name for name in args.runs.split(",")]
    if len(dirs) < 2:
        raise ConfigError(f"{root} holds {len(dirs)} finished run(s); comparing needs two.")
    outputs = {}
    for d in dirs:
        irm = IRM.load(d / "irm.safetensors", model)
        outputs[d.name] = collect_irm_outputs(
            model, irm, n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens
        )
    result = compare_runs(outputs, k=args.k)
    _print_frames(result.runs, result.pairs, result.consensus)
    print(f"\nsame top index in every run: {result.same_top1}")
    if args.out:
        _write_tables(args.out, {n: getattr(result, n) for n in ("runs", "pairs", "consensus")})
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.model_name:
        if args.model and args.model != args.model_name:
            raise ConfigError(f"Two models given: {args.model_name!r} and --model {args.model!r}.")
        args.model = args.model_name
    model = _load(args)
    if args.validate:
        check, predictions = validate_prediction(
            model, args.validate, train=args.train, alignments=args.alignments.split(","),
            layer_sets=args.layer_sets.split(","), seeds=[int(s) for s in args.seeds.split(",")],
            k=args.k, n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
            n_texts=args.n_texts,
        )
        name, first = next(iter(predictions.items()))
        print(f"forecast for {name} (each run is forecast from its alignment's texts and layers):")
        _print_frames(first.table(args.k), check.runs, check.summary)
        print(f"\npredicted top index = observed top index in {check.hits()} of "
              f"{len(predictions)} runs")
        if args.out:
            _write_tables(args.out, {"runs": check.runs, "summary": check.summary})
        return 0
    texts = None
    if args.texts:
        texts = load_texts(args.texts, text_column=args.text_column)
    prediction = predict_dominant(
        model, texts, args.k, alignment=args.alignment, layers=args.layers, n_texts=args.n_texts,
        batch_size=args.batch_size, max_length=args.max_length,
    )
    table = prediction.table(args.k)
    _print_frames(table)
    print("\n" + prediction.summary())
    if args.out:
        _write_tables(args.out, {"prediction": prediction.table(model.cfg.d_model)})
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    model = _load(args)
    irm = IRM.load(args.irm, model) if args.irm else None
    neuron = args.neuron
    if neuron is None:
        if irm is None:
            raise ConfigError("Give --neuron, or --irm to explain that IRM's dominant neuron.")
        neuron = dominant_neurons(collect_irm_outputs(model, irm, n_prompts=args.n_prompts)).top
        print(f"the IRM's dominant neuron: {neuron}")
    dossier = explain(
        model, neuron, irm, args.alignment, n_prompts=args.n_prompts, n_random=args.n_random,
        generate=args.generate,
    )
    with _pd_options():
        print(dossier.summary_frame().to_string())
        print("\nnorm weights:")
        print(dossier.norms.profile(neuron).round(4).to_string(index=False))
        print("\nablation:")
        print(dossier.ablation.summary().round(4).to_string(index=False))
        if dossier.patching is not None:
            print("\npatching (all layers):")
            print(dossier.patching.summary().round(4).to_string(index=False))
        print("\ntokens a push on this index promotes:")
        print(" ".join(repr(t) for t in dossier.attribution.promoted["token"]))
    if args.out:
        tables = {
            "summary": dossier.summary_frame().reset_index(names="measure"),
            "norms": dossier.norms.profile(neuron),
            "magnitudes": dossier.magnitudes.profile(neuron),
            "ablation": dossier.ablation.table,
        }
        if dossier.patching is not None:
            tables["patching"] = dossier.patching.table
        _write_tables(args.out, tables)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    model = _load(args)
    run_dir = Path(args.run)
    irm = IRM.load(run_dir / "irm.safetensors", model)
    alignment = args.alignment or _run_alignment(run_dir)
    outputs = collect_irm_outputs(model, irm, n_prompts=args.n_prompts,
                                  max_new_tokens=args.max_new_tokens, per_token=True)
    neuron = args.neuron if args.neuron is not None else dominant_neurons(outputs).top
    dossier = explain(model, neuron, irm, alignment, list(outputs.prompts),
                      n_random=args.n_random, max_new_tokens=args.max_new_tokens, outputs=outputs)
    comparison = None
    if args.sweep:
        runs = sorted(p.parent for p in Path(args.sweep).glob("*/irm.safetensors"))
        comparison = compare_runs({
            d.name: collect_irm_outputs(model, IRM.load(d / "irm.safetensors", model),
                                        n_prompts=args.n_prompts,
                                        max_new_tokens=args.max_new_tokens)
            for d in runs
        })
    evaluation = None
    if args.eval_prompts > 0:
        evaluation = evaluate(model, irm, alignment, n_prompts=args.eval_prompts,
                              max_new_tokens=args.max_new_tokens)
    path = report(args.out, title=args.title or f"irm_lens: {run_dir.name}", run_dir=run_dir,
                  outputs=outputs, dossier=dossier, comparison=comparison, evaluation=evaluation)
    print(f"report: {path.resolve()}")
    return 0


def _run_alignment(run_dir) -> str:
    """The built-in alignment a run directory was trained on (from its run.json)."""
    description = json.loads((run_dir / "run.json").read_text())["data"].get("description", "")
    if description not in BUILTIN_ALIGNMENTS:
        raise ConfigError(f"{run_dir} was not trained on a built-in alignment ({description!r}); "
                          "give --alignment.")
    return description


def _cmd_evaluate(args: argparse.Namespace) -> int:
    model = _load(args)
    result = evaluate(
        model, _intervention(args, model), args.alignment, args.prompt, n_prompts=args.n_prompts,
        first_prompt=args.first_prompt, max_new_tokens=args.max_new_tokens,
        n_sampled=args.n_sampled, scale=args.scale,
        seed=args.seed,
    )
    _print_frames(result.summary, result.lift)
    print(f"\n{result.verdict}")
    if args.out:
        _write_tables(args.out, {n: getattr(result, n) for n in ("samples", "summary", "lift")})
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    model = _load(args)
    result = generate_synthetic(
        model, args.alignment, args.out, n_rows=args.rows, seed=args.seed,
        max_new_tokens=args.max_new_tokens, min_score=args.min_score, method=args.method,
        baseline_quantile=args.baseline_quantile, batch_size=args.batch_size,
        max_attempts=args.max_attempts, over=[e for e in args.over.split(",") if e],
    )
    print(
        f"{result.n_kept} rows kept of {result.n_resumed + result.n_generated} in {result.path} "
        f"({result.n_generated} generated now, {result.n_resumed} by an earlier run); "
        f"train on them with: irm-lens train --synthetic {result.path} --chat ..."
    )
    return 0


def _write_tables(out_dir: str, tables: dict) -> None:
    """Write each DataFrame as ``{name}.csv`` under ``out_dir`` (atomically) and say where."""
    for name, frame in tables.items():
        atomic_write_text(Path(out_dir) / f"{name}.csv", frame.to_csv(index=False))
    print(f"tables written to {out_dir}")


def _print_frames(*frames) -> None:
    """Print DataFrames (rounded to 4 digits) one after another, separated by blank lines."""
    with _pd_options():
        print("\n\n".join(f.round(4).to_string(index=False) for f in frames))


def _pd_options():
    return pd.option_context("display.width", 200, "display.max_columns", 30)


def _add_intervention_args(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--irm", help="a trained IRM (.safetensors or its run directory)")
    which.add_argument("--vector", help="a steering vector from `irm-lens vector`")
    which.add_argument("--prompting", action="store_true",
                       help="no intervention: the alignment's persona as a system prompt")


def _intervention(args: argparse.Namespace, model):
    """The IRM, steering vector or persona that ``--irm`` / ``--vector`` / ``--prompting`` name."""
    if args.irm:
        return IRM.load(args.irm, model)
    if args.vector:
        return SteeringVector.load(args.vector, model)
    return Prompting.persona(args.alignment)


def _cmd_vector(args: argparse.Namespace) -> int:
    model = _load(args)
    start = time.perf_counter()
    if args.method == "caa":
        vector = mean_difference_vector(
            model, args.alignment, args.negative, layers=args.layers, positions=args.positions,
            scale=args.scale, n_texts=args.n_texts,
        )
    else:
        if args.alignment not in ACTADD_PAIRS and not (args.positive_prompt and args.negative_prompt):
            raise ConfigError(f"No built-in ActAdd pair for {args.alignment!r}; give "
                              "--positive-prompt and --negative-prompt.")
        default = ACTADD_PAIRS.get(args.alignment, ("", ""))
        vector = actadd_vector(
            model, args.positive_prompt or default[0], args.negative_prompt or default[1],
            layers=args.layers, positions=args.positions, scale=args.scale,
        )
    path = vector.save(args.out)
    norms = ", ".join(f"{n:.1f}" for n in vector.vectors.norm(dim=-1).tolist())
    print(f"{vector} ({vector.config.description}; norm {norms}) built in "
          f"{time.perf_counter() - start:.0f} s: {path}")
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.first_prompt < 0:
        raise ConfigError(f"--first-prompt must be >= 0, got {args.first_prompt}.")
    first = args.first_prompt
    questions = neutral_prompts(split="train")[first : first + args.n_prompts]
    table = generate_pairs(
        model, _intervention(args, model), args.alignment, args.out, prompts=questions,
        n_sampled=args.n_sampled, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    print(f"{int(table.kept.sum())} pairs kept of {len(table)} questions in {args.out}; train "
          f"with: irm-lens train --pairs {args.out} --objective preference ...")
    return 0


def named_values(values: list[str] | None, flag: str, what: str = "PATH") -> dict[str, str]:
    """Repeated ``flag NAME=VALUE`` options as a dict (``what`` names the value in the error)."""
    named = {}
    for value in values or []:
        name, sep, text = value.partition("=")
        if not sep or not name or not text:
            raise ConfigError(f"{flag} takes NAME={what}, got {value!r}.")
        named[name] = text
    return named


def _cmd_compare_steering(args: argparse.Namespace) -> int:
    model = _load(args)
    interventions = {n: IRM.load(p, model) for n, p in named_values(args.irm, "--irm").items()}
    interventions.update({n: SteeringVector.load(p, model)
                          for n, p in named_values(args.vector, "--vector").items()})
    if args.prompting:
        interventions["prompting"] = Prompting.persona(args.alignment)
    scales = {}
    for name, values in named_values(args.scales, "--scales").items():
        try:
            scales[name] = [float(x) for x in values.split(",")]
        except ValueError as exc:
            raise ConfigError(f"--scales {name}=... takes numbers separated by commas.") from exc
    unknown = set(scales) - set(interventions)
    if unknown:
        raise ConfigError(f"--scales names {sorted(unknown)}, which are not interventions here.")
    result = compare_steering(
        model, interventions, args.alignment, scales=scales, n_prompts=args.n_prompts,
        first_prompt=args.first_prompt, max_new_tokens=args.max_new_tokens,
        n_sampled=args.n_sampled, seed=args.seed,
    )
    _print_frames(result.table.drop(columns=["off"]))
    if args.out:
        _write_tables(args.out, {"comparison": result.table, "samples": result.samples})
        figure = dose_response_figure(result)
        atomic_write_text(Path(args.out) / "dose_response.html",
                          figure.to_html(include_plotlyjs=True, full_html=True))
    return 0


def _add_steering_parsers(sub) -> None:
    """The baselines' commands: ``vector``, ``pairs``, ``compare-steering``."""
    vec = sub.add_parser("vector", help="build a steering vector (CAA or ActAdd) as a baseline")
    _add_model_args(vec)
    vec.add_argument("--method", default="caa", choices=("caa", "actadd"))
    vec.add_argument("--alignment", required=True, help="the built-in texts of the tone (caa)")
    vec.add_argument("--negative", default="neutral", help="the texts to contrast with (caa)")
    vec.add_argument("--n-texts", type=int, default=200, help="texts of each set (caa)")
    vec.add_argument("--positive-prompt", help="ActAdd's prompt of the tone")
    vec.add_argument("--negative-prompt", help="ActAdd's opposite prompt")
    vec.add_argument("--layers", default="12", help="a layer set: 12, 6,12, every4, ...")
    vec.add_argument("--positions", default="all", choices=("all", "generated"))
    vec.add_argument("--scale", type=float, default=4.0)
    vec.add_argument("--out", required=True, help="the .safetensors file to write")
    vec.set_defaults(func=_cmd_vector)

    pa = sub.add_parser("pairs", help="preference pairs: questions answered steered and unsteered")
    _add_model_args(pa)
    _add_intervention_args(pa)
    pa.add_argument("--alignment", required=True)
    pa.add_argument("--n-prompts", type=int, default=300, help="training questions to answer")
    pa.add_argument("--first-prompt", type=int, default=0,
                    help="start this far into the training questions (extend an earlier file)")
    pa.add_argument("--n-sampled", type=int, default=2, help="sampled candidates per question")
    pa.add_argument("--max-new-tokens", type=int, default=40)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--out", required=True, help="the .jsonl file to write")
    pa.set_defaults(func=_cmd_pairs)

    cs = sub.add_parser(
        "compare-steering",
        help="IRMs, steering vectors and prompting on the same prompts: one table, dose-response",
    )
    _add_model_args(cs)
    cs.add_argument("--alignment", required=True)
    cs.add_argument("--irm", action="append", metavar="NAME=PATH", help="an IRM (repeatable)")
    cs.add_argument("--vector", action="append", metavar="NAME=PATH",
                    help="a steering vector (repeatable)")
    cs.add_argument("--prompting", action="store_true", help="add the persona prompt as a row")
    cs.add_argument("--scales", action="append", metavar="NAME=S1,S2",
                    help="the scales of one intervention (default 1)")
    cs.add_argument("--n-prompts", type=int, default=40)
    cs.add_argument("--first-prompt", type=int, default=0)
    cs.add_argument("--n-sampled", type=int, default=1)
    cs.add_argument("--max-new-tokens", type=int, default=40)
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--out", help="directory for comparison.csv, samples.csv, dose_response.html")
    cs.set_defaults(func=_cmd_compare_steering)


def _cmd_info(args: argparse.Namespace) -> int:
    model = _load(args)
    cfg = model.cfg
    fields = ("model_name", "n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head",
              "d_mlp", "d_vocab", "n_ctx", "eps", "rotary_base", "dtype", "device")
    for name in fields:
        print(f"{name:>18}: {getattr(cfg, name)}")
    return 0


_LAYER_SETS = "all, q1..q4, every4, 2-5, 3,7"


def _add_irm_args(
    parser: argparse.ArgumentParser, *, layers: str | None = "all", preset: str | None = "paper",
    seed: int = 0, layers_help: str = _LAYER_SETS, preset_help: str | None = None,
) -> None:
    """``--layers``, ``--preset`` and ``--seed`` of the IRM a command builds."""
    parser.add_argument("--layers", default=layers, help=layers_help)
    parser.add_argument("--preset", default=preset, choices=sorted(IRM_PRESETS), help=preset_help)
    parser.add_argument("--seed", type=int, default=seed,
                        help="seeds the IRM's initialisation and the run's randomness")


def _add_optimisation_args(
    parser: argparse.ArgumentParser, steps: int | None = None, max_length: int = 128,
    lr: float = 1e-4, eval_every: int | None = None, max_val_batches: int | None = None,
) -> None:
    """Options of the training loop, shared by ``train`` and ``sweep``."""
    parser.add_argument("--steps", type=int, default=steps, help="max optimizer steps")
    parser.add_argument("--epochs", type=int, default=15, help="max epochs (paper: 15)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--eval-every", type=int, default=eval_every,
                        help="steps (default: per epoch)")
    parser.add_argument("--max-val-batches", type=int, default=max_val_batches)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="step checkpoints kept on disk (0: every one, for dominance_curve)")
    parser.add_argument("--objective", default="lm", choices=OBJECTIVES,
                        help="lm: cross-entropy on the texts (the paper); preference: DPO on "
                             "(prompt, chosen, rejected) pairs (--pairs) against the unsteered model")
    parser.add_argument("--beta", type=float, default=0.1, help="the preference objective's beta")
    parser.add_argument("--chosen-lm", type=float, default=0.0,
                        help="weight of the chosen replies' cross-entropy in the preference loss")
    parser.add_argument("--kl", type=float, default=0.0,
                        help="weight of the fluency term: KL(unsteered || steered) on neutral text")
    parser.add_argument("--entropy", type=float, default=0.0,
                        help="weight of the diversity term: the steered next-token entropy's "
                             "shortfall below the unsteered model's on the training replies")
    parser.add_argument(
        "--chat", action="store_true",
        help="train on chat examples: each text is the reply to a neutral prompt (a --synthetic "
             "answer: to its own question, closed by the chat template's end of turn); only the "
             "reply (and that end) is scored",
    )


def _add_run_parser(sub) -> None:
    main_job = sub.add_parser(
        "run", help="the main job: train an IRM, find and explain its dominant neuron, report"
    )
    _add_model_args(main_job)
    main_job.add_argument("--alignment", default="anger", help="anger, sadness, joy, neutral")
    main_job.add_argument("--irm", help="investigate this trained IRM instead of training one")
    main_job.add_argument("--recipe", default="preference", choices=sorted(RECIPES),
                          help="preference: a CAA warm start trained on preference pairs; "
                               "paper: cross-entropy on the alignment's texts")
    main_job.add_argument("--pairs", help="preference pairs (`irm-lens pairs`) for the recipe")
    _add_irm_args(main_job, layers=None, preset=None,
                  layers_help="layer set (default: the recipe's, all)",
                  preset_help="IRM size (default: the recipe's, small)")
    main_job.add_argument("--steps", type=int, default=None,
                          help="training steps (default: the recipe's)")
    main_job.add_argument("--n-prompts", type=int, default=12, help="prompts for the analyses")
    main_job.add_argument("--max-new-tokens", type=int, default=20)
    main_job.add_argument("--n-random", type=int, default=4,
                          help="random indices in the patching / ablation baselines")
    main_job.add_argument("--eval-prompts", type=int, default=40)
    main_job.add_argument("--out", default="runs/main", help="run directory and report.html")
    main_job.set_defaults(func=_cmd_run)


def _add_generate_parser(sub) -> None:
    run = sub.add_parser(
        "generate", help="inject an IRM (trained or random) and compare generations"
    )
    _add_model_args(run)
    run.add_argument("--irm", help="a saved IRM (.safetensors file or its directory)")
    _add_irm_args(run, layers_help=f"layer set for a new IRM ({_LAYER_SETS})")
    run.add_argument("--scale", type=float, default=1.0, help="multiplier on the IRM's outputs")
    run.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    run.add_argument("--max-new-tokens", type=int, default=30)
    run.add_argument(
        "--no-chat", action="store_true", help="feed prompts raw, not in the chat template"
    )
    run.add_argument("--save-irm", help="save the IRM used to this path")
    run.add_argument("--out", help="write the generations as JSON here")
    run.set_defaults(func=_cmd_generate)


def _add_train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train an IRM toward an alignment")
    _add_model_args(tr)
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--alignment", help="a built-in alignment: anger, sadness, joy, neutral")
    source.add_argument("--data", help="a .csv/.jsonl/.parquet file with a text column")
    source.add_argument("--synthetic", help="a file from `irm-lens synth` (its kept rows)")
    source.add_argument("--pairs", help="a file from `irm-lens pairs` (use --objective preference)")
    tr.add_argument("--with-degenerate", action="store_true",
                    help="with --pairs: also prefer each chosen reply to its question's degenerate "
                         "steered reply")
    tr.add_argument("--max-per-opening", type=int, default=None,
                    help="with --synthetic: train on at most this many rows whose persona onset "
                         "opens with the same word (the first in the file), so that no opening "
                         "dominates")
    tr.add_argument("--recipe", default=None, choices=[*sorted(RECIPES), "none"],
                    help="a named recipe; the default for a bare --alignment run is preference "
                         "(a CAA warm start trained on the shipped preference pairs). Any IRM or "
                         "optimisation option below (or --recipe none) trains with those instead")
    tr.add_argument("--text-column", default="text")
    tr.add_argument("--prompt-column", default=None,
                    help="with --data: a column of prompts; each text is trained as the chat "
                         "reply to its own prompt")
    _add_irm_args(tr, seed=42)
    tr.add_argument("--zero-init", action="store_true", help="start from a zero output layer")
    tr.add_argument("--warm-start", metavar="VECTOR",
                    help="a steering vector from `irm-lens vector`: the IRM's output bias starts "
                         "as it (with --zero-init the untrained IRM is the vector)")
    tr.add_argument("--steer", default="all", choices=STEER_MODES,
                    help="steer every position, or only a chat reply's (needs --chat)")
    tr.add_argument("--l1", default="0", help="L1 coefficient on IRM outputs, or 'paper'")
    _add_optimisation_args(tr)
    tr.add_argument("--out", required=True, help="run directory (resumed if interrupted)")
    tr.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    tr.set_defaults(func=_cmd_train)


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser(
        "sweep", help="train the paper's grid of IRMs (alignments x layer sets x L1 x seeds)"
    )
    _add_model_args(sw)
    sw.add_argument("--alignments", default="anger,sadness")
    sw.add_argument("--layer-sets", default="all,every4")
    sw.add_argument("--l1", default="off", help="off, on or off,on (on: paper's 1e-4 / n_layers)")
    sw.add_argument("--seeds", default="0,1")
    sw.add_argument("--preset", default="small", choices=sorted(IRM_PRESETS))
    sw.add_argument("--no-zero-init", action="store_true", help="random output layer at start")
    sw.add_argument("--shard", help="i/n: train only every n-th run starting at i (fan-out)")
    sw.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    _add_optimisation_args(
        sw, steps=100, max_length=64, lr=1e-3, eval_every=50, max_val_batches=4
    )
    sw.add_argument("--out", required=True, help="sweep directory (resumed if interrupted)")
    sw.set_defaults(func=_cmd_sweep)


def _add_compare_parser(sub) -> None:
    cmp_ = sub.add_parser(
        "compare", help="do a sweep's IRMs rely on the same residual index?"
    )
    _add_model_args(cmp_)
    cmp_.add_argument("sweep", help="a sweep directory (irm-lens sweep --out)")
    cmp_.add_argument("--runs", help="comma-separated run names (default: every finished run)")
    cmp_.add_argument("--k", type=int, default=10, help="size of the top-k sets")
    cmp_.add_argument("--n-prompts", type=int, default=16)
    cmp_.add_argument("--max-new-tokens", type=int, default=16)
    cmp_.add_argument("--out", help="directory for runs.csv, pairs.csv, consensus.csv")
    cmp_.set_defaults(func=_cmd_compare)


def _add_predict_parser(sub) -> None:
    pr = sub.add_parser(
        "predict", help="name the index an IRM will rely on, from the frozen model alone"
    )
    pr.add_argument("model_name", nargs="?", metavar="MODEL",
                    help="model name or path (same as --model)")
    _add_model_args(pr)
    pr.add_argument("--alignment", help="use this built-in alignment's texts (default: neutral)")
    pr.add_argument("--texts", help="a .csv/.jsonl/.parquet file of texts instead")
    pr.add_argument("--text-column", default="text")
    pr.add_argument("--layers", default="all", help="the injected layers (all, q1..q4, every4, ...)")
    pr.add_argument("--k", type=int, default=5, help="indices to show")
    pr.add_argument("--n-texts", type=int, default=256, help="texts sampled from an alignment")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--max-length", type=int, default=64)
    pr.add_argument("--validate", metavar="SWEEP_DIR",
                    help="score the forecast against the IRMs of this sweep directory")
    pr.add_argument("--train", action="store_true", help="with --validate: train missing runs")
    pr.add_argument("--alignments", default="anger,sadness", help="with --validate: the grid")
    pr.add_argument("--layer-sets", default="all,every4", help="with --validate: the grid")
    pr.add_argument("--seeds", default="0,1", help="with --validate: the grid")
    pr.add_argument("--n-prompts", type=int, default=16, help="with --validate: prompts per run")
    pr.add_argument("--max-new-tokens", type=int, default=16, help="with --validate")
    pr.add_argument("--out", help="directory for the tables (CSV)")
    pr.set_defaults(func=_cmd_predict)


def _add_explain_parser(sub) -> None:
    ex = sub.add_parser("explain", help="every analysis of one residual index (a dossier)")
    _add_model_args(ex)
    ex.add_argument("--neuron", type=int, help="residual index (default: the IRM's dominant one)")
    ex.add_argument("--irm", help="a trained IRM")
    ex.add_argument("--alignment", help="the IRM's alignment (texts for patching / ablation)")
    ex.add_argument("--n-prompts", type=int, default=16)
    ex.add_argument("--n-random", type=int, default=8, help="random indices in the baselines")
    ex.add_argument("--generate", action="store_true",
                    help="also score the emotion of steered generations under each ablation")
    ex.add_argument("--out", help="directory for the tables (CSV)")
    ex.set_defaults(func=_cmd_explain)


def _add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="one self-contained HTML report of a trained run")
    _add_model_args(rep)
    rep.add_argument("--run", required=True, help="a training run directory")
    rep.add_argument("--alignment", help="default: the run's built-in alignment")
    rep.add_argument("--neuron", type=int, help="default: the IRM's dominant neuron")
    rep.add_argument("--sweep", help="also compare the runs of this sweep directory")
    rep.add_argument("--n-prompts", type=int, default=12)
    rep.add_argument("--max-new-tokens", type=int, default=20)
    rep.add_argument("--n-random", type=int, default=4)
    rep.add_argument("--eval-prompts", type=int, default=16, help="0: no generations section")
    rep.add_argument("--title")
    rep.add_argument("--out", required=True, help="the HTML file to write")
    rep.set_defaults(func=_cmd_report)


def _add_evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="measure an IRM's alignment on held-out neutral prompts")
    _add_model_args(ev)
    _add_intervention_args(ev)
    ev.add_argument("--alignment", required=True, help="target emotion (anger, sadness, joy, ...)")
    ev.add_argument("--prompt", action="append", help="a prompt (repeatable; default: built-in)")
    ev.add_argument("--n-prompts", type=int, default=40)
    ev.add_argument("--first-prompt", type=int, default=0,
                    help="start this far into the built-in held-out prompts (check a scale "
                         "chosen on the first ones on fresh ones)")
    ev.add_argument("--n-sampled", type=int, default=1)
    ev.add_argument("--max-new-tokens", type=int, default=40)
    ev.add_argument("--scale", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="directory for samples.csv, summary.csv, lift.csv")
    ev.set_defaults(func=_cmd_evaluate)


def _add_synth_parser(sub) -> None:
    syn = sub.add_parser(
        "synth", help="generate paper-style alignment data: questions answered in a tone"
    )
    _add_model_args(syn)
    syn.add_argument("--alignment", required=True, help="anger, sadness, joy, neutral, ...")
    syn.add_argument("--out", required=True, help="JSONL file (resumed if it exists)")
    syn.add_argument("--rows", type=int, default=100, help="rows to keep")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--max-new-tokens", type=int, default=80)
    syn.add_argument("--min-score", type=float, default=None,
                     help="keep rows whose tone score reaches this (default: a neutral baseline)")
    syn.add_argument("--baseline-quantile", type=float, default=0.9,
                     help="without --min-score: the quantile of neutral questions' tone score "
                          "a row must reach")
    syn.add_argument("--method", default="rewrite", choices=SYNTHETIC_METHODS,
                     help="rewrite: the paper's tone instruction; persona: a tone character "
                          "whose reply starts with a tone onset (for weak writers)")
    syn.add_argument("--over", default="",
                     help="emotions the tone's nade score must beat, e.g. sadness (comma list)")
    syn.add_argument("--batch-size", type=int, default=8,
                     help="questions sampled together (resume with the same value)")
    syn.add_argument("--max-attempts", type=int, default=None,
                     help="most rows generated, kept or not (default: 10 x --rows)")
    syn.set_defaults(func=_cmd_synth)


def _add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="print a model's architecture as irm_lens loads it")
    _add_model_args(info)
    info.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irm-lens",
        description="Steer a frozen Llama with an Injectable Realignment Model and explain it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_run_parser,
        _add_generate_parser,
        _add_train_parser,
        _add_sweep_parser,
        _add_compare_parser,
        _add_predict_parser,
        _add_explain_parser,
        _add_report_parser,
        _add_evaluate_parser,
        _add_synth_parser,
        _add_steering_parsers,
        _add_info_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except IRMLensError as exc:
        print(f"irm-lens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
