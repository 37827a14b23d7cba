"""The Injectable Realignment Model: its config, the network, layer-set presets, save / load.

An IRM reads the residual stream at one site (the paper: ``blocks.0.hook_resid_mid``), maps
each token's vector through an MLP, and produces one ``d_model`` vector per injected layer.
``irm_lens.inject`` adds those vectors at each injected layer's ``hook_resid_post``. The IRM is
a pure function of its input: it keeps no activations between calls.

On disk an IRM is a single safetensors file whose header metadata carries the JSON config,
so weights and config can never drift apart, and loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, get_args

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens._io import atomic_write
from irm_lens.errors import CheckpointError, ConfigError, ShapeMismatchError, check_config_keys

InjectSite = Literal["resid_pre", "resid_mid", "resid_post"]
INJECT_SITES: tuple[str, ...] = get_args(InjectSite)
SteerMode = Literal["all", "reply"]
STEER_MODES: tuple[str, ...] = get_args(SteerMode)

# (width as a multiple of d_model, number of hidden ReLU layers)
IRM_PRESETS: dict[str, tuple[float, int]] = {
    "paper": (3.0, 4),  # d_model -> 3d, ReLU, 3 x (3d -> 3d, ReLU), -> n_injected * d_model
    "small": (1.0, 2),
    "linear": (1.0, 0),  # a per-token affine map: the smallest IRM
}

# Paper experiments: all layers, each quarter, every fourth layer.
LAYER_PRESETS: tuple[str, ...] = ("all", "q1", "q2", "q3", "q4", "every4")

_FORMAT_VERSION = "1"
# Refuse configs that would allocate absurd amounts of memory before touching any tensor.
_MAX_D_MODEL = 65_536
_MAX_N_LAYERS = 1_024
_MAX_D_HIDDEN = 262_144
_MAX_N_HIDDEN_LAYERS = 64
_MAX_PARAMS = 50_000_000_000
_READ_SITE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)$")


def layer_set(spec: str | int | Iterable[int], n_layers: int) -> tuple[int, ...]:
    """Resolve a layer-set description into sorted layer indices of a model with ``n_layers``.

    Args:
        spec: ``"all"``; ``"q1"``..``"q4"`` (the model's quarters); ``"every4"`` (or
            ``"everyK"``: layers K-1, 2K-1, ..., as the paper's 3, 7, ..., 31); ``"a-b"``
            (inclusive range); ``"3,7,11"``; an int; or any iterable of ints.
        n_layers: The model's number of layers.

    Returns:
        Sorted, de-duplicated layer indices.

    Example:
        >>> layer_set("every4", 32)[:3], layer_set("q2", 32)[0], layer_set("2-4", 32)
        ((3, 7, 11), 8, (2, 3, 4))
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            layers: Iterable[int] = range(n_layers)
        elif m := re.fullmatch(r"q([1-4])", text):
            q = int(m.group(1))
            layers = range((q - 1) * n_layers // 4, q * n_layers // 4)
        elif m := re.fullmatch(r"every(\d+)", text):
            k = int(m.group(1))
            if k < 1:
                raise ConfigError(f"Layer set {spec!r}: the step must be at least 1.")
            layers = range(k - 1, n_layers, k)
        elif m := re.fullmatch(r"(\d+)-(\d+)", text):
            layers = range(int(m.group(1)), int(m.group(2)) + 1)
        elif re.fullmatch(r"\d+(,\d+)*", text.replace(" ", "")):
            layers = [int(x) for x in text.replace(" ", "").split(",")]
        else:
            raise ConfigError(
                f"Unknown layer set {spec!r}. Use 'all', 'q1'..'q4', 'every4' (any step), "
                "'a-b', '3,7,11', or a list of ints."
            )
    elif isinstance(spec, int) and not isinstance(spec, bool):
        layers = [spec]
    else:
        layers = list(spec)
    result = tuple(sorted({_check_layer(layer, n_layers) for layer in layers}))
    if not result:
        raise ConfigError(f"Layer set {spec!r} selects no layer of a {n_layers}-layer model.")
    return result


def _check_layer(layer: Any, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"Layer indices must be ints, got {layer!r} ({type(layer).__name__}).")
    if not 0 <= layer < n_layers:
        raise ConfigError(
            f"Layer {layer} is outside the model: valid layers are 0..{n_layers - 1}."
        )
    return layer


def _site_order(layer: int, site: str) -> tuple[int, int]:
    return layer, INJECT_SITES.index(site)


@dataclass(frozen=True)
class IRMConfig:
    """What an IRM reads, where it writes, and its shape.

    Attributes:
        d_model: The host model's residual width.
        n_layers: The host model's number of layers (to refuse a mismatched model).
        layers: The injected layers, sorted.
        read_site: The hook whose activation the IRM reads (``blocks.{l}.hook_resid_*``).
        inject_site: Where outputs are added: ``"resid_post"`` (default), ``"resid_mid"`` or
            ``"resid_pre"`` of each injected layer.
        d_hidden: Width of the hidden layers (paper: ``3 * d_model``).
        n_hidden_layers: Number of Linear+ReLU hidden layers (paper: 4; 0 = affine map).
        output_scale: Constant factor applied to the IRM's outputs.
        zero_init_output: Start with a zero output layer, so the untrained IRM is the identity
            intervention and everything it later outputs was learned.
        host_model: Name of the model it was built for (provenance only).
        steer: Which positions the IRM steers. ``"all"`` (the paper): every position.
            ``"reply"``: only the reply of a chat example, from the position that predicts its
            first token; the prompt is read unsteered. Training then needs chat examples
            (``TrainConfig.chat_prompts``), and generation steers the last prompt position and
            the new tokens only (``inject(positions="generated")``).
    """

    d_model: int
    n_layers: int
    layers: tuple[int, ...]
    read_site: str = "blocks.0.hook_resid_mid"
    inject_site: InjectSite = "resid_post"
    d_hidden: int = 0
    n_hidden_layers: int = 4
    output_scale: float = 1.0
    zero_init_output: bool = False
    host_model: str = ""
    steer: SteerMode = "all"

    def __post_init__(self) -> None:
        for name, limit in (("d_model", _MAX_D_MODEL), ("n_layers", _MAX_N_LAYERS)):
            _check_int(name, getattr(self, name), 1, limit)
        if self.d_hidden == 0:
            object.__setattr__(self, "d_hidden", 3 * self.d_model)
        _check_int("d_hidden", self.d_hidden, 1, _MAX_D_HIDDEN)
        _check_int("n_hidden_layers", self.n_hidden_layers, 0, _MAX_N_HIDDEN_LAYERS)
        if isinstance(self.layers, (str, int)):
            raise ConfigError("IRMConfig.layers must be a tuple of ints; use layer_set(...).")
        layers = tuple(self.layers)
        if list(layers) != sorted(set(layers)) or not layers:
            raise ConfigError(f"IRMConfig.layers must be non-empty, sorted, unique: {layers}.")
        for layer in layers:
            _check_layer(layer, self.n_layers)
        object.__setattr__(self, "layers", layers)
        if self.inject_site not in INJECT_SITES:
            raise ConfigError(
                f"inject_site must be one of {INJECT_SITES}, got {self.inject_site!r}."
            )
        m = _READ_SITE.match(str(self.read_site))
        if m is None:
            raise ConfigError(
                f"read_site must look like 'blocks.0.hook_resid_mid', got {self.read_site!r}."
            )
        read_layer = _check_layer(int(m.group(1)), self.n_layers)
        # The IRM's output must exist before its first use in the forward pass.
        if _site_order(read_layer, m.group(2)) > _site_order(layers[0], self.inject_site):
            raise ConfigError(
                f"read_site {self.read_site} runs after the first injection "
                f"({get_act_name(self.inject_site, layers[0])}); read at or before it."
            )
        if not isinstance(self.output_scale, (int, float)) or not math.isfinite(
            self.output_scale
        ):
            raise ConfigError(f"output_scale must be a finite number, got {self.output_scale!r}.")
        if self.steer not in STEER_MODES:
            raise ConfigError(f"steer must be one of {STEER_MODES}, got {self.steer!r}.")
        if self.n_params > _MAX_PARAMS:
            raise ConfigError(
                f"This IRM would have {self.n_params:,} parameters (limit {_MAX_PARAMS:,})."
            )

    @property
    def n_injected(self) -> int:
        """Number of injected layers."""
        return len(self.layers)

    @property
    def n_params(self) -> int:
        """Parameter count of the IRM this config describes."""
        widths = [self.d_model] + [self.d_hidden] * self.n_hidden_layers
        hidden = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
        return hidden + (widths[-1] + 1) * self.n_injected * self.d_model

    @property
    def read_layer(self) -> int:
        """The layer of ``read_site`` (``blocks.{read_layer}.hook_resid_*``)."""
        return int(_READ_SITE.match(self.read_site).group(1))

    def hook_names(self) -> list[str]:
        """The TransformerLens hook names the IRM writes to, one per injected layer."""
        return [get_act_name(self.inject_site, layer) for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IRMConfig:
        """Rebuild (and validate) a config from ``to_dict`` output; unknown keys are refused."""
        if not isinstance(d, dict):
            raise ConfigError(f"An IRM config must be a JSON object, got {type(d).__name__}.")
        check_config_keys(cls, d, "IRM config")
        d = dict(d)
        if "layers" in d:
            if not isinstance(d["layers"], list):
                raise ConfigError("IRM config 'layers' must be a list of ints.")
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    @classmethod
    def for_model(
        cls,
        model: HookedTransformer,
        layers: str | int | Iterable[int] = "all",
        preset: str = "paper",
        **overrides: Any,
    ) -> IRMConfig:
        """A config sized for ``model``.

        Args:
            model: The host model.
            layers: A layer set (see ``layer_set``).
            preset: ``"paper"`` (3 x d_model wide, 4 hidden layers), ``"small"`` or ``"linear"``.
            **overrides: Any other IRMConfig field.
        """
        if preset not in IRM_PRESETS:
            raise ConfigError(f"Unknown IRM preset {preset!r}; choose from {sorted(IRM_PRESETS)}.")
        width, depth = IRM_PRESETS[preset]
        d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
        values: dict[str, Any] = dict(
            d_model=d_model,
            n_layers=n_layers,
            layers=layer_set(layers, n_layers),
            d_hidden=max(1, int(width * d_model)),
            n_hidden_layers=depth,
            host_model=model.cfg.model_name,
        )
        values.update(overrides)
        return cls(**values)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"IRMConfig.{name} must be an int, got {value!r}.")
    if not low <= value <= high:
        raise ConfigError(f"IRMConfig.{name}={value} is outside the allowed range {low}..{high}.")


class IRM(nn.Module):
    """An Injectable Realignment Model.

    Example:
        >>> import irm_lens
        >>> model = irm_lens.load_model()  # doctest: +SKIP
        >>> irm = irm_lens.IRM.for_model(model, layers="every4", preset="small")  # doctest: +SKIP
        >>> with irm_lens.inject(model, irm):  # doctest: +SKIP
        ...     model.generate("Tell me about your day.", max_new_tokens=20)
    """

    def __init__(self, config: IRMConfig):
        super().__init__()
        self.config = config
        widths = [config.d_model] + [config.d_hidden] * config.n_hidden_layers
        hidden: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            hidden += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.hidden = nn.Sequential(*hidden)
        self.out = nn.Linear(widths[-1], config.n_injected * config.d_model)
        if config.zero_init_output:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @classmethod
    def for_model(
        cls,
        model: HookedTransformer,
        layers: str | int | Iterable[int] = "all",
        preset: str = "paper",
        **overrides: Any,
    ) -> IRM:
        """An IRM sized for ``model``, on its device (see ``IRMConfig.for_model``)."""
        return cls(IRMConfig.for_model(model, layers, preset, **overrides)).to(model.cfg.device)

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos n_injected d_model"]:
        """Per-token outputs, one ``d_model`` vector per injected layer."""
        if resid.shape[-1] != self.config.d_model:
            raise ShapeMismatchError(
                f"IRM expects inputs of width d_model={self.config.d_model}, got shape "
                f"{tuple(resid.shape)}."
            )
        x = resid.to(self.out.weight.dtype)
        # A bf16 host (fp16 on CUDA) runs the IRM's matmuls in its own precision; the IRM's
        # weights, their gradients and Adam's state stay in the weights' dtype (mixed precision).
        low = resid.dtype == torch.bfloat16 or (resid.dtype == torch.float16 and resid.is_cuda)
        with torch.autocast(resid.device.type, dtype=resid.dtype) if low else nullcontext():
            flat = self.out(self.hidden(x)) * self.config.output_scale
        # The output layer's units, in order: injected layer 0's d_model values, then layer 1's.
        return einops.rearrange(flat, "batch pos (n_inj d_model) -> batch pos n_inj d_model",
                                n_inj=self.config.n_injected)

    def check_compatible(self, model: HookedTransformer) -> None:
        """Raise ``ShapeMismatchError`` unless this IRM fits ``model``."""
        cfg = self.config
        check_host("IRM", (cfg.d_model, cfg.n_layers), cfg.host_model, model,
                   "Build or load an IRM for this model.")

    def save(self, path: str | os.PathLike) -> Path:
        """Save weights and config to one safetensors file, atomically.

        Args:
            path: A ``.safetensors`` file, or a directory (``irm.safetensors`` is written in it).

        Returns:
            The file written.
        """
        from safetensors.torch import save_file

        target = _checkpoint_file(Path(path))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        metadata = {"irm_lens_format": _FORMAT_VERSION, "config": json.dumps(self.config.to_dict())}
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def with_output_scale(self, scale: float) -> IRM:
        """A copy with the same weights whose outputs are multiplied by ``scale`` (a dose)."""
        dosed = IRM(replace(self.config, output_scale=float(scale)))
        dosed.load_state_dict(self.state_dict())
        return dosed.to(next(self.parameters()).device)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: HookedTransformer | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> IRM:
        """Load an IRM saved by ``save``; never unpickles.

        The config is validated and every tensor's shape checked against it before any weight
        is read, so hostile or truncated files are refused without large allocations.

        Args:
            path: The file, or the directory it was saved in.
            model: When given, the IRM must fit it (d_model, n_layers); it lands on its device.
            device: Where to put the weights (default: the model's device, else CPU).
        """
        from safetensors import safe_open

        file = _checkpoint_file(Path(path))
        if not file.is_file():
            raise CheckpointError(f"No IRM checkpoint at {file}.")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # safetensors' own error types for malformed headers
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupted?): {exc}"
            ) from exc
        if metadata.get("irm_lens_format") != _FORMAT_VERSION or "config" not in metadata:
            raise CheckpointError(
                f"{file} is a safetensors file but not an irm_lens IRM checkpoint "
                f"(format {metadata.get('irm_lens_format')!r}, expected {_FORMAT_VERSION!r})."
            )
        try:
            config = IRMConfig.from_dict(json.loads(metadata["config"]))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"{file} has an unreadable IRM config: {exc}") from exc
        except ConfigError as exc:
            raise CheckpointError(f"{file} has an invalid IRM config: {exc}") from exc
        irm = cls(config)
        if model is not None:
            irm.check_compatible(model)
        expected = {k: tuple(v.shape) for k, v in irm.state_dict().items()}
        if shapes != expected:
            raise CheckpointError(
                f"{file}: tensors do not match the config (found {shapes}, expected {expected})."
            )
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"{file}: weights could not be read: {exc}") from exc
        irm.load_state_dict(state)
        if device is None and model is not None:
            device = model.cfg.device
        return irm.to(device or "cpu")


def check_host(what: str, shape: tuple[int, int], host_model: str, model: HookedTransformer,
               remedy: str) -> None:
    """Raise ``ShapeMismatchError`` unless ``model`` has the ``(d_model, n_layers)`` that
    ``what`` (an IRM, a steering vector) was built for."""
    if shape != (model.cfg.d_model, model.cfg.n_layers):
        raise ShapeMismatchError(
            f"This {what} was built for a model with d_model={shape[0]}, n_layers={shape[1]} "
            f"({host_model or 'unknown model'}), but {model.cfg.model_name} has d_model="
            f"{model.cfg.d_model}, n_layers={model.cfg.n_layers}. {remedy}"
        )


def _checkpoint_file(path: Path) -> Path:
    return path if path.suffix == ".safetensors" else path / "irm.safetensors"
