"""``plant_outlier``: a model organism whose answer is known, made by editing weights.

Third-party notes on Llama-2-derived 7B models describe residual index 1512 as a channel
30-180x the typical |resid| on every token from layer 1 on, whose RMSNorm weights are near
zero (final norm ~5e-5): it barely reaches anything directly but inflates every later RMS
denominator (see the paper's summary, "why 1512"). ``plant_outlier`` gives any index of any
Llama-architecture ``HookedTransformer`` that signature and changes the rest of the model's
function as little as it can, so the analyses can be run on a model where the outlier is
planted.

The construction, for index ``k``, ``from_layer = L`` and a value ``c`` fitted from
``magnitude``:

1. Block L's MLP writes exactly ``c`` into index k (``W_out[:, k] = 0``, ``b_out[k] = c``; a
   Llama's ``b_out`` is zero and used), and no later component writes into it (``W_O[..., k]``,
   ``b_O[k]``, ``W_out[:, k]``, ``b_out[k]`` of blocks after L are zeroed). So for every layer
   ``l >= L``, ``resid_post[l][..., k] = resid_mid[L][..., k] + c``: one constant plus the
   index's (small) value before the plant, the same at every later layer.
2. Every norm that reads the channel (``ln1`` and ``ln2`` of the blocks after L, ``ln_final``)
   gets weight ``norm_weight`` at k. What those norms read of index k before is lost: the one
   part of the function the edit removes by design.
3. Those norms now divide by a larger RMS, shrinking every other index. Each such norm's other
   weights are multiplied by one factor ``s``, fitted on calibration texts by least squares: it
   minimises the squared difference between the norm's output at the other indices before and
   after the edit, summed over the calibration tokens. The norms are fitted in order in one
   forward pass of the edited model, so each is fitted to the input the earlier, already
   rescaled norms now give it.

Why the compensation cannot be exact: a token needs the factor ``rms_new / rms_old``, which
depends on that token's RMS (``rms_new^2 = rms_old^2 + (v^2 - x_k^2) / d_model``); one weight
vector serves every token. Tokens near the calibration RMS come out right, tokens with an
unusual RMS (the first token, which carries massive activations) are rescaled by the wrong
factor. The larger ``c^2 / d_model`` is against the mean square, the more the norm stops
normalising and the larger that error: ``PlantedOutlier.compensation_error`` measures it per
norm on the calibration tokens, and ``loss_before``/``loss_after``/``kl`` measure the whole
edit on held-out text.

The edit is in place (copying a 7B model to plant one index is not an option) and
deterministic. Only the edited entries are saved (columns and norm weights: ~0.5M numbers for
Llama-2-7B), so it can be undone exactly: ``PlantedOutlier.restore(model)``, or temporarily
with ``PlantedOutlier.original_weights(model)``.
"""

from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens.analysis.conditions import prompts_or_default, score_conditions, text_batches
from irm_lens.analysis.indices import check_layers, check_neuron
from irm_lens.data.corpora import neutral_prompts
from irm_lens.errors import ConfigError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)
# Plant-and-fit rounds: a round whose edited model outgrows the channel plants a larger one.
_ROUNDS = 8


