"""Analyses that find the neuron an IRM relies on and explain why: one module per analysis.

``check_neuron`` is the one place a residual index is validated; ``standout_indices`` names the
indices whose RMSNorm weights stand out (a pointer computed from the weights alone).
"""

from irm_lens.analysis.indices import check_neuron, standout_indices

__all__ = ["check_neuron", "standout_indices"]
