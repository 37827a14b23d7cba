"""The HTML report: self-contained, everything from text escaped, and drawn in a real browser."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import shutil

import pandas as pd
import pytest
from conftest import ARTIFACTS, DRAWN_FIGURES_JS, chromium_driver, planted_irm
from hypothesis import given, settings
from hypothesis import strategies as st

import irm_lens
from irm_lens.errors import ConfigError
from irm_lens.report.html import escape, script_json

HOSTILE = [
    "<script>window.__pwned = 1</script> What is 2+2?",
    "\"'><img src=x onerror=\"window.__pwned=2\"> Name a colour.",
    "</script><script>window.__pwned=3</script>",
]
K = 7

@pytest.fixture(scope="module")
def report_path(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    irm = planted_irm(tiny_model, K)
    config = irm_lens.TrainConfig(lr=1e-3, max_steps=2, max_length=16, eval_every=1,
                                  max_val_batches=1, batch_size=4)
    texts = [f"{HOSTILE[i % 3]} sample text number {i}" for i in range(40)]
    run = irm_lens.train(tiny_model, irm_lens.IRM.for_model(tiny_model, preset="linear"), texts,
                         config, out_dir=tmp / "<script>run", progress=False)
    outputs = irm_lens.collect_irm_outputs(tiny_model, irm, HOSTILE, max_new_tokens=3,
                                           per_token=True, progress=False)
    other = irm_lens.collect_irm_outputs(tiny_model, planted_irm(tiny_model, 20), HOSTILE,
                                         max_new_tokens=0, progress=False)
    comparison = irm_lens.compare_runs({"<b>run</b><script>x()</script>": outputs,
                                        "plain": other}, k=3, n_shuffles=10)
    dossier = irm_lens.explain(tiny_model, K, irm, "anger", HOSTILE, n_random=2,
                               max_new_tokens=2, striation_shuffles=10, progress=False)
    evaluation = irm_lens.evaluate(tiny_model, irm, "anger", HOSTILE, max_new_tokens=4,
                                   n_bootstrap=50, progress=False)
    vector = irm_lens.mean_difference_vector(tiny_model, HOSTILE[:2], ["calm", "plain"], layers=1)
    steering = irm_lens.compare_steering(
        tiny_model, {"<i>caa</i>": vector, "irm": irm, "persona": irm_lens.Prompting("Be <b>x")},
        "anger", scales={"<i>caa</i>": [1.0, 2.0], "irm": {"greedy": 1.0, "sampled": 1.5}},
        prompts=HOSTILE, max_new_tokens=3,
        n_bootstrap=50, progress=False)
    striation = dataclasses.replace(irm_lens.striation_score(outputs, n_shuffles=10),
                                    neuron_share=0.123456)  # a value only the report can show
    return irm_lens.report(
        tmp / "report.html", title="Report <script>alert(1)</script>", run_dir=run.out_dir,
        outputs=outputs, striation=striation, dominant=irm_lens.dominant_neurons(outputs),
        dossier=dossier, comparison=comparison, evaluation=evaluation,
        steering=steering, notes=["A note with <b>markup</b>."],
    )


def test_report_is_self_contained(report_path):
    text = report_path.read_text()
    assert text.count("<script>") >= 2
    assert len(re.findall(r"<script[^>]*\bsrc\s*=", text)) == 0
    assert "<link" not in text and "@import" not in text
    assert text.count("Plotly.newPlot") >= 8
    assert text.count("define(\"plotly\"") + text.count("plotly.js v") <= 2  # the bundle, once


def test_everything_from_text_is_escaped(report_path):
    text = report_path.read_text()
    assert "window.__pwned" in text  # the hostile text is there ...
    assert "Steering beside its baselines" in text and "&lt;i&gt;caa&lt;/i&gt; (scale 2)" in text
    # a point measured in sampled decoding only shows its sampled texts
    assert "irm (scale 1.5), sampled, beside the unsteered text" in text
    for raw in ("<script>window.__pwned", "<img src=x", "<b>markup</b>", "<i>caa</i>",
                "<script>alert(1)</script>", "<b>run</b><script>x()"):
        assert raw not in text  # ... but never as markup
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text


def test_report_opens_with_its_findings_and_folds_the_configuration(report_path):
    text = report_path.read_text()
    box = text.index("<div class='findings' id='findings'>")
    assert box < text.index("<h2 id=")  # before every section
    for claim in ("steered (irm, greedy)", "steered (irm, sampled)", "stripes (one index",
                  "dominant index", "special under ablation?"):
        assert claim in text[box:text.index("</div>", box)]
    assert text.index("<details><summary>Run configuration and data") > text.index("id='neuron'")


def test_long_tables_are_capped_with_the_rest_downloadable():
    from irm_lens.report.html import table_html

    frame = pd.DataFrame(dict(x=range(30)))
    html_text = table_html(frame, max_rows=10)
    assert html_text.count("<tr>") == 10  # 10 rows shown (the header row is styled)
    csv = html_text.split("base64,")[1].split("'")[0]
    assert base64.b64decode(csv).decode() == frame.to_csv(index=False)


def test_report_renders_the_results_it_is_given(report_path):
    text = report_path.read_text()
    assert "Striation score (share of variance explained by the neuron index): 0.123;" in text
    assert f"Written by irm_lens {irm_lens.__version__} " in text


def test_report_without_statistics_shows_outputs_only(tiny_model, tmp_path):
    irm = planted_irm(tiny_model, K)
    outputs = irm_lens.collect_irm_outputs(tiny_model, irm, HOSTILE[:1], max_new_tokens=0,
                                           progress=False)
    text = irm_lens.report(tmp_path / "r.html", outputs=outputs).read_text()
    assert "IRM outputs" in text and "Striation score" not in text


def test_escape_helpers_are_total():
    for s in ["<", ">", "&", '"', "'", "</script>", "\u2028"]:
        assert not set(escape(s)) & set("<>\"'")
        assert not set(script_json(json.dumps(s))) & set("<>&")
        assert json.loads(script_json(json.dumps(s))) == s  # JSON reads the escapes back


def test_report_needs_something_to_show(tmp_path):
    with pytest.raises(ConfigError, match="Nothing to report"):
        irm_lens.report(tmp_path / "r.html")
    with pytest.raises(ConfigError, match="run.json"):
        irm_lens.report(tmp_path / "r.html", run_dir=tmp_path)


def test_report_renders_offline_in_headless_chromium(report_path):
    driver = chromium_driver()
    try:
        driver.get(report_path.as_uri())
        driver.implicitly_wait(5)
        n_figures = driver.execute_script("return document.querySelectorAll('div.figure').length")
        drawn = driver.execute_script(DRAWN_FIGURES_JS)
        pwned = driver.execute_script("return window.__pwned === undefined ? null : window.__pwned")
        body = driver.execute_script("return document.body.innerText")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "report.png"))
        shutil.copy(report_path, ARTIFACTS / "report.html")
    finally:
        driver.quit()
    assert n_figures >= 8 and drawn == n_figures
    assert pwned is None
    assert "<script>window.__pwned = 1</script>" in body  # shown as text
    assert errors == []


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_escaping_is_total_for_any_text(text):
    escaped = escape(text)
    assert not set(escaped) & set("<>\"'")
    assert html.unescape(escaped) == text
    inline = script_json(json.dumps(text))
    assert not set(inline) & set("<>&") and "\u2028" not in inline and "\u2029" not in inline
    assert json.loads(inline) == text


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="may not be skipped"):
        chromium_driver()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        chromium_driver()


def test_the_dose_response_legend_names_each_intervention_once_whichever_panel_has_it():
    """An intervention measured in the second decoding only (a sampled-only trial) still gets
    its legend entry; one measured in both gets one entry, not two."""
    from irm_lens.compare import SteeringComparison
    from irm_lens.evaluate import DegenerationThresholds
    from irm_lens.report.figures import dose_response_figure

    rows = [("irm", 1.0, "greedy"), ("irm", 1.0, "sampled"), ("caa", 2.0, "sampled"),
            ("caa", 3.0, "sampled")]
    table = pd.DataFrame(rows, columns=["intervention", "scale", "decoding"]).assign(
        lift=0.1, ci_low=0.05, ci_high=0.15, perplexity_ratio=2.0, fluent=True)
    figure = dose_response_figure(SteeringComparison("joy", table, pd.DataFrame(), (),
                                                     DegenerationThresholds()))
    shown = [trace.name for trace in figure.data if trace.showlegend]
    assert sorted(shown) == ["caa", "irm"]
    assert [len(trace.x) for trace in figure.data] == [1, 1, 2]
