"""``irm_lens.report``: one self-contained HTML file from result objects.

The file opens offline: plotly.js is inlined once (not per figure), the style is inline, and
nothing is fetched from any URL. Everything that came from text (prompts, generations, dataset
rows, tokens, run names, config values) is escaped: as element text and attribute values with
``html.escape``, and inside the inline JSON of the figures with ``<``, ``>`` and ``&`` written
as JavaScript escapes, so a ``</script>`` in a prompt cannot end the script it sits in.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from irm_lens._io import atomic_write_text
from irm_lens._packages import irm_lens_version
from irm_lens.errors import ConfigError
from irm_lens.report import figures
from irm_lens.report.summary import findings

if TYPE_CHECKING:
    from irm_lens.analysis.dossier import NeuronDossier
    from irm_lens.analysis.outputs import (
        DominantNeurons,
        IRMOutputs,
        RunComparison,
        StriationScore,
    )
    from irm_lens.compare import SteeringComparison
    from irm_lens.evaluate import EvalResult

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1.5em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
margin-top: 2em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto;
font-size: 0.8em; } .figure { min-height: 380px; margin: 0.8em 0; }
.tokens { font-family: ui-monospace, Menlo, monospace; font-size: 0.85em; line-height: 1.9;
          border: 1px solid #eee; padding: 0.5em; margin: 0.4em 0; white-space: pre-wrap; }
.tokens span { border-radius: 2px; } .note { background: #fff8e1; padding: 0.5em 0.8em; }
.findings { background: #eef6ee; border: 1px solid #b5d6b5; padding: 0.4em 1em; }
.findings table { background: white; }
"""


def escape(value: Any) -> str:
    """Text for HTML element content or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON that is safe inside an inline ``<script>``: no ``<``, ``>`` or ``&`` left raw."""
    text = value if isinstance(value, str) else json.dumps(value)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def table_html(frame: pd.DataFrame, max_rows: int = 200, digits: int = 4) -> str:
    """A DataFrame as an escaped HTML table (floats rounded)."""
    shown = frame.head(max_rows).copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].round(digits)
    body = shown.to_html(index=False, escape=True, border=0, na_rep="")
    if len(frame) <= max_rows:
        return body
    csv = base64.b64encode(frame.to_csv(index=False).encode()).decode()
    return body + (f"<p class='meta'>{len(frame) - max_rows} more rows not shown: "
                   f"<a download='table.csv' href='data:text/csv;base64,{csv}'>all {len(frame)} "
                   "rows as CSV</a>.</p>")


@dataclass
class _Page:
    """Sections of the page, in order; figures are numbered as they are added."""

    title: str
    parts: list[str] = field(default_factory=list)
    n_figures: int = 0

    def heading(self, text: str, anchor: str) -> None:
        self.parts.append(f"<h2 id='{escape(anchor)}'>{escape(text)}</h2>")

    def para(self, text: str, css: str = "") -> None:
        cls = f" class='{escape(css)}'" if css else ""
        self.parts.append(f"<p{cls}>{escape(text)}</p>")

    def table(self, frame: pd.DataFrame, **kwargs) -> None:
        self.parts.append(table_html(frame, **kwargs))

    def figure(self, fig) -> None:
        self.n_figures += 1
        div = f"irm-fig-{self.n_figures}"
        spec = script_json(pio.to_json(fig, validate=False))
        self.parts.append(
            f"<div class='figure' id='{div}'></div>"
            f"<script>(function(){{var f={spec};Plotly.newPlot('{div}',f.data,f.layout,"
            "{responsive:true,displaylogo:false});})();</script>"
        )

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def render(self) -> str:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(self.title)}</title><style>{_CSS}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{escape(self.title)}</h1>"
            f"<p class='meta'>Written by irm_lens {escape(irm_lens_version())} on {escape(stamp)}; "
            f"{self.n_figures} figures; self-contained (opens offline).</p>"
            + "".join(self.parts) + "</body></html>"
        )


