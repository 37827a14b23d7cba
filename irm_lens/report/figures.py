"""Plotly figures built from result objects. Nothing here computes an analysis: each function
reads a result (or a run directory's metrics) and draws it.

Text that came from data (run names, tokens) is escaped by the caller's HTML layer when it goes
into the page; inside figures plotly renders strings as SVG text, never as markup that runs.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go

if TYPE_CHECKING:
    from irm_lens.analysis.ablation import AblationResult
    from irm_lens.analysis.dynamics import DominanceCurve
    from irm_lens.analysis.magnitudes import ActivationMagnitudes
    from irm_lens.analysis.norms import NormWeights
    from irm_lens.analysis.outputs import DominantNeurons, IRMOutputs, RunComparison
    from irm_lens.analysis.patching import PatchingResult
    from irm_lens.compare import SteeringComparison

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), height=380)


def _label(text: object) -> str:
    """A string shown inside a figure: plotly accepts a little HTML there, so escape it."""
    return html.escape(str(text), quote=True)


def training_curves(history: pd.DataFrame) -> go.Figure:
    """Training loss per step and validation loss per evaluation."""
    fig = go.Figure()
    if "loss" in history:
        steps = history.dropna(subset=["loss"])
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["loss"], name="training loss",
                                 mode="lines", line=dict(width=1)))
    if "val_loss" in history:
        val = history.dropna(subset=["val_loss"])
        fig.add_trace(go.Scatter(x=val["step"], y=val["val_loss"], name="validation loss",
                                 mode="lines+markers"))
    fig.update_layout(title="Training", xaxis_title="step", yaxis_title="loss (nats / token)",
                      **_LAYOUT)
    return fig


def output_heatmap(outputs: IRMOutputs) -> go.Figure:
    """Mean |IRM output| per injected layer and residual index (zoom to one index)."""
    z = outputs.mean_abs.numpy()
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=[str(layer) for layer in outputs.layers],
        colorscale="Viridis", colorbar=dict(title="mean |out|"),
        hovertemplate="layer %{y}, neuron %{x}: %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title="IRM output: mean |output| per layer and neuron (drag to zoom)",
                      xaxis_title="neuron (residual index)", yaxis_title="injected layer",
                      **{**_LAYOUT, "height": 460})
    return fig


def dominant_bar(dominant: DominantNeurons) -> go.Figure:
    """Top indices by share of the IRM's |output|, with bootstrap intervals."""
    t = dominant.table
    fig = go.Figure(go.Bar(
        x=[str(n) for n in t["neuron"]], y=t["share"],
        error_y=dict(type="data", symmetric=False, array=t["share_hi"] - t["share"],
                     arrayminus=t["share"] - t["share_lo"]),
        hovertemplate="neuron %{x}: share %{y:.4f}<extra></extra>",
    ))
    fig.update_layout(title="Dominant neurons (share of total |output|, 95% bootstrap CI)",
                      xaxis_title="neuron", yaxis_title="share", xaxis_type="category", **_LAYOUT)
    return fig


def run_overlap(comparison: RunComparison) -> go.Figure:
    """Pairwise top-k overlap of the runs, as a matrix."""
    names = list(comparison.runs["run"])
    index = {n: i for i, n in enumerate(names)}
    z = [[1.0 if a == b else None for b in names] for a in names]
    for _, row in comparison.pairs.iterrows():
        i, j = index[row["run_a"]], index[row["run_b"]]
        z[i][j] = z[j][i] = float(row["topk_overlap"])
    labels = [_label(n) for n in names]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                               colorbar=dict(title=f"top-{comparison.k} overlap")))
    fig.update_layout(title=f"Runs: overlap of their top-{comparison.k} neurons",
                      **{**_LAYOUT, "height": 420})
    return fig


def norm_ranks(norms: NormWeights, neuron: int) -> go.Figure:
    """The neuron's |weight| rank in every block's ln1 and ln2 (1 = largest)."""
    profile = norms.profile(neuron)
    fig = go.Figure()
    for name in ("ln1", "ln2"):
        part = profile[profile["norm"] == name]
        fig.add_trace(go.Scatter(x=part["layer"], y=part["rank"], name=name, mode="lines+markers"))
    final = profile[profile["norm"] == "ln_final"]["rank"].iloc[0]
    fig.add_hline(y=final, line_dash="dot", annotation_text=f"ln_final rank {final}")
    fig.update_layout(title=f"Neuron {neuron}: RMSNorm weight rank by layer (1 = largest of "
                      f"{norms.ln1.shape[1]})", xaxis_title="layer", yaxis_title="rank",
                      yaxis_autorange="reversed", **_LAYOUT)
    return fig


def magnitude_profile(magnitudes: ActivationMagnitudes, neuron: int) -> go.Figure:
    """The neuron's mean |resid_post| per layer against the layer's median and maximum index."""
    overall = magnitudes.overall
    fig = go.Figure()
    layers = list(range(overall.shape[0]))
    fig.add_trace(go.Scatter(x=layers, y=overall[:, neuron], name=f"neuron {neuron}",
                             mode="lines+markers"))
    fig.add_trace(go.Scatter(x=layers, y=overall.median(1).values, name="median index",
                             mode="lines"))
    fig.add_trace(go.Scatter(x=layers, y=overall.max(1).values, name="largest index",
                             mode="lines", line=dict(dash="dot")))
    fig.update_layout(title=f"Neuron {neuron}: mean |resid_post| by layer", xaxis_title="layer",
                      yaxis_title="mean |activation|", yaxis_type="log", **_LAYOUT)
    return fig


