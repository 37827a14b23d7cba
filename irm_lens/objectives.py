"""What an IRM is trained to do: one batch's loss for each training objective.

* ``"lm"`` (the paper): next-token cross-entropy on text in the target tone (or on chat
  replies), mean over scored tokens.
* ``"preference"``: on ``(prompt, chosen, rejected)`` pairs (the same question answered in the
  tone and neutrally), DPO's loss with the unsteered model as the reference (as bi-directional
  preference optimisation trains steering vectors, Cao et al. 2024):
  ``-log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))``,
  mean over pairs, where ``log p`` sums over a reply's tokens; plus, optionally,
  ``chosen_lm`` times the chosen replies' token-mean cross-entropy.

Either objective can add a **fluency** term: ``kl`` times the KL divergence from the unsteered
to the steered next-token distribution, mean over the tokens of neutral text; and a
**diversity** term: ``entropy`` times how far the steered next-token entropy falls below the
unsteered model's where the training replies are predicted (``entropy_shortfall``), so that
steering may move the distribution but not sharpen it (a sharpened IRM writes the same phrases
for every prompt, and sampling no longer varies them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens.data.dataset import (
    Example,
    PreferencePair,
    TokenizedTexts,
    batch_slice,
    tokenize_texts,
)
from irm_lens.data.precomputed import cached, content_key
from irm_lens.errors import ConfigError
from irm_lens.inject import inject
from irm_lens.irm import IRM
from irm_lens.losses import (
    logits_at,
    masked_lm_loss,
    predicting,
    sequence_logprobs,
    sequence_sums,
    token_mean,
    token_nll,
)

OBJECTIVES: tuple[str, ...] = ("lm", "preference")
# A batch's logits as an objective reads them: all of them, or only the rows of the positions
# that predict a scored token (``irm_lens.losses.logits_at``), which is what training passes.
Logits = Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_scored d_vocab"]


@dataclass(frozen=True)
class Batch:
    """One forward pass's inputs and what its loss needs.

    Attributes:
        ids / mask / scored: Token ids, real-token mask, scored-token mask ``[batch, pos]``.
        n_units: What the loss is a mean over (scored tokens, or pairs): weights for averaging
            over batches and ranks.
        ref_margin: For preference batches, ``log p_ref(chosen) - log p_ref(rejected)`` per pair.
    """

    ids: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    scored: Int[Tensor, "batch pos"]
    n_units: int
    ref_margin: Float[Tensor, " pairs"] | None = None

    def to(self, device: str | torch.device) -> Batch:
        """The same batch with its token tensors on ``device``."""
        return replace(self, ids=self.ids.to(device), mask=self.mask.to(device),
                       scored=self.scored.to(device))


class LMObjective:
    """Token-mean cross-entropy on texts or chat replies (the paper's objective)."""

    def __init__(self, data: TokenizedTexts):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def n_truncated(self) -> int:
        """Texts cut at ``max_length``."""
        return self.data.n_truncated

    def batch(self, index: Int[Tensor, " batch"]) -> Batch:
        ids, mask, scored = batch_slice(self.data, index)
        return Batch(ids, mask, scored, int(scored[:, 1:].sum()))

    def loss(self, logits: Logits, batch: Batch) -> Float[Tensor, ""]:
        return masked_lm_loss(logits, batch.ids, batch.scored)


class PreferenceObjective:
    """DPO on ``(prompt, chosen, rejected)`` pairs, the unsteered model as reference."""

    def __init__(self, model: HookedTransformer, pairs: Sequence[PreferencePair], *,
                 max_length: int, beta: float, chosen_lm: float, batch_size: int = 8):
        pairs = list(pairs)
        self.chosen = tokenize_texts(model, [(p, c) for p, c, _ in pairs], max_length=max_length)
        self.rejected = tokenize_texts(model, [(p, r) for p, _, r in pairs], max_length=max_length)
        if len(self.chosen) != len(pairs) or len(self.rejected) != len(pairs):
            raise ConfigError(
                f"Some preference pairs leave no reply token within max_length={max_length}; "
                "raise max_length or shorten the prompts."
            )
        self.beta, self.chosen_lm = beta, chosen_lm
        # The frozen model's margins: shipped for the embedded model's recipe pairs
        # (irm_lens.data.precomputed), else computed here.
        self.reference_key = content_key(
            "reference-margins", model, batch_size, self.chosen.input_ids, self.chosen.loss_mask,
            self.rejected.input_ids, self.rejected.loss_mask,
        )
        self.ref_margin = cached(self.reference_key, lambda: {
            "ref_margin": self.reference_margins(model, batch_size)})["ref_margin"]

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def n_truncated(self) -> int:
        """Replies (chosen or rejected) cut at ``max_length``."""
        return self.chosen.n_truncated + self.rejected.n_truncated

    def _stack(self, index: Int[Tensor, " batch"]) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen rows then rejected rows of ``index``, right-padded to one width."""
        parts = [batch_slice(self.chosen, index), batch_slice(self.rejected, index)]
        width = max(p[0].shape[1] for p in parts)
        padded = [[F.pad(t, (0, width - t.shape[1])) for t in part] for part in parts]
        return tuple(torch.cat([a, b]) for a, b in zip(*padded))  # each [2 * batch, pos]

    @torch.no_grad()
    def reference_margins(self, model: HookedTransformer, batch_size: int = 8,
                          stop: int | None = None) -> Float[Tensor, " pairs"]:
        """The frozen model's ``log p(chosen) - log p(rejected)`` of the pairs (the first
        ``stop`` of them), computed in batches of ``batch_size`` consecutive pairs."""
        margins, stop = [], len(self) if stop is None else min(stop, len(self))
        for start in range(0, stop, batch_size):
            index = torch.arange(start, min(start + batch_size, stop))
            ids, _, scored = (t.to(model.cfg.device) for t in self._stack(index))
            logp = sequence_logprobs(model(ids), ids, scored).cpu()  # [2 * batch]
            margins.append(logp[: len(index)] - logp[len(index) :])
        return torch.cat(margins)

    def batch(self, index: Int[Tensor, " batch"]) -> Batch:
        ids, mask, scored = self._stack(index)
        return Batch(ids, mask, scored, len(index), self.ref_margin[index])

    def loss(self, logits: Logits, batch: Batch) -> Float[Tensor, ""]:
        n = batch.n_units
        nll, weight = token_nll(logits, batch.ids, batch.scored)  # [2 * pairs, pos] each
        logp = sequence_sums(nll, weight)  # [2 * pairs]
        margin = logp[:n] - logp[n:] - batch.ref_margin.to(logp.device)
        loss = -F.logsigmoid(self.beta * margin).mean()
        if self.chosen_lm > 0:
            loss = loss + self.chosen_lm * token_mean(nll[:n], weight[:n])
        return loss


def build_objective(
    model: HookedTransformer, examples: Sequence[Example | PreferencePair], *, objective: str,
    max_length: int, beta: float = 0.1, chosen_lm: float = 0.0,
    prompts: Sequence[str] | None = None,
) -> LMObjective | PreferenceObjective:
    """The objective named ``objective`` over ``examples`` (texts, chat examples or pairs)."""
    triples = [x for x in examples if isinstance(x, tuple) and len(x) == 3]
    if objective == "preference":
        if len(triples) != len(examples):
            raise ConfigError(
                "objective='preference' trains on (prompt, chosen, rejected) pairs; got texts. "
                "Make pairs with irm_lens.generate_pairs (irm-lens pairs), or use objective='lm'."
            )
        return PreferenceObjective(model, triples, max_length=max_length, beta=beta,
                                   chosen_lm=chosen_lm)
    if objective != "lm":
        raise ConfigError(f"Unknown objective {objective!r}; choose from {OBJECTIVES}.")
    if triples:
        raise ConfigError("Preference pairs need objective='preference' (--objective preference).")
    return LMObjective(tokenize_texts(model, examples, max_length=max_length, prompts=prompts))


def kl_to_unsteered(
    model: HookedTransformer, irm: IRM | torch.nn.Module,
    ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"],
    positions: Callable[[Tensor], Tensor | None] | None = None,
) -> Float[Tensor, ""]:
    """KL(unsteered || steered) of the next-token distributions, mean over real positions."""
    where = mask.bool()
    with torch.no_grad():
        ref = logits_at(model, ids, where).float().log_softmax(-1)  # [n_real, d_vocab]
    with inject(model, irm, positions=positions(mask) if positions else None):
        steered = logits_at(model, ids, where).float().log_softmax(-1)
    return mean_kl(ref, steered, mask)


def mean_kl(
    ref: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_real d_vocab"],
    steered: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_real d_vocab"],
    mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """KL(ref || steered) of two log-probability tensors, mean over the positions in ``mask``:
    both ``[batch, pos, d_vocab]``, or only the rows of those positions (row-major)."""
    per_token = (ref.exp() * (ref - steered)).sum(-1)  # [batch, pos], or [n_real]
    weight = mask.to(per_token.dtype)
    if per_token.ndim == 1:
        per_token = torch.zeros_like(weight).masked_scatter(mask.bool(), per_token)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def entropy_shortfall(
    model: HookedTransformer, logits: Logits,
    ids: Int[Tensor, "batch pos"], scored: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Mean of ``max(0, H_unsteered - H_steered)`` (nats) over the positions that predict a
    scored token; ``logits`` are the steered ones of ``ids`` (all of them, or those positions'
    rows), the unsteered ones are computed here (so call it outside ``inject``)."""
    where = predicting(scored)
    with torch.no_grad():
        ref = logits_at(model, ids, where).float().log_softmax(-1)  # [n_scored, d_vocab]
    steered = (logits if logits.ndim == 2 else logits[where]).float().log_softmax(-1)
    h_ref = -(ref.exp() * ref).sum(-1)
    h_steered = -(steered.exp() * steered).sum(-1)  # [n_scored]
    weight = scored[:, 1:].to(h_ref.dtype)  # [batch, pos - 1]
    shortfall = torch.zeros_like(weight).masked_scatter(
        where[:, :-1], (h_ref - h_steered).clamp_min(0))
    return (shortfall * weight).sum() / weight.sum().clamp_min(1.0)


def kl_batch(data: TokenizedTexts, step: int, batch_size: int) -> Int[Tensor, " batch"]:
    """The rows of the fluency texts used at ``step``: consecutive, wrapping (resume-safe)."""
    start = (step * batch_size) % len(data)
    return (torch.arange(batch_size) + start) % len(data)

