"""Results of deterministic computations on a frozen model, shipped so that they need not be
computed again: content-addressed, so a lookup finds only what a model with the same weights
(and dtype) computed from the same inputs.

The package ships the embedded model's reference margins on its preference pairs (the frozen
model's ``log p(chosen) - log p(rejected)``, which DPO's loss subtracts), for the recipes' splits
of the shipped pairs: without them the default recipe spends about two minutes recomputing them
before its first step. ``scripts/precompute.py`` writes them; any other model, dtype or data
misses the lookup and computes its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from irm_lens._io import atomic_write

PRECOMPUTED = Path(__file__).parent / "precomputed"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: every tensor's name, shape, dtype, first 1024 values
    and sum (a different checkpoint under the same name gives another fingerprint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat[:1024].cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(f"{flat.sum(dtype=torch.float64).item():.10e}".encode())
    return digest.hexdigest()[:16]


def content_key(kind: str, model: torch.nn.Module, *parts: Tensor | str | int | float) -> str:
    """The key of a computation named ``kind`` by ``model`` on ``parts`` (tensors hashed by
    their dtype, shape and bytes)."""
    digest = hashlib.sha256(f"{kind}|{model_fingerprint(model)}".encode())
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            digest.update(f"|{part.dtype}|{tuple(part.shape)}|".encode())
            digest.update(part.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"|{part!r}".encode())
    return f"{kind}-{digest.hexdigest()[:24]}"


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
