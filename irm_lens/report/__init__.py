"""Reports: plotly figures from result objects, assembled into one self-contained HTML file."""

from irm_lens.report.html import report

__all__ = ["report"]
