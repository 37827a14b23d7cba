"""Analyses that find the neuron an IRM relies on and explain why: one module per analysis."""
