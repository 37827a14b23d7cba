"""The language-model losses that training, evaluation and the analyses share.

One shift and one mask for all of them: position t predicts token t+1, and token t+1 counts
when ``loss_mask[t+1]`` is 1 (padding, and for chat examples the prompt, never do).
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def token_nll(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Each position's cross-entropy for the next token, and its weight (1 where scored).

    The targets are shifted, not the logits: slicing ``[batch, pos, d_vocab]`` would copy it
    (and its gradient) once more. The last position predicts nothing: target 0 with weight 0.
    """
    target = F.pad(input_ids[:, 1:], (0, 1))  # [batch, pos]
    weight = F.pad(loss_mask[:, 1:], (0, 1)).to(torch.float32)  # [batch, pos]
    flat_logits = einops.rearrange(logits.float(), "batch pos d_vocab -> (batch pos) d_vocab")
    flat_target = einops.rearrange(target, "batch pos -> (batch pos)")
    nll = F.cross_entropy(flat_logits, flat_target, reduction="none")
    return einops.rearrange(nll, "(batch pos) -> batch pos", batch=weight.shape[0]), weight


def scored_rows(
    resid: Float[Tensor, "batch pos d_model"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "n_scored d_model"], Int[Tensor, " n_scored"]]:
    """The positions whose next token is scored, and those tokens: what ``masked_lm_loss``
    averages over, for callers that unembed only the rows they score."""
    scored = loss_mask[:, 1:].bool()  # [batch, pos - 1]: position t predicts token t + 1
    return resid[:, :-1][scored], input_ids[:, 1:][scored]


def masked_lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the scored target tokens."""
    nll, weight = token_nll(logits, input_ids, loss_mask)
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)


def sequence_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, " batch"]:
    """Each sequence's summed log-probability of its scored target tokens: a reply's
    log-likelihood given its prompt."""
    nll, weight = token_nll(logits, input_ids, loss_mask)
    return -(nll * weight).sum(dim=1)