def token_view(outputs: IRMOutputs, n_prompts: int = 6, neuron: int | None = None) -> str:
    """Each token shaded by how hard the IRM pushes there: the norm of its output summed over
    layers, or |output| at ``neuron`` summed over layers. Hover a token for its value."""
    if outputs.per_token is None or outputs.token_strs is None:
        raise ConfigError("The token view needs collect_irm_outputs(..., per_token=True).")
    rows = []
    values = []
    for tokens in outputs.per_token[:n_prompts]:
        summed = tokens.sum(1)  # [pos, neuron]
        v = summed[:, neuron].abs() if neuron is not None else summed.norm(dim=-1)
        values.append(v)
    top = max(float(v.max()) for v in values) or 1.0
    what = f"|output at neuron {neuron}|" if neuron is not None else "||output||"
    for strs, v in zip(outputs.token_strs[:n_prompts], values):
        spans = []
        for s, x in zip(strs, v.tolist()):
            alpha = min(1.0, x / top)
            spans.append(
                f"<span title='{escape(f'{what} = {x:.4g}')}' "
                f"style='background: rgba(220, 60, 40, {alpha:.3f})'>{escape(s)}</span>"
            )
        rows.append(f"<div class='tokens'>{''.join(spans)}</div>")
    return (f"<p class='meta'>Shading: {escape(what)} summed over the injected layers, relative to "
            f"the largest shown ({top:.4g}).</p>" + "".join(rows))


