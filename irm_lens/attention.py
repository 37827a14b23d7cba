"""Fused attention for the HookedTransformer: one ``scaled_dot_product_attention`` call in place
of TransformerLens's explicit score matrix, softmax and pattern product.

TransformerLens computes attention as ``softmax(q k^T / sqrt(d_head) + mask) @ v`` with every
intermediate kept for the backward pass, so that ``hook_attn_scores`` and ``hook_pattern`` can be
read. IRM training and most analyses never read those two hook points, and paying for them made
a training step 1.34x slower than the same computation in Hugging Face's SDPA kernels.

``set_attention(model, "sdpa")`` (what ``load_model`` does by default) swaps each block's
attention module for a subclass whose forward takes the fused kernel *only while nothing is
hooked on that block's ``hook_attn_scores`` or ``hook_pattern``*; as soon as a hook is attached
there (``run_with_cache`` without a filter, a pattern-patching hook, ...) that block falls back to
TransformerLens's own forward for that call. Every other hook point (``hook_q/k/v``,
``hook_rot_q/k``, ``hook_z``, ``hook_attn_out``, the residual stream) fires the same in both
paths. The fused path covers causal, rotary or absolute-position attention with or without a
padding mask and a key-value cache (generation); anything else (ALiBi, soft-capping, attention
sinks, QK-norm, ``use_attn_result``, 4-bit weights) always uses TransformerLens's forward.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import einops
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention
from transformer_lens.utilities.activation_functions import softcap_enabled

from .errors import ConfigError
from .hooks import is_hooked

AttentionKind = Literal["sdpa", "eager"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)

_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def check_attention_kind(kind: str) -> None:
    """Raise ``ConfigError`` unless ``kind`` is one of ``ATTENTION_KINDS``."""
    if kind not in ATTENTION_KINDS:
        raise ConfigError(f"attention must be 'sdpa' or 'eager', got {kind!r}.")


class _SDPAMixin(AbstractAttention):
    """The fused forward; falls back to the TransformerLens forward whenever it cannot match it.
    (A subclass of ``AbstractAttention`` rather than a bare mixin, so that the concrete classes
    keep their bases' object layout and ``__class__`` can be swapped in place.)"""

    def _sdpa_applies(self, additive_attention_mask: Any, position_bias: Any) -> bool:
        cfg = self.cfg
        return (
            additive_attention_mask is None
            and position_bias is None
            and cfg.positional_embedding_type in ("rotary", "standard")
            and (self._attention_dir_override or cfg.attention_dir) == "causal"
            and self.attn_type == "global"
            and not cfg.use_attn_result
            and not cfg.load_in_4bit
            and not cfg.use_attention_sinks
            and not cfg.use_logn_attn
            and cfg.clip_qkv is None
            and not softcap_enabled(cfg.attn_scores_soft_cap)
            and cfg.original_architecture not in _QK_NORM_ARCHITECTURES
            and not is_hooked(self.hook_attn_scores)
            and not is_hooked(self.hook_pattern)
        )

    def forward(  # type: ignore[override]
        self,
        query_input: Float[Tensor, "batch pos d_model"],
        key_input: Float[Tensor, "batch kv_pos d_model"],
        value_input: Float[Tensor, "batch kv_pos d_model"],
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Float[Tensor, "batch 1 1 kv_pos"] | None = None,
        attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
        position_bias: Float[Tensor, "1 head_index pos kv_pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not self._sdpa_applies(additive_attention_mask, position_bias):
            return super().forward(  # type: ignore[misc]
                query_input,
                key_input,
                value_input,
                past_kv_cache_entry=past_kv_cache_entry,
                additive_attention_mask=additive_attention_mask,
                attention_mask=attention_mask,
                position_bias=position_bias,
            )
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        offset = 0
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        if self.cfg.positional_embedding_type == "rotary":
            q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
            k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
        z = self._sdpa_z(q, k, v, offset, attention_mask)
        z = self.hook_z(z)  # [batch, pos, head_index, d_head]
        w = einops.rearrange(self.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
        z = einops.rearrange(z, "batch pos head_index d_head -> batch pos (head_index d_head)")
        return F.linear(z.to(w.dtype), w, self.b_O)

    def _sdpa_z(
        self,
        q: Float[Tensor, "batch pos head_index d_head"],
        k: Float[Tensor, "batch kv_pos kv_head_index d_head"],
        v: Float[Tensor, "batch kv_pos kv_head_index d_head"],
        offset: int,
        attention_mask: Int[Tensor, "batch kv_pos"] | None,
    ) -> Float[Tensor, "batch pos head_index d_head"]:
        n_query, n_key = q.shape[1], k.shape[1]
        grouped = k.shape[2] != q.shape[2]
        mask = None
        if attention_mask is not None or offset:
            causal = self._make_causal_mask(n_query, n_key, offset, q.device)  # [1, 1, pos, kv]
            mask = causal if attention_mask is None else causal & attention_mask.bool()[:, None, None]
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=mask,
            is_causal=mask is None,
            scale=1.0 / self.attn_scale,
            enable_gqa=grouped,
        ).transpose(1, 2)  # [batch, pos, head_index, d_head]
        if mask is not None:
            # A query with no key to attend to (left padding): TransformerLens's pattern is all
            # zeros there, so z is zero; SDPA's output for such a row is not defined alike.
            z = z.masked_fill(~mask.any(-1).transpose(1, 2)[..., None], 0.0)
        return z


class SDPAttention(_SDPAMixin, Attention):
    """``Attention`` with the fused forward (see the module docstring)."""


class SDPAGroupedQueryAttention(_SDPAMixin, GroupedQueryAttention):
    """``GroupedQueryAttention`` with the fused forward (see the module docstring)."""


_FUSED = {Attention: SDPAttention, GroupedQueryAttention: SDPAGroupedQueryAttention}
_EAGER = {fused: base for base, fused in _FUSED.items()}


def set_attention(model: HookedTransformer, kind: AttentionKind = "sdpa") -> HookedTransformer:
    """Choose the attention kernel of every block: ``"sdpa"`` (fused, used whenever the block's
    ``hook_attn_scores`` and ``hook_pattern`` are not hooked) or ``"eager"`` (TransformerLens's
    explicit computation, always). Modifies ``model`` in place and returns it. Weights, hook
    names and results are unchanged (equal up to float rounding)."""
    check_attention_kind(kind)
    table = _FUSED if kind == "sdpa" else _EAGER
    for block in model.blocks:
        cls = type(block.attn)
        if cls in table:
            block.attn.__class__ = table[cls]
    return model


def attention_kind(model: HookedTransformer) -> AttentionKind:
    """``"sdpa"`` if every block uses the fused forward, else ``"eager"``."""
    fused = all(isinstance(block.attn, _SDPAMixin) for block in model.blocks)
    return "sdpa" if fused else "eager"
