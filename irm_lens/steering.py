"""Training-free steering baselines, as interventions that ``evaluate`` scores like an IRM.

* ``mean_difference_vector`` (CAA, Rimsky et al. 2024): the mean residual stream over the
  tokens of one text set minus that over another, per layer; added, times a scale, at chosen
  layers and positions.
* ``actadd_vector`` (ActAdd, Turner et al. 2023): the same difference from one prompt pair.
* ``Prompting``: a system persona and no intervention at all (the baseline AxBench found
  strongest on 2B-9B models).

A ``SteeringVector`` has ``inject``'s semantics (``with vector.apply(model): ...`` adds its
hooks as permanent TransformerLens hooks and always removes them) and is saved like an IRM: one
safetensors file whose header carries the JSON config. ``steer`` applies any intervention (an
IRM, a vector, a persona), which is what generation and evaluation call.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Literal, Sequence, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name

from irm_lens._io import atomic_write
from irm_lens.data.corpora import load_alignment
from irm_lens.data.dataset import Example, TokenizedTexts, tokenize_texts
from irm_lens.data.personas import SYNTHETIC_PERSONAS
from irm_lens.data.precomputed import cached, content_key
from irm_lens.errors import CheckpointError, ConfigError, ShapeMismatchError, check_config_keys
from irm_lens.hooks import permanent_hooks
from irm_lens.inject import check_positions, inject, position_mask
from irm_lens.irm import INJECT_SITES, IRM, check_host, layer_set

STEERING_METHODS: tuple[str, ...] = ("caa", "actadd")
VECTOR_POSITIONS: tuple[str, ...] = ("all", "generated")
_FORMAT = "steering-1"

# ActAdd's default prompt pairs: a few words of the tone against their opposite.
ACTADD_PAIRS: dict[str, tuple[str, str]] = {
    "anger": ("I am furious and I hate this", "I am calm and I like this"),
    "sadness": ("I am so sad and heartbroken", "I am so happy and cheerful"),
    "joy": ("I am so happy and delighted", "I am so sad and miserable"),
}


@dataclass(frozen=True)
class SteeringVectorConfig:
    """Where a steering vector is added, how strongly, and where it came from.

    Attributes:
        d_model: The host model's residual width.
        n_layers: The host model's number of layers.
        layers: The layers the vector is added at, sorted (one vector per layer).
        method: ``"caa"`` (mean difference of two text sets) or ``"actadd"`` (one prompt pair).
        site: The residual hook of each layer it is added to (``"resid_post"``, as the IRM).
        positions: ``"all"`` (every position, prompt included) or ``"generated"`` (from the
            position that predicts the first new token on, as CAA adds it after the prompt).
        scale: The multiplier applied to the stored vectors (the vector's "coefficient").
        host_model: Name of the model it was built for (provenance).
        description: What was contrasted (provenance).
    """

    d_model: int
    n_layers: int
    layers: tuple[int, ...]
    method: str = "caa"
    site: str = "resid_post"
    positions: str = "all"
    scale: float = 1.0
    host_model: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", layer_set(list(self.layers), self.n_layers))
        for name, allowed in (("method", STEERING_METHODS), ("site", INJECT_SITES),
                              ("positions", VECTOR_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"SteeringVectorConfig.{name} must be one of {allowed}, got "
                    f"{getattr(self, name)!r}."
                )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not \
                math.isfinite(self.scale):
            raise ConfigError(f"scale must be a finite number, got {self.scale!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SteeringVectorConfig:
        check_config_keys(cls, d, "steering vector config")
        return cls(**d)


class SteeringVector:
    """A constant vector per layer, added to the residual stream (CAA, ActAdd).

    Example:
        >>> vector = irm_lens.mean_difference_vector(model, "anger", layers=12, scale=4.0)  # doctest: +SKIP
        >>> with vector.apply(model):  # doctest: +SKIP
        ...     model.generate("How was the meeting?", max_new_tokens=20)
    """

    def __init__(self, config: SteeringVectorConfig, vectors: Float[Tensor, "n_injected d_model"]):
        expected = (len(config.layers), config.d_model)
        if tuple(vectors.shape) != expected:
            raise ShapeMismatchError(
                f"A steering vector for layers {list(config.layers)} of a d_model="
                f"{config.d_model} model needs vectors of shape {list(expected)}, got "
                f"{list(vectors.shape)}."
            )
        if not torch.isfinite(vectors).all():
            raise ConfigError("A steering vector must be finite.")
        self.config = config
        self.vectors = vectors.detach().float().cpu()

    def __repr__(self) -> str:
        c = self.config
        return f"SteeringVector({c.method}, layers={list(c.layers)}, scale={c.scale:g})"

    def with_scale(self, scale: float) -> SteeringVector:
        """The same vector at another scale (the stored vectors are shared, not copied)."""
        return SteeringVector(replace(self.config, scale=scale), self.vectors)

    def check_compatible(self, model: HookedTransformer) -> None:
        """Raise ``ShapeMismatchError`` unless this vector fits ``model``."""
        c = self.config
        check_host("steering vector", (c.d_model, c.n_layers), c.host_model, model,
                   "Build one for this model.")

    @contextmanager
    def apply(
        self,
        model: HookedTransformer,
        *,
        scale: float = 1.0,
        positions: Float[Tensor, "batch pos"] | Literal["generated"] | None = None,
    ) -> Iterator[None]:
        """Add ``scale * config.scale * vector`` at each layer inside a ``with`` block.

        ``positions`` overrides ``config.positions`` (as ``inject``'s argument of that name);
        the hooks are removed on exit, even when the block raises.
        """
        self.check_compatible(model)
        if positions is None and self.config.positions == "generated":
            positions = "generated"
        check_positions(positions)
        factor = float(scale) * self.config.scale

        def add_for(i: int):
            def add(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
                push = (self.vectors[i] * factor).to(device=resid.device, dtype=resid.dtype)
                steered = position_mask(positions, resid)
                if steered is None:
                    return resid + push
                return resid + steered.to(resid.dtype)[..., None] * push

            return add

        names = [get_act_name(self.config.site, layer) for layer in self.config.layers]
        with permanent_hooks(model, [(n, add_for(i), True) for i, n in enumerate(names)]):
            yield

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file, the JSON config in its header; written atomically."""
        from safetensors.torch import save_file

        target = Path(path)
        if target.suffix != ".safetensors":
            target = target / "steering.safetensors"
        metadata = {"irm_lens_format": _FORMAT, "config": json.dumps(self.config.to_dict())}
        tensors = {"vectors": self.vectors.contiguous()}
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, model: HookedTransformer | None = None) -> SteeringVector:
        """Load a vector written by ``save`` (never unpickles); ``model`` checks that it fits."""
        from safetensors import safe_open

        file = Path(path)
        if file.suffix != ".safetensors":
            file = file / "steering.safetensors"
        if not file.is_file():
            raise CheckpointError(f"No steering vector at {file}.")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                if metadata.get("irm_lens_format") != _FORMAT or set(f.keys()) != {"vectors"}:
                    raise CheckpointError(f"{file} is not an irm_lens steering vector.")
                config = SteeringVectorConfig.from_dict(json.loads(metadata["config"]))
                vectors = f.get_tensor("vectors")
        except CheckpointError:
            raise
        except (ConfigError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{file} has an invalid steering vector config: {exc}") from exc
        except Exception as exc:  # safetensors' own errors for malformed files
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
        vector = cls(config, vectors)
        if model is not None:
            vector.check_compatible(model)
        return vector


@dataclass(frozen=True)
class Prompting:
    """No intervention: the prompt gets a system turn (a persona) instead.

    Attributes:
        system: The system turn, e.g. ``"You are an angry, rude assistant. ..."``.
    """

    system: str

    def __post_init__(self) -> None:
        if not isinstance(self.system, str) or not self.system.strip():
            raise ConfigError("Prompting needs a non-empty system prompt.")

    @classmethod
    def persona(cls, alignment: str) -> Prompting:
        """The tone persona the synthetic generator writes with (``SYNTHETIC_PERSONAS``)."""
        if alignment not in SYNTHETIC_PERSONAS:
            raise ConfigError(
                f"No built-in persona for {alignment!r}; choose from {sorted(SYNTHETIC_PERSONAS)} "
                "or pass Prompting(system=...)."
            )
        return cls(SYNTHETIC_PERSONAS[alignment])


Intervention = Union[IRM, SteeringVector, Prompting]


def steer(model: HookedTransformer, intervention: Intervention | None, scale: float = 1.0
          ) -> ContextManager[None]:
    """The context under which ``model`` runs steered by ``intervention`` (None: unsteered).

    An IRM is injected as ``inject`` does (a ``steer="reply"`` IRM from the last prompt
    position on); a vector is added; ``Prompting`` changes the prompt, not the model, so its
    context is empty (see ``system_prompt``).
    """
    if isinstance(intervention, IRM):
        positions = "generated" if intervention.config.steer == "reply" else None
        return inject(model, intervention, scale=scale, positions=positions)
    if isinstance(intervention, SteeringVector):
        return intervention.apply(model, scale=scale)
    if intervention is None or isinstance(intervention, Prompting):
        return nullcontext()
    raise ConfigError(
        f"Cannot steer with a {type(intervention).__name__}: pass an IRM, a SteeringVector "
        "or Prompting."
    )


def system_prompt(intervention: Intervention | None) -> str | None:
    """The system turn an intervention puts before each prompt (only ``Prompting`` has one)."""
    return intervention.system if isinstance(intervention, Prompting) else None


@torch.no_grad()
def mean_activations(
    model: HookedTransformer,
    texts: Sequence[Example],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    max_length: int = 64,
    batch_size: int = 16,
) -> Float[Tensor, "n_layers d_model"]:
    """Mean residual stream at each layer over the scored tokens of ``texts``.

    Plain texts: every token but the first. The first position is an attention sink whether
    or not it is BOS (SmolLM2 prepends none): its massive activations (index 507 of SmolLM2,
    ~100x typical) would otherwise enter each text's mean with weight 1/length and dominate a
    difference of two sets of unequal mean length. ``(prompt, reply)`` chat examples: the
    reply's tokens (CAA's "activations on the answer").
    """
    tokens = tokenize_texts(model, texts, max_length=max_length)
    layers = [int(layer) for layer in layers]
    key = content_key("mean-activations", model, site, layers, batch_size, tokens.input_ids,
                      tokens.loss_mask)  # shipped for the recipes' CAA vectors
    return cached(key, lambda: {"mean": _mean_activations(model, tokens, layers, site,
                                                          batch_size)})["mean"]


def _mean_activations(model: HookedTransformer, tokens: TokenizedTexts, layers: list[int],
                      site: str, batch_size: int) -> Float[Tensor, "n_layers d_model"]:
    """``mean_activations``' means, computed."""
    names = [get_act_name(site, layer) for layer in layers]
    total = torch.zeros(len(layers), model.cfg.d_model, dtype=torch.float64)
    count = 0.0
    for start in range(0, len(tokens), batch_size):
        ids = tokens.input_ids[start : start + batch_size].to(model.cfg.device)
        mask = tokens.loss_mask[start : start + batch_size].clone()
        mask[:, 0] = 0  # the attention sink (see mean_activations)
        mask = mask.to(model.cfg.device)
        # the layers after the last one read are not run
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names,
                                        stop_at_layer=max(layers) + 1)
        for i, name in enumerate(names):
            # [batch, pos, d_model] summed over the scored tokens
            total[i] += (cache[name] * mask[..., None]).sum(dim=(0, 1)).double().cpu()
        count += float(mask.sum())
    if count == 0:
        raise ConfigError("No token to average over: the texts are empty after tokenisation.")
    return (total / count).float()


def mean_difference_vector(
    model: HookedTransformer,
    positive: str | Sequence[Example],
    negative: str | Sequence[Example] = "neutral",
    *,
    layers: str | int | Iterable[int] = 12,
    positions: str = "all",
    scale: float = 1.0,
    n_texts: int | None = 200,
    max_length: int = 64,
    method: str = "caa",
) -> SteeringVector:
    """A CAA vector: mean ``resid_post`` over ``positive`` minus that over ``negative``.

    Args:
        model: The frozen host model.
        positive: Texts (or chat examples) in the target tone, or a built-in alignment name.
        negative: The texts to contrast them with (default: the built-in ``neutral`` texts).
        layers: A layer set (``layer_set``): one vector per layer, each its own difference.
        positions: ``"all"`` or ``"generated"`` (see ``SteeringVectorConfig``).
        scale: The coefficient stored in the config (``apply(scale=...)`` multiplies it).
        n_texts: Use the first ``n_texts`` of each set (None: all).
        max_length: Tokens per text, BOS included.

    Returns:
        A ``SteeringVector``.
    """
    sets, names = [], []
    for texts in (positive, negative):
        names.append(texts if isinstance(texts, str) else f"{len(texts)} texts")
        if isinstance(texts, str):
            texts = load_alignment(texts).texts
        texts = list(texts)[:n_texts] if n_texts is not None else list(texts)
        if not texts:
            raise ConfigError("Both text sets of a mean-difference vector must be non-empty.")
        sets.append(texts)
    chosen = layer_set(layers, model.cfg.n_layers)
    means = [mean_activations(model, t, chosen, max_length=max_length) for t in sets]
    config = SteeringVectorConfig(
        d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, layers=chosen, method=method,
        positions=positions, scale=scale, host_model=model.cfg.model_name,
        description=f"mean resid_post of {names[0]} minus {names[1]}",
    )
    return SteeringVector(config, means[0] - means[1])


def actadd_vector(
    model: HookedTransformer,
    positive: str,
    negative: str,
    *,
    layers: str | int | Iterable[int] = 6,
    positions: str = "all",
    scale: float = 1.0,
) -> SteeringVector:
    """An ActAdd vector from one prompt pair (e.g. ``ACTADD_PAIRS["anger"]``).

    Turner et al. add the two prompts' position-aligned difference at the front of the prompt;
    under batched, left-padded generation the front differs per prompt, so here the difference
    of the two prompts' mean activations (first token excluded) is added at every steered position: a
    mean-difference vector of one text each.
    """
    for text in (positive, negative):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("ActAdd needs two non-empty prompts.")
    vector = mean_difference_vector(model, [positive], [negative], layers=layers,
                                    positions=positions, scale=scale, method="actadd")
    config = replace(vector.config, description=f"ActAdd: {positive!r} minus {negative!r}")
    return SteeringVector(config, vector.vectors)


def warm_start(irm: IRM, vector: SteeringVector) -> IRM:
    """Set ``irm``'s output bias to ``vector`` (times its scale) at the vector's layers, so
    that training starts from the steering vector instead of from nothing.

    The rest of the output layer is left as it is: with ``zero_init_output=True`` the untrained
    IRM then *is* the vector (the same push at every position). The vector's layers must be
    among the IRM's, added at the IRM's injection site.
    """
    c = vector.config
    if (c.d_model, c.n_layers) != (irm.config.d_model, irm.config.n_layers):
        raise ShapeMismatchError(
            f"This steering vector was built for d_model={c.d_model}, n_layers={c.n_layers}; the "
            f"IRM for d_model={irm.config.d_model}, n_layers={irm.config.n_layers}."
        )
    if c.site != irm.config.inject_site or not set(c.layers) <= set(irm.config.layers):
        raise ConfigError(
            f"A warm start needs the vector's layers {list(c.layers)} ({c.site}) among the IRM's "
            f"injected layers {list(irm.config.layers)} ({irm.config.inject_site})."
        )
    if c.positions != "all" or irm.config.steer != "all":
        raise ConfigError("A warm start adds the vector at every position: build it with "
                          "positions='all' for an IRM with steer='all'.")
    # A view of the output bias (written in place below), layer by layer as IRM.forward reads it.
    bias = einops.rearrange(irm.out.bias.detach(), "(n_injected d_model) -> n_injected d_model",
                            n_injected=irm.config.n_injected)
    with torch.no_grad():
        for vec, layer in zip(vector.vectors, c.layers):
            # the IRM multiplies everything it outputs by its output_scale
            bias[irm.config.layers.index(layer)] = vec * c.scale / irm.config.output_scale
    return irm
