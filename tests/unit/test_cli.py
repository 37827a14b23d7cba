"""The irm-lens command line, on a tiny local model."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_run_is_the_whole_investigation_and_resumes(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "main"
    args = ["run", "--model", str(tiny_llama_dir), "--device", "cpu", "--steps", "2",
            "--n-prompts", "3", "--max-new-tokens", "3", "--n-random", "2", "--eval-prompts", "3",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for stage in ("[train]", "[IRM outputs]", "[analyses]", "[evaluation]", "[report]"):
        assert stage in printed
    assert "dominant neuron:" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    html = (out / "report.html").read_text()
    assert "Neuron " in html and "Generations with and without the IRM" in html
    stamp = (out / "irm" / "irm.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # the finished training run is reused, not retrained
    assert (out / "irm" / "irm.safetensors").stat().st_mtime_ns == stamp


def test_train_on_question_answer_pairs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from irm_lens.data import synthetic

    train_module = importlib.import_module("irm_lens.train")  # irm_lens.train is the function

    seen = []
    real = train_module.tokenize_texts
    monkeypatch.setattr(train_module, "tokenize_texts",
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
