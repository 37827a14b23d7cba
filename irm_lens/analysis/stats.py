"""Rank statistics shared by the analyses."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def ranks_descending(values: Float[Tensor, " n"]) -> Tensor:
    """1-based rank of each value, the largest first (ties broken by index)."""
    order = torch.argsort(values, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(values) + 1)
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    ra = ranks_descending(a).double()
    rb = ranks_descending(b).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")
