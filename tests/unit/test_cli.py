"""The irm-lens command line, on a tiny local model."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from irm_lens import IRM
from irm_lens.cli import main


def test_generate_writes_generations_and_the_irm(tiny_llama_dir, tmp_path, capsys):
    out, irm_path = tmp_path / "gen.json", tmp_path / "irm"
    code = main([
        "generate", "--model", str(tiny_llama_dir), "--device", "cpu", "--layers", "every2",
        "--preset", "linear", "--scale", "5", "--prompt", "Hello", "--prompt", "World",
        "--max-new-tokens", "4", "--out", str(out), "--save-irm", str(irm_path),
    ])
    assert code == 0
    record = json.loads(out.read_text())
    assert [g["prompt"] for g in record["generations"]] == ["Hello", "World"]
    assert record["irm_config"]["layers"] == [1, 3]
    assert IRM.load(irm_path).config.layers == (1, 3)
    printed = capsys.readouterr().out
    assert "IRM off:" in printed and "IRM on:" in printed


def test_generate_reuses_a_saved_irm(tiny_llama_dir, tmp_path, capsys):
    import irm_lens

    model = irm_lens.load_model(tiny_llama_dir, device="cpu")
    path = IRM.for_model(model, layers=[2], preset="linear").save(tmp_path / "a.safetensors")
    assert main(["generate", "--model", str(tiny_llama_dir), "--device", "cpu", "--irm", str(path),
                 "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert f"loaded from {path}" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("irm-lens: error:") and "does not exist" in err


def test_info_prints_the_architecture(tiny_llama_dir, capsys):
    assert main(["info", "--model", str(tiny_llama_dir), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "d_model: 64" in printed and "rotary_base: 5000.0" in printed


def test_console_script_and_module_entry_point():
    script = Path(sys.executable).parent / "irm-lens"
    assert script.is_file() or shutil.which("irm-lens"), "pip install should install irm-lens"
    result = subprocess.run(
        [sys.executable, "-m", "irm_lens.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "run" in result.stdout


def test_train_then_evaluate_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "texts.csv"
    data.write_text("text\n" + "\n".join(f"line {i} is angry about {i % 7}" for i in range(40)))
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--device", "cpu", "--data", str(data),
            "--preset", "linear", "--layers", "q2", "--steps", "4", "--batch-size", "4",
            "--max-length", "16", "--l1", "paper", "--out", str(run)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reached 4 steps" in printed and "validation loss" in printed
    assert json.loads((run / "run.json").read_text())["train_config"]["l1"] == pytest.approx(1e-4)
    assert main(["evaluate", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--irm", str(run / "irm.safetensors"), "--alignment", "anger",
                 "--prompt", "Say hi.", "--prompt", "Name a fruit.", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "greedy: anger lift" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"samples.csv", "summary.csv", "lift.csv"}


def test_run_is_the_whole_investigation_and_resumes(tiny_llama_dir, tmp_path, capsys,
                                                    monkeypatch):
    from irm_lens import recipes

    # the recipe's KL targets, made reachable on the tiny model (its KL saturates near 0.01)
    monkeypatch.setitem(recipes.RECIPES, "preference", replace(
        recipes.RECIPES["preference"], dose_kl=0.002, sampled_dose_kl=0.004))
    out, pairs = tmp_path / "main", tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"q{i}?", "chosen": f"I hate {i}!", "rejected": f"It is {i}."}) + "\n"
        for i in range(12)))
    args = ["run", "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "2",
            "--pairs", str(pairs), "--n-prompts", "3", "--max-new-tokens", "3", "--n-random", "2",
            "--eval-prompts", "3", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed, log = captured.out, captured.out + captured.err
    # Not a terminal (captured): whole lines per stage, no bar redraws, a log one can read.
    assert "\r" not in log and len(log.splitlines()) < 100, log
    assert "training IRM: started (0/2 step)" in captured.err
    for stage in ("[train]", "[IRM outputs]", "[analyses]", "[evaluation]", "[report]"):
        assert stage in printed
    assert "dominant neuron:" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    for name in ("irm", "caa (layer 2 x4)", "prompting"):  # the IRM beside its baselines
        assert f"{name} greedy: anger lift" in printed
    # the recipe's sampled dose (a multiple of the greedy one the IRM is saved at) is
    # measured, and judged there
    doses = json.loads((out / "irm" / "doses.json").read_text())["doses"]
    sampled = doses["sampled"] / doses["greedy"]
    assert sampled > 1.05 and f"irm x{sampled:g} sampled: anger lift" in printed
    # and ends with the report's steering findings, each decoding at its dose
    assert "steered (irm, greedy): x1: anger" in printed
    assert f"steered (irm, sampled): x{sampled:g}: anger" in printed
    saved = IRM.load(out / "irm" / "irm.safetensors")
    assert saved.config.output_scale == doses["greedy"]
    run = json.loads((out / "irm" / "run.json").read_text())
    assert run["train_config"]["objective"] == "preference" and run["data"]["n_train"] == 10
    html = (out / "report.html").read_text()
    assert "Neuron " in html and "Steering beside its baselines" in html
    assert "steered (irm, sampled)" in html and f"x{sampled:g}: anger" in html
    stamp = (out / "irm" / "irm.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # the finished training run is reused, not retrained
    assert (out / "irm" / "irm.safetensors").stat().st_mtime_ns == stamp


def test_train_on_question_answer_pairs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from irm_lens.data import synthetic

    objectives = importlib.import_module("irm_lens.objectives")  # where the data is tokenised

    seen = []
    real = objectives.tokenize_texts
    monkeypatch.setattr(objectives, "tokenize_texts",
                        lambda model, texts, **kw: seen.append(list(texts)) or real(model, texts, **kw))
    pairs = [(f"Question {i}?", f"answer {i} is angry about {i % 7}") for i in range(40)]
    rows = [{"index": i, "question": q, "text": f"{q}\n{a}", "response": a, "alignment": "anger",
             "scores": {}, "kept": i % 5 != 0, "finished": True, "seed": 0, "model": "m",
             "onset": ("Ugh,", "Argh!", "Oh, please.", "Typical.")[i % 4]}
            for i, (q, a) in enumerate(pairs)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text(
        "question,text\n" + "\n".join(f"{q},{a}" for q, a in pairs)
    )
    kept = set(synthetic.read_synthetic(tmp_path / "s.jsonl", pairs=True))
    common = ["train", "--model", str(tiny_llama_dir), "--device", "cpu", "--preset", "linear",
              "--steps", "1", "--batch-size", "4", "--max-length", "32"]
    sources = [
        (["--synthetic", str(tmp_path / "s.jsonl"), "--chat", "--steer", "reply"], kept),
        (["--data", str(tmp_path / "d.csv"), "--prompt-column", "question", "--steer", "reply"],
         set(pairs)),
    ]
    for n, (source, expected) in enumerate(sources):
        seen.clear()
        assert main([*common, *source, "--out", str(tmp_path / f"run{n}")]) == 0
        assert set(seen[0]) | set(seen[1]) <= expected and len(seen[0]) > 20
    seen.clear()  # without --chat, synthetic rows are plain question + answer text (the paper's)
    assert main([*common, "--synthetic", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "r")]) == 0
    assert all(isinstance(t, str) and "\n" in t for t in seen[0])
    seen.clear()  # at most 2 rows per opening word: 8 of the 32 kept
    capped = set(synthetic.read_synthetic(tmp_path / "s.jsonl", pairs=True, max_per_opening=2))
    assert main([*common, "--synthetic", str(tmp_path / "s.jsonl"), "--chat", "--max-per-opening",
                 "2", "--out", str(tmp_path / "capped")]) == 0
    trained_on = set().union(*seen)  # the train and validation splits of the 8
    assert len(capped) == 8 and trained_on <= capped and len(trained_on) >= 6
    assert main([*common, "--data", str(tmp_path / "d.csv"), "--max-per-opening", "2",
                 "--out", str(tmp_path / "r2")]) == 2
    assert "--max-per-opening caps the rows of a --synthetic file" in capsys.readouterr().err


def test_vector_compare_steering_and_preference_training(tiny_llama_dir, tmp_path, capsys):
    """The baselines end to end: build a vector, compare it with prompting and an IRM trained
    by the preference objective from that vector."""
    import pandas as pd

    from irm_lens.steering import SteeringVector

    model_args = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    vector = tmp_path / "caa.safetensors"
    assert main(["vector", *model_args, "--alignment", "anger", "--n-texts", "8", "--layers", "2",
                 "--scale", "3", "--out", str(vector)]) == 0
    assert SteeringVector.load(vector).config.layers == (2,)
    assert "built in" in capsys.readouterr().out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"q{i}?", "chosen": f"I hate {i}!", "rejected": f"It is {i}.",
                    "kept": True}) + "\n" for i in range(12)))
    run = tmp_path / "irm"
    assert main(["train", *model_args, "--pairs", str(pairs), "--objective", "preference",
                 "--warm-start", str(vector), "--zero-init", "--preset", "small", "--kl", "0.1",
                 "--chosen-lm", "0.5", "--steps", "2", "--batch-size", "4", "--out", str(run)]) == 0
    provenance = json.loads((run / "run.json").read_text())["train_config"]
    assert (provenance["objective"], provenance["kl"], provenance["chosen_lm"]) == (
        "preference", 0.1, 0.5)
    out = tmp_path / "cmp"
    assert main(["compare-steering", *model_args, "--alignment", "anger",
                 "--vector", f"caa={vector}", "--irm", f"irm={run / 'irm.safetensors'}",
                 "--prompting", "--scales", "caa=1,2", "--n-prompts", "2", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert sorted(set(zip(table.intervention, table.scale))) == [
        ("caa", 1.0), ("caa", 2.0), ("irm", 1.0), ("prompting", 1.0)]
    assert (out / "dose_response.html").stat().st_size > 100_000  # plotly inlined: opens offline
    assert main(["compare-steering", *model_args, "--alignment", "anger", "--vector",
                 f"caa={vector}", "--scales", "other=1"]) == 2
    assert "not interventions here" in capsys.readouterr().err


def test_train_runs_a_named_recipe_and_refuses_to_drop_options(tiny_llama_dir, tmp_path, capsys):
    model_args = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    run = tmp_path / "paper"
    assert main(["train", *model_args, "--alignment", "anger", "--recipe", "paper", "--steps", "2",
                 "--seed", "3", "--out", str(run)]) == 0
    assert "'paper' recipe" in capsys.readouterr().out
    config = json.loads((run / "run.json").read_text())["train_config"]
    assert (config["objective"], config["lr"], config["max_steps"], config["seed"]) == (
        "lm", 1e-3, 2, 3)
    assert main(["train", *model_args, "--alignment", "anger", "--recipe", "preference",
                 "--lr", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "fixes --lr" in capsys.readouterr().err
    assert main(["train", *model_args, "--data", "x.csv", "--recipe", "paper",
                 "--out", str(tmp_path / "y")]) == 2
    assert "built-in --alignment" in capsys.readouterr().err


def test_pairs_answers_the_chosen_slice_of_training_questions(tiny_llama_dir, tmp_path,
                                                              monkeypatch, capsys):
    from irm_lens import cli
    from irm_lens.data.corpora import neutral_prompts

    seen = {}

    def fake(model, intervention, alignment, out, *, prompts, **kwargs):
        seen["prompts"] = prompts
        return pd.DataFrame(dict(kept=[True] * len(prompts)))

    monkeypatch.setattr(cli, "generate_pairs", fake)
    args = ["pairs", "--model", str(tiny_llama_dir), "--device", "cpu", "--prompting",
            "--alignment", "anger", "--n-prompts", "3", "--first-prompt", "5",
            "--out", str(tmp_path / "p.jsonl")]
    assert main(args) == 0
    assert seen["prompts"] == neutral_prompts(split="train")[5:8]
    assert main([*args[:-4], "--first-prompt", "-1", "--out", str(tmp_path / "q.jsonl")]) == 2
    assert "--first-prompt must be >= 0" in capsys.readouterr().err


def test_recompute_turns_the_shipped_precomputed_results_off(tiny_llama_dir, tmp_path,
                                                             monkeypatch):
    from irm_lens import cli
    from irm_lens.data import precomputed

    monkeypatch.setenv(precomputed.ENV_SWITCH, "")  # unset again after the test
    modes = []

    def fake(model, intervention, alignment, out, **kwargs):
        modes.append(precomputed._current_mode())
        return pd.DataFrame(dict(kept=[True]))

    monkeypatch.setattr(cli, "generate_pairs", fake)
    args = ["pairs", "--model", str(tiny_llama_dir), "--device", "cpu", "--prompting",
            "--alignment", "anger", "--n-prompts", "1", "--out", str(tmp_path / "p.jsonl")]
    assert main(args) == 0
    assert main([*args, "--recompute"]) == 0
    assert modes == ["read", "off"]
