"""The report's findings box: each verdict read off the result objects it came from."""

from __future__ import annotations

import pandas as pd

import irm_lens
from irm_lens.analysis.ablation import AblationResult
from irm_lens.analysis.outputs import DominantNeurons, StriationScore
from irm_lens.analysis.provenance import Provenance
from irm_lens.evaluate import DegenerationThresholds
from irm_lens.report.summary import findings

PROV = Provenance("m", 64, 4, None, "0" * 64, 0)


def _steering() -> irm_lens.SteeringComparison:
    rows = [
        # greedy: the IRM's fluent +0.05 beats CAA's fluent +0.03 (and CAA's degenerate +0.20)
        ("irm", 1.0, "greedy", 0.05, 0.01, 0.09, 1.9, True, "aligned"),
        ("caa", 4.0, "greedy", 0.03, 0.01, 0.05, 2.5, True, "aligned"),
        ("caa", 8.0, "greedy", 0.20, 0.15, 0.25, 9.0, False, "degenerate"),
        ("persona", 1.0, "greedy", 0.10, -0.02, 0.22, 1.0, True, "no lift"),  # fluent, no lift
        # sampled: the IRM (+0.02, fluent) is below CAA's fluent +0.06
        ("irm", 1.0, "sampled", 0.02, 0.005, 0.04, 1.5, True, "aligned"),
        ("caa", 4.0, "sampled", 0.06, 0.03, 0.09, 3.0, True, "aligned"),
    ]
    table = pd.DataFrame(rows, columns=["intervention", "scale", "decoding", "lift", "ci_low",
                                        "ci_high", "perplexity_ratio", "fluent", "verdict"])
    return irm_lens.SteeringComparison("anger", table, pd.DataFrame(), (), DegenerationThresholds())


def test_steering_verdicts_compare_with_the_best_fluent_baseline():
    table = findings(steering=_steering()).set_index("claim")
    greedy, sampled = table.loc["steered (irm, greedy)"], table.loc["steered (irm, sampled)"]
    assert greedy.verdict == "aligned; at least the best aligned baseline"
    assert "anger +0.050 [+0.010, +0.090]" in greedy.finding and "caa +0.030" in greedy.finding
    assert sampled.verdict == "aligned; below an aligned baseline"
    assert "caa +0.060" in sampled.finding


def test_steering_verdicts_read_the_scale_chosen_for_each_decoding():
    steering = _steering()
    extra = pd.DataFrame([
        # a stronger dose: fluent and larger in greedy (but not the one chosen for greedy),
        # fluent and above CAA in sampled (the one chosen for sampled)
        ("irm", 1.2, "greedy", 0.08, 0.04, 0.12, 2.3, True, "aligned"),
        ("irm", 1.2, "sampled", 0.07, 0.04, 0.10, 3.3, True, "aligned"),
    ], columns=steering.table.columns)
    steering = irm_lens.SteeringComparison("anger", pd.concat([steering.table, extra]),
                                           pd.DataFrame(), (), DegenerationThresholds())
    best = findings(steering=steering).set_index("claim")
    assert "x1.2: anger +0.080" in best.loc["steered (irm, greedy)"].finding
    chosen = findings(steering=steering, subject_scales={"greedy": 1.0, "sampled": 1.2})
    chosen = chosen.set_index("claim")
    greedy, sampled = chosen.loc["steered (irm, greedy)"], chosen.loc["steered (irm, sampled)"]
    assert "x1: anger +0.050" in greedy.finding
    assert "x1.2: anger +0.070" in sampled.finding
    assert sampled.verdict == "aligned; at least the best aligned baseline"


def test_stripes_dominance_and_ablation_verdicts():
    stripes = StriationScore(0.2, 0.1, 0.7, 0.03, 0.01, 0.004, 200, 4)
    flat = StriationScore(0.04, 0.1, 0.86, 0.03, 0.01, 0.30, 200, 4)
    faint = StriationScore(0.027, 0.1, 0.873, 0.026, 0.0002, 0.005, 200, 4)
    dominant = DominantNeurons(pd.DataFrame(dict(rank=[1], neuron=[17], share=[0.05],
                                                 top1_frequency=[0.97])), 1, 100)
    ablation = AblationResult(17, "zero", (0, 1), pd.DataFrame(dict(
        index=[17, 1, 2, 3], kind=["target", "random", "random", "random"],
        delta_loss=[0.5, 0.01, 0.02, 0.6], kl=[0.1, 0.0, 0.0, 0.1])), {"loss": 3.0}, PROV)
    table = findings(striation=stripes, dominant=dominant, d_model=64, ablation=ablation)
    table = table.set_index("claim")
    assert table.loc["stripes (one index, every layer)", "verdict"] == "striated"
    assert findings(striation=flat).verdict.iloc[0] == "no stripes beyond chance"
    assert findings(striation=faint).verdict.iloc[0] == "barely striated (score 1.0x the null)"
    top = table.loc["dominant index 17"]
    assert top.verdict == "stable top index" and "5.00% of the IRM's |output|, 3.2x" in top.finding
    special = table.loc["special under ablation?"]
    # random index 3 ablates more than the target: 2 of 3 beaten, not special
    assert "beats 2/3 random indices" in special.finding
    assert special.verdict == "not special against random indices"


def test_steering_verdicts_say_how_the_two_compare_head_to_head():
    """With the samples kept, the subject and its rival are compared prompt by prompt: below in
    lift, the IRM's sampled point is level with CAA's within the prompts' spread."""
    steering = _steering()
    irm = [0.10, 0.30, 0.00, 0.20]  # per prompt; mean 0.15
    caa = [0.20, 0.10, 0.10, 0.30]  # mean 0.175: above the IRM's, not beyond the spread
    samples = pd.DataFrame(
        [dict(prompt=f"q{p}", sample=0, decoding=decoding, intervention=name, scale=scale,
              anger=score + (decoding == "greedy") * 0.5 * (name == "irm"))
         for decoding in ("greedy", "sampled")
         for name, scale, scores in (("irm", 1.0, irm), ("caa", 4.0, caa))
         for p, score in enumerate(scores)])
    steering = irm_lens.SteeringComparison("anger", steering.table, samples, (),
                                           DegenerationThresholds())
    table = findings(steering=steering).set_index("claim")
    greedy, sampled = table.loc["steered (irm, greedy)"], table.loc["steered (irm, sampled)"]
    assert sampled.verdict == "aligned; below an aligned baseline, level with it head to head"
    assert "head to head -0.025 [" in sampled.finding
    assert greedy.verdict == "aligned; at least the best aligned baseline, above it head to head"
    assert "head to head +0.475 [" in greedy.finding
