"""Results of deterministic computations on a frozen model, shipped so that they need not be
computed again: content-addressed, so a lookup finds only what a model with the same weights
(and dtype) computed from the same inputs.

The package ships, for the embedded model, what the main job and the default recipe compute
before and beside training that no trained IRM enters:
- the reference margins on the recipes' splits of the shipped preference pairs (the frozen
  model's ``log p(chosen) - log p(rejected)``, which DPO's loss subtracts);
- the mean activations its CAA vectors are the differences of;
- the unsteered, persona-prompted and CAA-steered replies (their token ids) that calibration and
  evaluation compare the IRM's replies with, and their perplexities under the unsteered model.
An IRM's own replies are always generated. ``scripts/precompute.py`` writes the shipped
results (``precomputation("record")``); any other model, dtype or input misses the lookup and
computes its own, and ``IRM_LENS_PRECOMPUTED=0`` (or ``precomputation("off")``) computes
everything.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from irm_lens._io import atomic_write
from irm_lens.errors import ConfigError

PRECOMPUTED = Path(__file__).parent / "precomputed"
ENV_SWITCH = "IRM_LENS_PRECOMPUTED"  # "0": compute everything, read nothing shipped
Mode = Literal["read", "off", "record"]


@dataclass(frozen=True)
class Lookup:
    """One ``cached`` call: its key, and whether a saved result answered it."""

    key: str
    found: bool


@dataclass
class _Session:
    mode: Mode
    directory: Path | None
    lookups: list[Lookup]


_SESSION: ContextVar[_Session | None] = ContextVar("irm_lens_precomputation", default=None)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def precomputation(mode: Mode | None = None, directory: Path | None = None
                   ) -> Iterator[list[Lookup]]:
    """Within the block, ``cached`` lookups read saved results (``"read"``), compute everything
    (``"off"``), or compute what is missing and save it (``"record"``), in ``directory``
    (default: the shipped ones). ``mode=None`` keeps the enclosing block's mode (outside any:
    ``"read"``, or ``"off"`` where ``IRM_LENS_PRECOMPUTED=0``). Yields the block's lookups, in
    order."""
    outer = _SESSION.get()
    if mode not in (None, "read", "off", "record"):
        raise ConfigError(f"precomputation mode must be 'read', 'off' or 'record'; got {mode!r}.")
    session = _Session(mode or _current_mode(), directory or (outer and outer.directory), [])
    token = _SESSION.set(session)
    try:
        yield session.lookups
    finally:
        _SESSION.reset(token)
        if outer is not None:
            outer.lookups.extend(session.lookups)


def _current_mode() -> Mode:
    session = _SESSION.get()
    if session is not None:
        return session.mode
    return "off" if os.environ.get(ENV_SWITCH, "").strip() == "0" else "read"


def cached(key: str | None, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors saved under ``key`` where the current mode reads them, else ``compute()``'s
    (saved under ``key`` in ``"record"`` mode). A None key (``content_key`` of a model with
    hooks attached) is computed."""
    if key is None:
        return compute()
    session = _SESSION.get()
    mode, directory = _current_mode(), session.directory if session is not None else None
    found = load_precomputed(key, directory) if mode != "off" else None
    if session is not None:
        session.lookups.append(Lookup(key, found is not None))
    if found is not None:
        return found
    computed = compute()
    if mode == "record":
        save_precomputed(key, computed, directory)
    return computed


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: every tensor's name, shape, dtype, first 1024 values
    and sum (a different checkpoint under the same name gives another fingerprint). Kept per
    model object while no weight is replaced or changed in place (their version counters)."""
    state = model.state_dict()
    versions = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == versions:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat[:1024].cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(f"{flat.sum(dtype=torch.float64).item():.10e}".encode())
    _FINGERPRINTS[model] = (versions, digest.hexdigest()[:16])
    return _FINGERPRINTS[model][1]


def content_key(kind: str, model: torch.nn.Module, *parts: Tensor | str | int | float
                ) -> str | None:
    """The key of a computation named ``kind`` by ``model`` on ``parts`` (tensors hashed by
    their dtype, shape and bytes); None while a forward hook is attached to the model or to
    every module, since what it computes then is not the model's own."""
    if _hooked(model):
        return None
    digest = hashlib.sha256(f"{kind}|{model_fingerprint(model)}".encode())
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            digest.update(f"|{part.dtype}|{tuple(part.shape)}|".encode())
            digest.update(part.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"|{part!r}".encode())
    return f"{kind}-{digest.hexdigest()[:24]}"


def _hooked(model: torch.nn.Module) -> bool:
    """Whether a forward (pre-)hook is attached to ``model``, a submodule, or every module."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def load_precomputed(key: str, directory: Path | None = None) -> dict[str, Tensor] | None:
    """The tensors saved under ``key`` (in ``directory``, default the shipped ones), or None."""
    path = (directory or PRECOMPUTED) / f"{key}.safetensors"
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(path)


def save_precomputed(key: str, tensors: dict[str, Tensor], directory: Path | None = None
                     ) -> Path:
    """Save ``tensors`` under ``key`` (in ``directory``, default the shipped ones; atomically)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    path = (directory or PRECOMPUTED) / f"{key}.safetensors"
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))
