"""explain (the dossier) and the sweep / compare / explain commands, on a tiny model."""

from __future__ import annotations

import pandas as pd
from conftest import PROMPTS, planted_irm

import irm_lens
from irm_lens.cli import main

K = 7


def test_explain_gathers_every_analysis_of_the_planted_index(tiny_model):
    irm = planted_irm(tiny_model, K)
    dossier = irm_lens.explain(tiny_model, K, irm, "anger", PROMPTS, n_random=2,
                               max_new_tokens=2, striation_shuffles=20, progress=False)
    summary = dossier.summary()
    assert summary["neuron"] == K and summary["irm_top_neuron"] == K and summary["irm_rank"] == 1
    assert summary["irm_logit_share_rank"] == 1
    assert summary["patch_restored"] > 0.5 and abs(summary["patch_restored_random_mean"]) < 1e-5
    assert dossier.striation.neuron_share > 0.9
    assert dossier.ablation.table["index"].iloc[0] == K
    assert {"ablation_irm_gain_undone", "ln_final_rank"} <= set(summary)


def test_explain_without_an_irm_runs_the_model_only_analyses(tiny_model):
    dossier = irm_lens.explain(tiny_model, 3, prompts=PROMPTS, n_random=2, max_new_tokens=0,
                               progress=False)
    assert dossier.outputs is None and dossier.patching is None
    assert "irm_top_neuron" not in dossier.summary()


def tiny_sweep(model: list[str], sweep, alignment: str, layer_sets: str):
    """Two 2-step runs through ``irm-lens sweep``."""
    assert main(["sweep", *model, "--alignments", alignment, "--layer-sets", layer_sets,
                 "--seeds", "0", "--steps", "2", "--max-length", "16", "--eval-every", "2",
                 "--max-val-batches", "1", "--batch-size", "4", "--out", str(sweep)]) == 0
    return sweep


def test_sweep_compare_and_explain_commands(tiny_llama_dir, tiny_model, tmp_path, capsys):
    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    sweep = tiny_sweep(model, tmp_path / "sweep", "anger", "all,q2")
    assert "2 of 2 runs finished" in capsys.readouterr().out
    assert main(["compare", *model, str(sweep), "--k", "3", "--n-prompts", "3",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "same top index in every run" in printed
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert sorted(runs["run"]) == ["anger-all-nol1-s0", "anger-q2-nol1-s0"]
    # explain without --neuron examines the IRM's dominant index: planted at K, it must find K
    irm = planted_irm(tiny_model, K).save(tmp_path / "planted.safetensors")
    assert main(["explain", *model, "--irm", str(irm), "--alignment", "anger", "--n-prompts",
                 "3", "--n-random", "2", "--out", str(tmp_path / "ex")]) == 0
    printed = capsys.readouterr().out
    assert "the IRM's dominant neuron" in printed and "ablation:" in printed
    summary = pd.read_csv(tmp_path / "ex" / "summary.csv", index_col="measure")
    assert int(summary.loc["neuron", "value"]) == K
    assert int(summary.loc["irm_top_neuron", "value"]) == K


def test_explain_command_reports_a_bad_neuron_clearly(tiny_llama_dir, capsys):
    code = main(["explain", "--model", str(tiny_llama_dir), "--device", "cpu", "--neuron",
                 "1512"])
    assert code == 2
    assert "d_model=64" in capsys.readouterr().err


def test_report_command_writes_one_html_file(tiny_llama_dir, tmp_path, capsys):
    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    sweep = tiny_sweep(model, tmp_path / "sweep", "sadness", "all,q1")
    out = tmp_path / "r" / "report.html"
    assert main(["report", *model, "--run", str(sweep / "sadness-all-nol1-s0"), "--sweep",
                 str(sweep), "--n-prompts", "3", "--max-new-tokens", "3", "--n-random", "2",
                 "--eval-prompts", "2", "--out", str(out)]) == 0
    assert f"report: {out.resolve()}" in capsys.readouterr().out
    html = out.read_text()
    assert "Across runs" in html and "Generations with and without the IRM" in html
    assert "sadness-q1-nol1-s0" in html


def test_report_command_needs_the_alignment_of_a_user_data_run(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("text\n" + "\n".join(f"row {i} of my data" for i in range(40)))
    run = tmp_path / "run"
    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    assert main(["train", *model, "--data", str(data), "--preset", "linear", "--steps", "1",
                 "--batch-size", "4", "--max-length", "16", "--out", str(run)]) == 0
    assert main(["report", *model, "--run", str(run), "--out", str(tmp_path / "r.html")]) == 2
    assert "give --alignment" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