def patching_by_layer(patching: PatchingResult) -> go.Figure:
    """Per-layer patching effect of the neuron, with the random indices' all-layer effects."""
    t = patching.table
    fig = go.Figure()
    for direction, label in (("into_unsteered", "restored (into unsteered)"),
                             ("into_steered", "lost (into steered)")):
        part = t[(t["kind"] == "target") & (t["direction"] == direction) & (t["layer"] >= 0)]
        fig.add_trace(go.Bar(x=part["layer"], y=part["effect"], name=label))
    for direction, label in (("into_unsteered", "random, restored (all layers)"),
                             ("into_steered", "random, lost (all layers)")):
        rand = t[(t["kind"] == "random") & (t["direction"] == direction) & (t["layer"] == -1)]
        if len(rand):
            fig.add_hline(y=float(rand["effect"].mean()), line_dash="dot",
                          annotation_text=label)
    fig.update_layout(title=f"Patching neuron {patching.neuron} ({patching.target}) per layer: "
                      "fraction of the steering gap", xaxis_title="layer",
                      yaxis_title="fraction of gap", barmode="group", **_LAYOUT)
    return fig


def ablation_against_random(ablation: AblationResult, column: str = "delta_loss") -> go.Figure:
    """The neuron's ablation effect against each random index's."""
    t = ablation.table
    rand = t[t["kind"] == "random"]
    target = t[t["kind"] == "target"]
    fig = go.Figure()
    fig.add_trace(go.Box(y=rand[column], name="random indices", boxpoints="all", jitter=0.4,
                         text=[f"neuron {i}" for i in rand["index"]]))
    fig.add_trace(go.Scatter(x=["random indices"], y=target[column], mode="markers",
                             marker=dict(size=14, symbol="star", color="crimson"),
                             name=f"neuron {ablation.neuron}"))
    fig.update_layout(title=f"Ablating neuron {ablation.neuron} ({ablation.mode}): {column}",
                      yaxis_title=column, **_LAYOUT)
    return fig


def dose_response_figure(comparison: SteeringComparison) -> go.Figure:
    """Lift (95% CI) against perplexity ratio over each intervention's scales, one panel per
    decoding; filled markers pass every degeneration check, open ones fail one. The dashed line
    is the perplexity limit: each curve's fluent frontier lies left of it, under its filled end."""
    from plotly.subplots import make_subplots

    table = comparison.table
    decodings = list(dict.fromkeys(table.decoding))
    fig = make_subplots(rows=1, cols=len(decodings), shared_yaxes=True,
                        subplot_titles=[_label(d) for d in decodings])
    colours = dict(zip(dict.fromkeys(table.intervention), _PALETTE * 4))
    in_legend: set[str] = set()  # each name once, in the first panel that has it
    for col, decoding in enumerate(decodings, start=1):
        for name, rows in table[table.decoding == decoding].groupby("intervention", sort=False):
            rows = rows.sort_values("scale")
            fig.add_trace(go.Scatter(
                x=rows.perplexity_ratio, y=rows.lift, mode="lines+markers", name=_label(name),
                legendgroup=_label(name), showlegend=name not in in_legend,
                line=dict(color=colours[name]),
                marker=dict(size=9, symbol=["circle" if f else "circle-open" for f in rows.fluent]),
                error_y=dict(type="data", symmetric=False, array=rows.ci_high - rows.lift,
                             arrayminus=rows.lift - rows.ci_low, thickness=1),
                text=[f"scale {s:g}" for s in rows.scale],
                hovertemplate="%{text}: lift %{y:+.3f}, perplexity x%{x:.2f}<extra></extra>",
            ), row=1, col=col)
            in_legend.add(name)
        fig.add_vline(x=comparison.thresholds.max_perplexity_ratio, line_dash="dash",
                      line_color="grey", row=1, col=col)
        fig.add_hline(y=0, line_color="lightgrey", row=1, col=col)
        fig.update_xaxes(title_text="perplexity ratio (steered / unsteered)", type="log",
                         row=1, col=col)
    fig.update_yaxes(title_text=f"{_label(comparison.alignment)} lift", row=1, col=1)
    fig.update_layout(title="Dose-response: lift against fluency, per intervention and scale",
                      **{**_LAYOUT, "height": 440})
    return fig


def dominance_curve_figure(curve: DominanceCurve) -> go.Figure:
    """The dominant neuron along a training run: its share over a uniform share (log scale) and
    its margin over the runner-up, by checkpoint step, one line per view; hover names the index."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "top index's share / uniform share", "margin over the runner-up"])
    for (view, rows), colour in zip(curve.table.groupby("view", sort=False), _PALETTE):
        rows = rows.sort_values("step")
        text = [f"{view}: neuron {t} (runner-up {r})" for t, r in zip(rows.top, rows.runner_up)]
        for col, column in enumerate(("ratio_to_uniform", "margin"), start=1):
            fig.add_trace(go.Scatter(
                x=rows.step, y=rows[column], mode="lines+markers", name=_label(view),
                legendgroup=_label(view), showlegend=col == 1, line=dict(color=colour),
                text=[_label(t) for t in text],
                hovertemplate="step %{x}, %{text}: %{y:.3g}<extra></extra>",
            ), row=1, col=col)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(type="log", title_text="share x d_model", row=1, col=1)
    fig.update_yaxes(title_text="(top - runner-up) / runner-up", row=1, col=2)
    fig.update_layout(title="Dominance along the run, per view", **_LAYOUT)
    return fig


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]