@dataclass(frozen=True)
class PlantedOutlier:
    """What ``plant_outlier`` did to a model, and what it cost.

    Attributes:
        index: The planted residual index.
        from_layer: First layer whose ``resid_post`` carries the channel.
        magnitude: The asked-for ratio of |channel| to the median |resid| of each token.
        value: The constant ``c`` block ``from_layer``'s MLP writes into the index: the
            smallest found for which ``min_ratio >= magnitude``.
        norm_weight: The weight at the index of every norm after ``from_layer``.
        min_ratio: The smallest ratio of |channel| to a calibration token's (after its
            text's first) median |resid_post| over the layers from ``from_layer`` on, in the
            edited model (``>= magnitude`` unless a warning said otherwise).
        norms: The edited norms, in order (``blocks.{l}.ln1``, ``blocks.{l}.ln2``, ...,
            ``ln_final``).
        scales: The factor each edited norm's other weights were multiplied by, ``[norm]``.
        compensation_error: Each edited norm's relative error left on the calibration tokens,
            ``||output after - output before|| / ||output before||`` at the other indices
            (0 = exact), ``[norm]``.
        n_calibration_tokens: Tokens the value and the scales were fitted on.
        loss_before: Mean next-token loss on the held-out texts before the edit (nats), or
            ``None`` when not measured.
        loss_after: The same after the edit.
        kl: Mean KL(original || edited) of the next-token distributions there (nats).
    """

    index: int
    from_layer: int
    magnitude: float
    value: float
    norm_weight: float
    min_ratio: float
    norms: tuple[str, ...]
    scales: Float[Tensor, " norm"]
    compensation_error: Float[Tensor, " norm"]
    n_calibration_tokens: int
    loss_before: float | None = None
    loss_after: float | None = None
    kl: float | None = None
    _original: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    _planted: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def restore(self, model: HookedTransformer) -> None:
        """Undo the edit on ``model``: every edited entry back to its value before, bitwise."""
        _write(model, self._original, self.index)

    def reapply(self, model: HookedTransformer) -> None:
        """Redo the edit on ``model`` (after ``restore``), bitwise as ``plant_outlier`` made it."""
        _write(model, self._planted, self.index)

    @contextmanager
    def original_weights(self, model: HookedTransformer) -> Iterator[HookedTransformer]:
        """The unedited model for the duration of the block; the edit is back afterwards,
        even on an exception."""
        self.restore(model)
        try:
            yield model
        finally:
            self.reapply(model)


def plant_outlier(
    model: HookedTransformer,
    index: int,
    *,
    magnitude: float = 3.0,
    from_layer: int = 1,
    norm_weight: float = 5e-5,
    compensate: bool = True,
    texts: Sequence[str] | None = None,
    eval_texts: Sequence[str] | None = None,
    measure: bool = True,
    n_prompts: int = 32,
    max_length: int = 64,
    batch_size: int = 8,
    progress: bool = False,
) -> PlantedOutlier:
    """Give residual index ``index`` of ``model`` Llama-2-7B's index-1512 signature, in place.

    See the module docstring for the construction and why it is not exact.

    Args:
        model: A Llama-architecture ``HookedTransformer`` with raw RMSNorm weights (as
            ``load_model`` returns it). Edited in place.
        index: The residual index to plant.
        magnitude: On every calibration token after its text's first (BOS: see
            ``_later_tokens``) and every layer from ``from_layer`` on, |the channel| is at
            least ``magnitude`` times that token's median |resid_post|. A
            floor over every token and layer: the *typical* ratio is far larger (on the
            embedded model the default 3 makes the channel 67x the mean median |resid| at
            layer 1, 29x at layer 15, 5x at layer 29, and costs 0.36 nats of KL; 5 costs 3.6
            nats, 30 wrecks the model: the norms can no longer be compensated).
        from_layer: The first layer whose ``resid_post`` carries the channel (its MLP writes
            it).
        norm_weight: The index's weight in every norm after ``from_layer`` (Llama-2-7B's final
            norm: ~5e-5 at 1512).
        compensate: Rescale the other weights of those norms to undo the larger RMS. ``False``
            plants the channel bare: its whole effect is the RMS inflation.
        texts: Calibration texts for ``value`` and the scales, read as one batch; default
            ``n_prompts`` neutral prompts of the training split.
        eval_texts: Held-out texts the cost is measured on; default ``n_prompts`` neutral
            prompts of the evaluation split.
        measure: Measure the cost (two forward passes over ``eval_texts``).
        n_prompts: How many default prompts.
        max_length: Tokens per text, BOS included.
        batch_size: Texts per forward pass while measuring.
        progress: Show a progress bar while measuring.

    Returns:
        A ``PlantedOutlier``: the edit, its predicted error, and its measured cost.

    Example:
        >>> import irm_lens
        >>> from irm_lens.organism import plant_outlier
        >>> model = irm_lens.load_model()  # doctest: +SKIP
        >>> planted = plant_outlier(model, 100, magnitude=50)  # doctest: +SKIP
        >>> planted.kl, planted.loss_after - planted.loss_before  # doctest: +SKIP
    """
    index = check_neuron(model, index)
    from_layer = _check_inputs(model, from_layer, magnitude, norm_weight)
    texts = list(neutral_prompts(n_prompts, split="train")) if texts is None else texts
    texts = prompts_or_default(texts, n_prompts)
    norms = _edited_norms(model, from_layer)
    value, before = _fit_value(model, index, from_layer, magnitude, norms, texts, max_length)
    original: dict[str, Tensor] | None = None
    min_ratio = float(magnitude)
    for _ in range(_ROUNDS):
        if original is not None:  # the edited model's own residual outgrew the channel
            _write(model, original, index)
            value *= 1.001 * magnitude / max(min_ratio, 1e-30)
        planted = _planted_values(model, index, from_layer, value, norm_weight, norms)
        original = _write(model, planted, index)
        scales, errors, min_ratio = _fit_norms(
            model, index, from_layer, norms, before, texts, max_length, compensate
        )
        if min_ratio >= magnitude:
            break
    else:
        logger.warning("plant_outlier: the channel is %.3g-fold the median on the calibration "
                       "tokens, short of magnitude=%g after %d rounds.", min_ratio, magnitude, _ROUNDS)
    planted.update({f"{n}.w": model.get_parameter(f"{n}.w").detach().clone() for n, _ in norms})
    result = PlantedOutlier(
        index, from_layer, float(magnitude), value, float(norm_weight), min_ratio,
        tuple(name for name, _ in norms), scales, errors, len(next(iter(before.values()))),
        _original=original, _planted=planted,
    )
    if not measure:
        return result
    eval_texts = prompts_or_default(eval_texts, n_prompts)
    return _with_cost(model, result, eval_texts, max_length, batch_size, progress)


