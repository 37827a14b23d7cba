"""``inject``: run a HookedTransformer with an IRM's outputs added to its residual stream."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from irm_lens.errors import ConfigError, ShapeMismatchError
from irm_lens.hooks import permanent_hooks
from irm_lens.irm import IRM


@contextmanager
def inject(
    model: HookedTransformer,
    irm: IRM,
    *,
    scale: float | Float[Tensor, "n_injected d_model"] = 1.0,
    on_output: Callable[[Tensor], None] | None = None,
    positions: Float[Tensor, "batch pos"] | Literal["generated"] | None = None,
) -> Iterator[None]:
    """Add ``irm``'s per-token outputs to ``model``'s residual stream inside a ``with`` block.

    Every forward pass inside the block (``model(...)``, ``run_with_cache``, ``run_with_hooks``,
    ``generate`` with or without the KV cache, padded batches, backward passes for training)
    reads the IRM's input at ``irm.config.read_site`` and adds output ``i`` to
    ``irm.config.hook_names()[i]``. With the KV cache only new tokens pass through the model,
    and since the IRM acts on each token separately the result equals the uncached run.

    The hooks are registered as permanent TransformerLens hooks, so ``model.reset_hooks()`` and
    the temporary hooks of ``run_with_cache`` leave them alone; they are removed on exit, even
    when the block raises. Nesting several ``inject`` blocks stacks their interventions.

    Args:
        model: The host model.
        irm: An IRM built for ``model`` (same d_model and n_layers).
        scale: Multiplies the IRM's outputs (1.0 = as trained; 0.0 = no effect), or a
            ``[n_injected, d_model]`` tensor of per-layer, per-index factors (e.g. a mask that
            keeps only one neuron's output at one layer, as activation patching does).
        on_output: Called with each forward pass's IRM output ``[batch, pos, n_injected,
            d_model]`` (after ``positions``, before ``scale``), e.g. for an L1 penalty.
        positions: Which positions are steered. ``None``: all. A ``[batch, pos]`` 0/1 tensor:
            those positions of a forward pass of that shape (training on chat examples with
            ``IRMConfig.steer="reply"``). ``"generated"``: in a pass over several positions only
            the last one, and every position of a one-token pass, which under cached decoding
            (``generate`` with the KV cache, left padding) steers exactly the position that
            predicts the first new token and every new token, while the prompt is read
            unsteered.

    Example:
        >>> with irm_lens.inject(model, irm):  # doctest: +SKIP
        ...     steered = model.generate("How was the meeting?", max_new_tokens=30)
    """
    irm.check_compatible(model)
    check_positions(positions)
    if isinstance(scale, Tensor):
        expected = (irm.config.n_injected, irm.config.d_model)
        if tuple(scale.shape) != expected:
            raise ShapeMismatchError(
                f"A tensor scale must have shape [n_injected, d_model] = {list(expected)}, got "
                f"{list(scale.shape)}."
            )
    # The current forward pass's IRM output lives here, in the context, never on the IRM.
    pass_state: dict[str, Tensor] = {}
    last = irm.config.n_injected - 1

    def read(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> None:
        delta = irm(resid)  # [batch, pos, n_injected, d_model]
        steered = position_mask(positions, resid)
        if steered is not None:
            delta = delta * steered.to(device=delta.device, dtype=delta.dtype)[..., None, None]
        if on_output is not None:
            on_output(delta)
        # Output i goes to injected layer i. One unbind for all layers: its backward stacks the
        # layers' gradients once, where a select per layer would fill a zero tensor of the whole
        # output for each layer.
        per_layer = einops.rearrange(
            delta, "batch pos n_injected d_model -> n_injected batch pos d_model")
        pass_state["delta"] = per_layer.unbind(0)  # n_injected x [batch, pos, d_model]

    def write_for(i: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def write(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
            delta = pass_state.get("delta")
            if delta is None:
                raise RuntimeError(
                    f"inject(): {hook.name} ran without the IRM's input {irm.config.read_site} "
                    "in the same forward pass (start_at_layer past the read site?)."
                )
            if i == last:
                del pass_state["delta"]  # drop the reference so the graph can be freed
            out = delta[i]  # [batch, pos, d_model]
            if isinstance(scale, Tensor):
                out = out * scale[i].to(device=out.device, dtype=out.dtype)
            elif scale != 1.0:
                out = out * scale
            return resid + out.to(device=resid.device, dtype=resid.dtype)

        return write

    # Writes go first at their hook point, so that hooks registered earlier (an ablation, a
    # patch) still see, and act on, the steered residual; the read goes last, to see theirs.
    hooks = [(irm.config.read_site, read, False)]
    hooks += [(name, write_for(i), True) for i, name in enumerate(irm.config.hook_names())]
    try:
        with permanent_hooks(model, hooks):
            yield
    finally:
        pass_state.clear()


def check_positions(positions: object) -> None:
    """Refuse a ``positions`` argument that is not None, a tensor or ``"generated"``."""
    if not (isinstance(positions, Tensor) or positions is None or positions == "generated"):
        raise ConfigError(
            f"positions must be None, a [batch, pos] tensor or 'generated', got {positions!r}."
        )


def position_mask(
    positions: Float[Tensor, "batch pos"] | Literal["generated"] | None,
    resid: Float[Tensor, "batch pos d_model"],
) -> Float[Tensor, "batch pos"] | Float[Tensor, "1 pos"] | None:
    """The 0/1 mask of the positions of this forward pass that are steered (None: all).

    ``"generated"`` steers only the last position of a pass over several positions, and every
    position of a one-token pass: under cached decoding, the position that predicts the first
    new token and every new token (see ``inject``).
    """
    if isinstance(positions, Tensor):
        if tuple(positions.shape) != tuple(resid.shape[:2]):
            raise ShapeMismatchError(
                f"positions has shape {list(positions.shape)}, but this forward pass has "
                f"[batch, pos] = {list(resid.shape[:2])}."
            )
        return positions
    if positions == "generated" and resid.shape[1] > 1:
        last_only = torch.zeros(1, resid.shape[1], device=resid.device, dtype=resid.dtype)
        last_only[0, -1] = 1.0
        return last_only
    return None
