"""Logit attribution: what a residual index, and the IRM's injected vector, do to the logits
directly (through the final RMSNorm and the unembedding, skipping every later layer).

For a final residual ``x`` (one token), the logits are ``W_U^T (w * x / rms(x)) + b_U`` with
``w`` the final norm's weight. Pushing index ``i`` changes them, to first order, by

    J e_i = (w_i W_U[i] - (x_i / (d_model * rms)) * (logits - b_U)) / rms

(the second term is the push's effect on the RMS itself, which matters for indices that are
already huge). ``direct_effect`` is the norm of ``J e_i`` over the vocabulary (centred, since
a constant shift of every logit changes nothing), averaged over tokens: how loudly index ``i``
speaks to the output per unit of residual.

For the IRM, the vector it adds (summed over its injected layers) is split by index: index
``i``'s share of the IRM's direct logit effect is ``<c_i, L> / ||L||^2``, where ``L`` is the
effect of the whole vector and ``c_i`` the part going through index ``i`` (the shares sum to 1).
The final residual of the steered run is also decomposed into the model's components (embed,
each attention and MLP output; TransformerLens's ``decompose_resid``) plus the IRM's vectors,
each projected on the direction in which steering moved the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens.analysis.conditions import prompts_or_default, steered_sequences
from irm_lens.analysis.indices import check_neuron
from irm_lens.analysis.provenance import Provenance
from irm_lens.analysis.stats import ranks_descending
from irm_lens.data.dataset import right_pad
from irm_lens.errors import ConfigError
from irm_lens.inject import inject
from irm_lens.irm import IRM


@dataclass(frozen=True)
class LogitAttribution:
    """Direct logit effects of residual indices and of an IRM.

    Attributes:
        neuron: The index examined.
        direct_effect: Mean norm of each index's centred logit Jacobian, ``[neuron]``.
        promoted, suppressed: The tokens a positive push on ``neuron`` raises / lowers most
            (``token``, ``logit_change`` per unit push, mean over tokens).
        irm_share: Each index's share of the IRM's direct logit effect, ``[neuron]`` (None
            without an IRM).
        irm_promoted: The tokens the IRM's vector raises most (None without an IRM).
        components: The steered final residual decomposed (``component``, ``attribution``:
            mean projection of its direct logit effect on the unit direction of the steering's
            logit change; ``at_neuron``: the part going through ``neuron``); None without an IRM.
        provenance: Model, IRM, prompts.
    """

    neuron: int
    direct_effect: Float[Tensor, " neuron"]
    promoted: pd.DataFrame
    suppressed: pd.DataFrame
    irm_share: Float[Tensor, " neuron"] | None
    irm_promoted: pd.DataFrame | None
    components: pd.DataFrame | None
    provenance: Provenance

    @property
    def direct_effect_rank(self) -> int:
        """Rank of ``neuron`` by direct effect (1 = loudest)."""
        return int(ranks_descending(self.direct_effect)[self.neuron])

    @property
    def irm_share_rank(self) -> int | None:
        if self.irm_share is None:
            return None
        return int(ranks_descending(self.irm_share)[self.neuron])

    def table(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` indices with the largest direct effect (and IRM share, when measured)."""
        top = self.direct_effect.topk(k).indices.tolist()
        rows = [dict(neuron=n, direct_effect=float(self.direct_effect[n]),
                     irm_share=float(self.irm_share[n]) if self.irm_share is not None else None)
                for n in top]
        return pd.DataFrame(rows)


def _centred_unembed(model: HookedTransformer) -> Float[Tensor, "d_model d_vocab"]:
    w_u = model.W_U.detach().float()
    return w_u - w_u.mean(-1, keepdim=True)


def _final_resid(cache: ActivationCache, real: Tensor
                 ) -> tuple[Float[Tensor, "tok d_model"], Float[Tensor, "tok 1"]]:
    """The final residual and its RMS (``ln_final.hook_scale``) on the real tokens."""
    final = get_act_name("resid_post", cache.model.cfg.n_layers - 1)
    return cache[final][real].float().cpu(), cache[get_act_name("scale")][real].float().cpu()