def outlier_signature(
    model: HookedTransformer,
    index: int,
    texts: Sequence[str] | None = None,
    *,
    n_prompts: int = 32,
    max_length: int = 64,
    batch_size: int = 8,
) -> pd.DataFrame:
    """How far ``index`` stands out of ``resid_post``, layer by layer, token by token.

    One row per layer, over every token after each text's first (BOS, whose massive
    activations set their own scale): ``mean_abs`` (mean |resid_post| at the index),
    ``median_abs`` (mean over tokens of each token's median |resid_post|), ``mean_ratio``
    (their ratio), ``min_ratio`` (the smallest per-token ratio of |resid| at the index to that
    token's median |resid|: the channel is ``min_ratio``-fold on *every* such token). The norm
    weights at the index are in ``norm_weights(model).profile(index)``.

    Example:
        >>> sig = outlier_signature(model, planted.index, ["The cat sat."])  # doctest: +SKIP
        >>> bool((sig.min_ratio[planted.from_layer:] >= planted.magnitude).all())  # doctest: +SKIP
        True
    """
    index = check_neuron(model, index)
    texts = prompts_or_default(texts, n_prompts)
    names = [get_act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    at, median = [], []
    for acts, later in _token_activations(model, texts, names, max_length, batch_size):
        stacked = torch.stack([acts[n][later.to(acts[n].device)] for n in names]).abs()
        at.append(stacked[..., index])  # [layer, token, d_model] -> [layer, token]
        median.append(stacked.median(-1).values)
    at_index, medians = torch.cat(at, 1), torch.cat(median, 1)  # [layer, token]
    ratio = at_index / medians.clamp_min(1e-30)
    return pd.DataFrame(dict(
        layer=range(len(names)), mean_abs=at_index.mean(1).tolist(),
        median_abs=medians.mean(1).tolist(),
        mean_ratio=(at_index.mean(1) / medians.mean(1).clamp_min(1e-30)).tolist(),
        min_ratio=ratio.min(1).values.tolist(),
    ))


def _check_inputs(model: HookedTransformer, from_layer, magnitude, norm_weight) -> int:
    """``from_layer`` checked; the numbers refused with a ``ConfigError`` when unusable."""
    layer = check_layers(model, [from_layer])[0]
    if not _is_real(magnitude) or not math.isfinite(magnitude) or magnitude <= 0:
        raise ConfigError(
            f"magnitude is the channel's ratio to a token's median |resid|: a positive finite "
            f"number (the notes on Llama-2-7B's index 1512 say 30-180); got {magnitude!r}."
        )
    if not _is_real(norm_weight) or not math.isfinite(norm_weight):
        raise ConfigError(
            f"norm_weight is the index's RMSNorm weight after the plant: a finite number, "
            f"near zero for the 1512 signature (5e-5, or 0); got {norm_weight!r}."
        )
    return layer


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _edited_norms(model: HookedTransformer, from_layer: int) -> list[tuple[str, str]]:
    """(norm's module name, the hook name of its input) for every norm reading the channel."""
    norms = []
    for layer in range(from_layer + 1, model.cfg.n_layers):
        norms.append((f"blocks.{layer}.ln1", get_act_name("resid_pre", layer)))
        norms.append((f"blocks.{layer}.ln2", get_act_name("resid_mid", layer)))
    norms.append(("ln_final", get_act_name("resid_post", model.cfg.n_layers - 1)))
    for name, _ in norms:
        if model.cfg.normalization_type != "RMS" or getattr(model.get_submodule(name), "w", None) is None:
            raise UnsupportedArchitectureError(
                f"{model.cfg.model_name}'s {name} is not an RMSNorm with its own weight "
                f"(normalization_type={model.cfg.normalization_type!r}): plant_outlier edits raw "
                "RMSNorm weights. Load the model with irm_lens.load_model (no fold_ln)."
            )
    return norms


def _token_activations(
    model: HookedTransformer, texts: Sequence[str], names: Sequence[str], max_length: int,
    batch_size: int,
) -> Iterator[tuple[dict[str, Float[Tensor, "token d_model"]], Bool[Tensor, " token"]]]:
    """The activations ``names`` of every real (unpadded) token, batch by batch, in float32,
    and which of those tokens come after their text's first one (see ``_later_tokens``)."""
    for ids, mask, _ in text_batches(model, texts, max_length=max_length, batch_size=batch_size):
        with torch.no_grad():
            _, cache = model.run_with_cache(ids.to(model.cfg.device), names_filter=list(names))
        real = mask.bool().to(model.cfg.device)
        yield {n: cache[n][real].float() for n in names}, _later_tokens(mask)[real.cpu()]


def _later_tokens(mask: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Real tokens after their text's first one. The first token (BOS) carries the model's
    massive activations, hundreds of times any other token's median |resid|: a channel made to
    outgrow it too would be so large that no norm could absorb it, so the magnitude is asked
    of every *other* token."""
    return mask.bool() & (mask.cumsum(1) > 1)


def _fit_value(model, index, from_layer, magnitude, norms, texts, max_length) -> tuple[float, dict]:
    """The smallest constant ``c`` for which ``|resid_mid[from_layer][k] + c|`` is at least
    ``magnitude`` times the median |resid_post| of every calibration token (after its text's
    first) at every layer from ``from_layer`` on; and the unedited input of every edited norm
    on those tokens."""
    later = [get_act_name("resid_post", layer) for layer in range(from_layer, model.cfg.n_layers)]
    base = get_act_name("resid_mid", from_layer)
    names = sorted({*later, base, *(hook for _, hook in norms)})
    # one batch: every norm's scale is fitted on every calibration token before the next norm runs
    acts, rest = next(_token_activations(model, texts, names, max_length, len(texts)))
    rest = rest.to(acts[base].device)
    median = torch.stack([acts[n][rest].abs().median(-1).values for n in later]).amax(0)
    value = float((magnitude * median - acts[base][rest, index]).max().clamp_min(0))  # [token]
    return value, {hook: acts[hook] for _, hook in norms}


def _fit_norms(model, index, from_layer, norms, before, texts, max_length,
               compensate) -> tuple[Tensor, Tensor, float]:
    """Fit, in one forward pass of the edited model, each edited norm's scale in turn.

    At each norm's input, the scale ``s`` minimising ``sum ||s * new - old||^2`` over the
    calibration tokens (``old``/``new``: the norm's output at the other indices before/after
    the edit, unscaled) is written into its weights before the norm runs, so every later norm
    is fitted to what the earlier ones now produce, and each ``resid_post`` seen in the pass is
    the finished edited model's. Returns the scales, the relative errors
    ``||s * new - old|| / ||old||`` left, and the channel's smallest ratio to a token's median.
    """
    keep = torch.ones(model.cfg.d_model, dtype=torch.bool, device=model.cfg.device)
    keep[index] = False
    fitted: dict[str, tuple[Tensor, Tensor]] = {}
    ratios: list[Tensor] = []
    ids, mask, _ = text_batches(model, texts, max_length=max_length, batch_size=len(texts))[0]
    real = mask.bool().to(model.cfg.device)
    rest = _later_tokens(mask).to(model.cfg.device)

    def fit(name: str):
        norm = model.get_submodule(name)

        def hook(x: Float[Tensor, "batch pos d_model"], hook) -> None:
            w = norm.w.detach().float()[keep]
            old = _normalised(before[hook.name], model.cfg.eps)[:, keep] * w  # [token, d_model-1]
            new = _normalised(x[real].float(), model.cfg.eps)[:, keep] * w
            s = (new * old).sum() / new.pow(2).sum() if compensate else torch.ones(())
            fitted[name] = s, ((s * new - old).norm() / old.norm()).cpu()
            norm.w.data[keep] = (w * s).to(norm.w.dtype)

        return hook

    def ratio(x: Float[Tensor, "batch pos d_model"], hook) -> None:
        acts = x[rest].float().abs()  # [token, d_model]
        ratios.append((acts[:, index] / acts.median(-1).values.clamp_min(1e-30)).min())

    hooks = [(h, fit(n)) for n, h in norms] + [
        (get_act_name("resid_post", layer), ratio) for layer in range(from_layer, model.cfg.n_layers)
    ]
    with torch.no_grad():
        model.run_with_hooks(ids.to(model.cfg.device), fwd_hooks=hooks)
    scales, errors = zip(*(fitted[name] for name, _ in norms))
    return torch.stack(scales).float().cpu(), torch.stack(errors).float(), float(min(ratios))


def _normalised(x: Float[Tensor, "token d_model"], eps: float) -> Float[Tensor, "token d_model"]:
    """``x`` divided by its RMS, as RMSNorm divides it before the weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _planted_values(model, index, from_layer, value, norm_weight, norms) -> dict[str, Tensor]:
    """The new value of every edited entry (norm weights whole, the rest at index ``index``),
    before the norms' other weights are rescaled."""
    planted: dict[str, Tensor] = {}
    for layer in range(from_layer, model.cfg.n_layers):
        names = [f"blocks.{layer}.mlp.W_out", f"blocks.{layer}.mlp.b_out"]
        if layer > from_layer:  # block from_layer's attention runs before the channel exists
            names += [f"blocks.{layer}.attn.W_O", f"blocks.{layer}.attn.b_O"]
        for name in names:
            planted[name] = torch.zeros_like(model.get_parameter(name)[..., index])
    planted[f"blocks.{from_layer}.mlp.b_out"].fill_(value)
    for name, _ in norms:
        new = model.get_parameter(f"{name}.w").detach().clone()
        new[index] = norm_weight
        planted[f"{name}.w"] = new
    return planted


def _write(model: HookedTransformer, values: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Write ``values`` into the model's parameters (a ``.w`` whole, others at ``[..., index]``)
    in place, keeping each parameter's memory layout; return what was there."""
    before = {}
    with torch.no_grad():
        for name, value in values.items():
            param = model.get_parameter(name)
            target = param if name.endswith(".w") else param[..., index]
            before[name] = target.detach().clone()
            target.copy_(value)
    return before


def _with_cost(model, result: PlantedOutlier, texts, max_length, batch_size, progress) -> PlantedOutlier:
    """``result`` with the edit's loss change and KL(original || edited) on ``texts``."""
    conditions = {"original": lambda ids: result.original_weights(model),
                  "planted": lambda ids: nullcontext()}
    batches = text_batches(model, texts, max_length=max_length, batch_size=batch_size)
    scores = score_conditions(model, batches, conditions, reference="original", progress=progress,
                              desc="planted outlier").set_index("condition")
    return replace(result, loss_before=float(scores.loc["original", "loss"]),
                   loss_after=float(scores.loc["planted", "loss"]),
                   kl=float(scores.loc["planted", "kl"]))
