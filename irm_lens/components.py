"""Faster TransformerLens components for the frozen model: the same hook points and the same
numbers (bitwise, or to float rounding where said), fewer copies per forward pass.

- **Weights in Hugging Face's memory layout.** TransformerLens keeps weights in the layout of
  its maths (``W_in: [d_model, d_mlp]``, ``W_Q: [head_index, d_model, d_head]``,
  ``W_U: [d_model, d_vocab]``) and, to multiply as ``nn.Linear`` does, transposes them on every
  forward pass: ``F.linear(x, W_in.T.contiguous())`` in the MLP and the unembedding, an
  ``einops.rearrange`` for the attention projections. Each is a copy of the weight, pass after
  pass (the unembedding's alone is 28M floats on the embedded model). ``use_fast_components``
  stores those weights so that the transposed form asked for is already contiguous: the same
  tensors, shapes and values, other strides. The transposes become views and ``F.linear``
  receives exactly the memory it received before, so results are bitwise the same.
- **The unembedding without a zero bias.** ``F.linear`` with a bias runs ``addmm``, which first
  copies the bias into every row of the ``[batch x pos, d_vocab]`` output; every Llama's
  unembedding bias is zero. ``ZeroBiasUnembed`` leaves it out while it is all zeros (checked on
  every pass, so an edit of the bias counts): bitwise the same logits.
- **RMSNorm as Hugging Face computes it.** TransformerLens divides by ``sqrt(mean(x^2) + eps)``,
  whose backward takes several divisions per norm; ``FastRMSNorm`` multiplies by ``rsqrt`` (as
  ``LlamaRMSNorm`` does) while nothing is attached to its ``hook_scale`` or
  ``hook_normalized``, and takes TransformerLens's forward, hook points and all, when something
  is. Equal to float rounding (one ulp of the normalised value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.components import RMSNorm, Unembed

from irm_lens.hooks import is_hooked

# (parameter path relative to a block, the permutation TransformerLens makes contiguous on
# every forward pass)
_BLOCK_LAYOUTS = (
    ("mlp.W_gate", (1, 0)),
    ("mlp.W_in", (1, 0)),
    ("mlp.W_out", (1, 0)),
    ("attn.W_Q", (0, 2, 1)),  # "head_index d_model d_head -> (head_index d_head) d_model"
    ("attn.W_K", (0, 2, 1)),
    ("attn.W_V", (0, 2, 1)),
    ("attn._W_K", (0, 2, 1)),  # grouped-query attention's unexpanded keys and values
    ("attn._W_V", (0, 2, 1)),
    ("attn.W_O", (2, 0, 1)),  # "head_index d_head d_model -> d_model (head_index d_head)"
)


def use_fast_components(model: HookedTransformer) -> HookedTransformer:
    """Give ``model`` the faster components of the module docstring (what ``load_model``
    does). In place; returns ``model``. Idempotent."""
    for block in model.blocks:
        for path, perm in _BLOCK_LAYOUTS:
            owner_path, _, name = path.rpartition(".")
            param = block.get_submodule(owner_path)._parameters.get(name)
            if isinstance(param, nn.Parameter) and param.dim() == len(perm):
                _store_permuted(param, perm)
    _store_permuted(model.unembed.W_U, (1, 0))
    if type(model.unembed) is Unembed:
        model.unembed.__class__ = ZeroBiasUnembed
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FastRMSNorm
    return model


def _store_permuted(param: nn.Parameter, perm: tuple[int, ...]) -> None:
    """Make ``param.permute(perm)`` contiguous, keeping ``param``'s shape and values."""
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    param.data = param.data.permute(perm).contiguous().permute(inverse)


class ZeroBiasUnembed(Unembed):
    """``Unembed`` that leaves out its bias while the bias is all zeros (the same logits)."""

    def forward(
        self, residual: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_vocab_out"]:
        residual = self.hook_in(residual)
        bias = self.b_U if bool(self.b_U.detach().any()) else None
        return self.hook_out(F.linear(residual, self.W_U.T.contiguous(), bias))


class FastRMSNorm(RMSNorm):
    """``RMSNorm`` computed as ``LlamaRMSNorm`` computes it while its hook points are free."""

    def forward(self, x: Float[Tensor, "batch pos length"]) -> Float[Tensor, "batch pos length"]:
        if is_hooked(self.hook_scale) or is_hooked(self.hook_normalized):
            return super().forward(x)
        x32 = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [batch, pos, 1]
        return (x32 * inverse_rms).to(self.cfg.dtype) * self.w