def _frozen_norm(x: Float[Tensor, "... d_model"], rms: Float[Tensor, "... 1"],
                 w_f: Float[Tensor, " d_model"]) -> Float[Tensor, "... d_model"]:
    """The final RMSNorm with each token's scale held at ``rms``: the direct path's linear map
    from a residual (or a part of it) to what the unembedding reads."""
    return x * w_f / rms


def _token_table(model: HookedTransformer, values: Tensor, k: int, largest: bool) -> pd.DataFrame:
    top = values.topk(k, largest=largest)
    return pd.DataFrame(dict(
        token=[model.tokenizer.decode([t]) for t in top.indices.tolist()],
        token_id=top.indices.tolist(),
        logit_change=top.values.tolist(),
    ))


def logit_attribution(
    model: HookedTransformer,
    neuron: int,
    irm: IRM | None = None,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int = 16,
    max_new_tokens: int = 16,
    k_tokens: int = 15,
    batch_size: int = 8,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
    progress: bool = True,
) -> LogitAttribution:
    """Direct logit effects of ``neuron`` (and of ``irm``'s vector) on the prompts' tokens.

    The tokens are the prompts (chat template) and, with an IRM, the steered model's greedy
    continuations of them; without one, the unsteered model's. ``sequences``: those token ids
    already generated (each prompt's ids and its continuation's, as ``IRMOutputs.sequences``
    holds them), so that they are not generated again.
    """
    neuron = check_neuron(model, neuron)
    prompts = prompts_or_default(prompts, n_prompts)
    if sequences is None:
        rows, _ = steered_sequences(model, irm, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=progress)
    elif len(sequences) != len(prompts):
        raise ConfigError(f"sequences has {len(sequences)} rows for {len(prompts)} prompts.")
    else:
        rows = [(list(p), list(g)) for p, g in sequences]
    w_u = _centred_unembed(model)  # [d_model, d_vocab]
    # Every product with the unembedding that ends in a d_model vector goes through its Gram
    # matrix: (n W_U) W_U^T = n G, |n W_U|^2 = n G n^T, so no [tok, d_vocab] product is formed.
    gram = w_u @ w_u.T  # [d_model, d_model]
    w_f = model.ln_final.w.detach().float()  # [d_model]
    d_model = model.cfg.d_model
    names = [get_act_name("resid_post", model.cfg.n_layers - 1), get_act_name("scale")]
    pad_id = model.tokenizer.pad_token_id or 0

    effect_sum = torch.zeros(d_model, dtype=torch.float64)
    n_tok = 0
    irm_num = torch.zeros(d_model, dtype=torch.float64) if irm is not None else None
    irm_den = 0.0
    irm_logits = torch.zeros(w_u.shape[1], dtype=torch.float64) if irm is not None else None
    comp_sum: dict[str, float] = {}
    comp_at: dict[str, float] = {}
    for start in range(0, len(rows), batch_size):
        ids, real, _ = right_pad([p + g for p, g in rows[start : start + batch_size]], pad_id)
        real = real.bool()
        ids = ids.to(model.cfg.device)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=names)
        x, rms = _final_resid(cache, real)  # [tok, d_model], [tok, 1]
        normed = _frozen_norm(x, rms, w_f)  # b = normed W~_U: centred logits without bias
        b_gram = normed @ gram  # b W~_U^T  [tok, d_model]
        a_dot_b = b_gram * w_f  # w_i W~_U[i] . b  [tok, d_model]
        a_sq = (w_f**2) * gram.diagonal()  # [d_model]
        c = x / (d_model * rms)  # [tok, d_model]
        b_sq = (b_gram * normed).sum(-1, keepdim=True)  # |b|^2  [tok, 1]
        sq = a_sq - 2 * c * a_dot_b + c**2 * b_sq
        effect_sum += (sq.clamp_min(0).sqrt() / rms).double().sum(0)
        n_tok += x.shape[0]
        if irm is not None:
            num, den, logits, comps, at = _irm_terms(model, irm, ids, real, neuron, w_u, gram,
                                                     w_f, cache)
            irm_num += num
            irm_den += den
            irm_logits += logits
            for name, value in comps.items():
                comp_sum[name] = comp_sum.get(name, 0.0) + value
                comp_at[name] = comp_at.get(name, 0.0) + at[name]

    direct = (effect_sum / n_tok).float()
    push = (w_f[neuron] * w_u[neuron]).double()  # per unit of normalised residual
    irm_share = (irm_num / max(irm_den, 1e-30)).float() if irm is not None else None
    components = None
    if irm is not None:
        components = pd.DataFrame([
            dict(component=name, attribution=comp_sum[name] / n_tok, at_neuron=comp_at[name] / n_tok)
            for name in comp_sum
        ]).sort_values("attribution", key=abs, ascending=False, ignore_index=True)
    return LogitAttribution(
        neuron=neuron,
        direct_effect=direct,
        promoted=_token_table(model, push, k_tokens, largest=True),
        suppressed=_token_table(model, push, k_tokens, largest=False),
        irm_share=irm_share,
        irm_promoted=(_token_table(model, irm_logits / n_tok, k_tokens, largest=True)
                      if irm is not None else None),
        components=components,
        provenance=Provenance.of(model, irm, prompts),
    )


