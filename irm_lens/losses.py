"""The language-model losses that training, evaluation and the analyses share.

One shift and one mask for all of them: position t predicts token t+1, and token t+1 counts
when ``loss_mask[t+1]`` is 1 (padding, and for chat examples the prompt, never do).

A loss reads the logits of the positions that predict a scored token (``predicting``) and no
others, so those rows alone need unembedding (``logits_at``): a chat reply is a fraction of its
sequence, and the unembedding (``d_vocab`` wide) is a fifth of a small model's forward pass.
The losses take either the full ``[batch, pos, d_vocab]`` logits or those rows.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


def predicting(loss_mask: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The positions whose next token is scored (the last position predicts nothing)."""
    return F.pad(loss_mask[:, 1:], (0, 1)).bool()


def next_tokens(input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """The token each position predicts (0 at the last position, which predicts nothing)."""
    return F.pad(input_ids[:, 1:], (0, 1))


def unembed_rows(model: HookedTransformer, rows: Float[Tensor, "n d_model"]
                 ) -> Float[Tensor, "n d_vocab"]:
    """The logits of residual-stream rows after the last block (final norm, then unembedding),
    each row as a full forward pass computes it."""
    return model.unembed(model.ln_final(rows[None]))[0]


def logits_at(model: HookedTransformer, ids: Int[Tensor, "batch pos"],
              where: Bool[Tensor, "batch pos"]) -> Float[Tensor, "n d_vocab"]:
    """``model(ids)[where]`` (row-major order; under any hooks in place), with only those
    positions unembedded."""
    return unembed_rows(model, model(ids, stop_at_layer=model.cfg.n_layers)[where])


def token_nll(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_scored d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Each position's cross-entropy for the next token, and its weight (1 where scored).

    ``logits`` are ``[batch, pos, d_vocab]``, or only the rows of the positions that predict a
    scored token (``[n_scored, d_vocab]``, row-major: ``logits_at(model, ids,
    predicting(loss_mask))``), whose cross-entropy is then 0 where unscored (weight 0 either way).
    The targets are shifted, not the logits: slicing ``[batch, pos, d_vocab]`` would copy it
    (and its gradient) once more. The last position predicts nothing: target 0 with weight 0.
    """
    target = next_tokens(input_ids)  # [batch, pos]
    weight = F.pad(loss_mask[:, 1:], (0, 1)).to(torch.float32)  # [batch, pos]
    if logits.ndim == 2:
        where = predicting(loss_mask)
        scored = F.cross_entropy(logits.float(), target[where], reduction="none")
        return torch.zeros_like(weight).masked_scatter(where, scored), weight
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
    where = predicting(loss_mask)
    return resid[where], next_tokens(input_ids)[where]


def masked_lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_scored d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the scored target tokens."""
    return token_mean(*token_nll(logits, input_ids, loss_mask))


def token_mean(nll: Float[Tensor, "batch pos"], weight: Float[Tensor, "batch pos"]
               ) -> Float[Tensor, ""]:
    """``token_nll``'s mean over the scored tokens."""
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)


def sequence_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_scored d_vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, " batch"]:
    """Each sequence's summed log-probability of its scored target tokens: a reply's
    log-likelihood given its prompt."""
    return sequence_sums(*token_nll(logits, input_ids, loss_mask))


def sequence_sums(nll: Float[Tensor, "batch pos"], weight: Float[Tensor, "batch pos"]
                  ) -> Float[Tensor, " batch"]:
    """``token_nll``'s log-probability of each sequence's scored tokens."""
    return -(nll * weight).sum(dim=1)
