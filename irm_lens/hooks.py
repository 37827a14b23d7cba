"""Permanent forward hooks added for the duration of a ``with`` block, and the one hook that
overwrites a residual index: what ``inject``, the steering vectors, patching, ablation and the
forecast share.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Union

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from irm_lens.errors import ShapeMismatchError

# What an overwritten index is set to: a constant, a ``[batch, pos]`` tensor, or a function of
# the residual that returns one.
IndexValue = Union[float, Tensor, Callable[[Tensor], Tensor]]


@contextmanager
def permanent_hooks(
    model: HookedTransformer, hooks: list[tuple[str, Callable, bool]]
) -> Iterator[None]:
    """Add ``(hook name, fn, prepend)`` forward hooks as permanent TransformerLens hooks for the
    duration of a ``with`` block, and remove exactly those on exit, even when the block raises.

    Permanent, so that ``model.reset_hooks()`` and ``run_with_cache``'s temporary hooks leave
    them in place; every other hook (permanent or not) is left alone on exit.
    """
    hook_dict = model.hook_dict
    for name, _, _ in hooks:
        if name not in hook_dict:
            raise ShapeMismatchError(f"The model has no hook point named {name!r}.")
    added: list[tuple[HookPoint, Callable]] = []
    try:
        for name, fn, prepend in hooks:
            hook_point = hook_dict[name]
            hook_point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
            added.append((hook_point, fn))
        yield
    finally:
        for hook_point, fn in added:
            remove_hook(hook_point, fn)


def is_hooked(point: HookPoint) -> bool:
    """Whether anything (forward or backward, permanent or not) is attached to ``point``: the
    fast paths of ``irm_lens.attention`` and ``irm_lens.components`` give way to
    TransformerLens's own computation when it is."""
    return bool(
        point._forward_hooks
        or point._forward_pre_hooks
        or point._backward_hooks
        or point._backward_pre_hooks
    )


def remove_hook(hook_point: HookPoint, fn: Callable) -> None:
    """Remove exactly one of our hooks, leaving every other (permanent or not) in place."""
    kept = []
    for handle in hook_point.fwd_hooks:
        if handle.user_hook is fn:
            handle.hook.remove()
        else:
            kept.append(handle)
    hook_point.fwd_hooks = kept


def overwrite_index(index: int, value: IndexValue) -> Callable[[Tensor, HookPoint], Tensor]:
    """A forward hook that sets residual ``index`` to ``value`` at every position (on a copy:
    the activation it receives is left as it was)."""

    def hook(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        new = value(resid) if callable(value) else value
        resid = resid.clone()
        resid[..., index] = new.to(resid.dtype) if isinstance(new, Tensor) else new
        return resid

    return hook