def _history(run_dir: Path) -> pd.DataFrame:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def report(
    path: str | Path,
    *,
    title: str = "irm_lens report",
    run_dir: str | Path | None = None,
    outputs: IRMOutputs | None = None,
    striation: StriationScore | None = None,
    dominant: DominantNeurons | None = None,
    dossier: NeuronDossier | None = None,
    comparison: RunComparison | None = None,
    evaluation: EvalResult | None = None,
    steering: SteeringComparison | None = None,
    subject_scales: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write one self-contained HTML report of whatever results are given.

    Args:
        path: The HTML file to write (atomically: a failed write leaves any old file intact).
        title: The page title.
        run_dir: A training run directory: its configuration, data summary and training curves.
        outputs: IRM outputs: the heatmap, and with ``per_token=True`` the token-level view.
        striation / dominant: ``striation_score`` / ``dominant_neurons`` of ``outputs``
            (default: the dossier's, when the dossier was made from these outputs).
        dossier: ``explain``'s dossier of one neuron: norm ranks, magnitudes, logit attribution,
            patching and ablation against random indices.
        comparison: ``compare_runs``'s cross-run comparison.
        evaluation: ``evaluate``'s result: the lift, and generations side by side with scores.
        steering: ``compare_steering``'s result: the IRM beside its baselines (table,
            dose-response figure, and each intervention's texts beside the unsteered ones).
        subject_scales: The scale the IRM is judged at in each decoding in the findings
            (``RecipeResult.decoding_scales()``; default: its best fluent point).
        notes: Paragraphs shown at the top (e.g. what was run and how long it took).

    Returns:
        The path written.
    """
    if all(x is None for x in (run_dir, outputs, dossier, comparison, evaluation, steering)):
        raise ConfigError("Nothing to report: give a run_dir, outputs, a dossier, a comparison, "
                          "an evaluation or a steering comparison.")
    run = _read_run(run_dir) if run_dir is not None else None
    if dossier is not None and outputs is not None and dossier.outputs is outputs:
        striation = dossier.striation if striation is None else striation
        dominant = dossier.dominant if dominant is None else dominant
    page = _Page(title)
    _findings_section(page, findings(
        steering=steering, subject_scales=subject_scales, striation=striation, dominant=dominant,
        d_model=outputs.mean_abs.shape[1] if outputs is not None else None,
        ablation=dossier.ablation if dossier is not None else None,
        patching=dossier.patching if dossier is not None else None))
    for note in notes:
        page.para(note, css="note")
    if steering is not None:
        _steering_section(page, steering)
    if run is not None and (Path(run_dir) / "metrics.jsonl").exists():
        page.heading("Training", "training")
        page.figure(figures.training_curves(_history(Path(run_dir))))
    if outputs is not None:
        _outputs_section(page, outputs, striation, dominant)
    if comparison is not None:
        page.heading("Across runs", "runs")
        page.para(f"Same top neuron in every run: {comparison.same_top1}.")
        page.table(comparison.runs)
        page.figure(figures.run_overlap(comparison))
        page.table(comparison.pairs)
    if dossier is not None:
        _dossier_section(page, dossier)
    if evaluation is not None:
        page.heading("Generations with and without the IRM", "generations")
        page.para(evaluation.verdict)
        page.table(evaluation.lift)
        page.table(evaluation.side_by_side("greedy"), max_rows=50)
    if run is not None:  # the configuration last, folded away
        page.raw("<details><summary>Run configuration and data</summary>"
                 f"<pre>{escape(json.dumps(run, indent=2))}</pre></details>")
    path = Path(path)
    atomic_write_text(path, page.render())
    return path


def _read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise ConfigError(f"{run_dir} is not a training run directory (no run.json).")
    return json.loads((run_dir / "run.json").read_text())


def _findings_section(page: _Page, table: pd.DataFrame) -> None:
    if len(table):
        page.raw("<div class='findings' id='findings'><h2>Findings</h2>"
                 f"{table_html(table)}</div>")


def _outputs_section(page: _Page, outputs: IRMOutputs, striation: StriationScore | None,
                     dominant: DominantNeurons | None) -> None:
    page.heading("IRM outputs", "outputs")
    page.para(f"{len(outputs.prompts)} prompts, {sum(outputs.n_tokens)} tokens "
              f"({outputs.tokens}); layers {list(outputs.layers)}.", css="meta")
    page.figure(figures.output_heatmap(outputs))
    if striation is not None:
        s = striation
        page.para(
            f"Striation score (share of variance explained by the neuron index): "
            f"{s.neuron_share:.3f}; layer share {s.layer_share:.3f}; shuffled null "
            f"{s.null_mean:.3f} ± {s.null_std:.3f}; p = {s.p_value:.3g} "
            f"({s.n_shuffles} shuffles)."
        )
    if dominant is not None:
        page.figure(figures.dominant_bar(dominant))
        page.table(dominant.table)
    if outputs.per_token is not None:
        page.heading("Where the IRM pushes hardest, token by token", "tokens")
        page.raw(token_view(outputs))
        if dominant is not None:
            page.raw(token_view(outputs, neuron=dominant.top))


def _dossier_section(page: _Page, dossier: NeuronDossier) -> None:
    n = dossier.neuron
    page.heading(f"Neuron {n}", "neuron")
    page.table(dossier.summary_frame().reset_index().rename(columns={"index": "measure"}))
    page.figure(figures.norm_ranks(dossier.norms, n))
    page.figure(figures.magnitude_profile(dossier.magnitudes, n))
    massive = dossier.magnitudes.massive()
    page.para(f"Massive activations in this prompt set: {len(massive)} (layer, neuron) pairs.")
    if len(massive):
        page.table(massive, max_rows=30)
    attr = dossier.attribution
    page.para(f"Direct logit effect of neuron {n}: rank {attr.direct_effect_rank} of "
              f"{len(attr.direct_effect)}. Tokens a push on it promotes / suppresses:")
    page.table(pd.concat([attr.promoted.add_prefix("promoted_"),
                          attr.suppressed.add_prefix("suppressed_")], axis=1))
    if attr.components is not None:
        page.para("The steered final residual decomposed: each component's direct logit "
                  "effect along the steering's logit change, and the part through this neuron.")
        page.table(attr.components, max_rows=20)
    if dossier.patching is not None:
        page.figure(figures.patching_by_layer(dossier.patching))
        page.table(dossier.patching.summary())
    page.figure(figures.ablation_against_random(dossier.ablation))
    page.table(dossier.ablation.summary())
    if dossier.norm_scale is not None:
        page.para(dossier.norm_scale.finding() + " Each path's share of the logit change and "
                  "its change of the loss, beside random indices pushed the same way:")
        page.table(dossier.norm_scale.summary())


def _steering_section(page: _Page, steering: SteeringComparison) -> None:
    page.heading("Steering beside its baselines", "steering")
    page.para(f"Every intervention on the same {len(steering.prompts)} held-out prompts, the same "
              f"decodings and seeds, measured against one unsteered run ({steering.alignment} "
              "lift with its 95% CI; 'aligned' = CI above zero and every degeneration check "
              "passed).")
    page.table(steering.table.drop(columns=["off"]))
    if steering.table.scale.nunique() > 1:
        page.figure(figures.dose_response_figure(steering))
    for (name, scale), rows in steering.table.groupby(["intervention", "scale"], sort=False):
        # greedy where the point was measured in it (a dose may be for one decoding only)
        decoding = "greedy" if "greedy" in set(rows.decoding) else rows.decoding.iloc[0]
        page.para(f"{name} (scale {scale:g}), {decoding}, beside the unsteered text:", css="meta")
        page.table(steering.side_by_side(name, scale, decoding), max_rows=12)