def _irm_terms(model, irm: IRM, ids: Tensor, real: Tensor, neuron: int, w_u: Tensor,
               gram: Tensor, w_f: Tensor, clean: ActivationCache):
    """One batch's IRM share numerators / denominator, summed logit effect, and component
    attributions along the steering's logit direction (``clean``: the unsteered run's final
    residual and scale on the same ids)."""
    n_layers = model.cfg.n_layers
    # What _final_resid and decompose_resid read, and nothing else (no attention pattern, so
    # the fused attention applies).
    names = {get_act_name("resid_post", n_layers - 1), get_act_name("scale"), "hook_embed",
             "hook_pos_embed"}
    names |= {get_act_name(kind, layer) for layer in range(n_layers)
              for kind in ("attn_out", "mlp_out")}
    deltas: list[Tensor] = []
    with torch.no_grad(), inject(model, irm, on_output=deltas.append):
        _, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)
    x, rms = _final_resid(cache, real)  # [tok, d_model], [tok, 1]
    vec = deltas[0].sum(2)[real].float().cpu()  # [tok, d_model]: the IRM's summed push
    per_index = _frozen_norm(vec, rms, w_f)  # [tok, d_model]
    # total = per_index W~_U, the IRM's logit effect per token [tok, vocab], through the Gram
    # matrix: total W~_U^T = per_index G
    along_total = (per_index @ gram) * per_index  # [tok, d_model]
    num = along_total.double().sum(0)  # sum_t <c_i, L_t>
    den = float(along_total.sum())  # sum_t |L_t|^2
    summed = per_index.double().sum(0) @ w_u.double()  # sum_t L_t  [vocab]

    # Direction in which steering moved the (centred) logits, averaged over tokens.
    # (steered logits - clean logits) averaged over tokens, the mean taken before W~_U
    moved = _frozen_norm(x, rms, w_f) - _frozen_norm(*_final_resid(clean, real), w_f)
    shift = moved.mean(0) @ w_u  # [vocab]
    direction = shift / shift.norm().clamp_min(1e-30)  # [vocab]
    along = w_u @ direction  # [d_model]: each index's unembedding along the direction
    stack, labels = cache.decompose_resid(layer=n_layers, return_labels=True, mode="all")
    stack = stack[:, real].float().cpu()  # [comp, tok, d_model]
    irm_total = x - stack.sum(0)
    stack = torch.cat([stack, irm_total[None]])
    labels = [*labels, "irm"]
    contrib = _frozen_norm(stack, rms, w_f)  # [comp, tok, d_model]
    attribution = (contrib @ along).sum(1)  # [comp]
    at_neuron = (contrib[..., neuron] * along[neuron]).sum(1)
    comps = {lab: float(v) for lab, v in zip(labels, attribution)}
    at = {lab: float(v) for lab, v in zip(labels, at_neuron)}
    return num, den, summed, comps, at
