"""What produced a result: carried by every result object, shown by the report."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Provenance:
    """What produced a result: enough for a report to say exactly where a figure came from."""

    model_name: str
    d_model: int
    n_layers: int
    irm_config: dict[str, Any] | None
    texts_sha256: str
    n_texts: int
    seed: int | None = None

    @classmethod
    def of(cls, model: HookedTransformer, irm=None, texts: Sequence[str] = (), seed=None):
        digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
        return cls(
            model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers,
            irm.config.to_dict() if irm is not None else None, digest, len(texts), seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
