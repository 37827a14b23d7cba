"""The norm-scale channel: how much of what a push on one residual index does goes through the
RMSNorms' denominators rather than through the index itself.

Every RMSNorm divides its whole input by one number per token, ``hook_scale = rms(x)``. Pushing
index ``i`` therefore acts on the output along two paths: the **direct** path, ``x_i`` entering
the normalised output (the final norm's ``w_i`` times the unembedding row ``W_U[i]``, and at
each later block's ``ln1`` / ``ln2`` the normalised ``x_i`` feeding attention and the MLP); and
the **norm-scale** path, the changed RMS dividing every *other* index (a gain knob: a channel
with a tiny norm weight but a large value, like Llama-2-7B's 1512, can act almost only there).

Treating the scales as inputs of the forward pass, the output is ``F(push, scales)`` and the
scales a run actually has are ``S(push)``. Four runs on the same tokens split the effect:

- clean ``F(0, S(0))`` and pushed ``F(p, S(p))``: **total** = pushed - clean;
- pushed with every norm's scale held at the clean run's: **direct** = ``F(p, S(0)) - clean``;
- unpushed with every scale set to the pushed run's: **norm_scale** = ``F(0, S(p)) - clean``;
- **remainder** = total - direct - norm_scale, the paths' interaction (second order in ``p``:
  to first order direct + norm_scale = total, the chain rule through the scales).

Each path is reported as a change of the mean next-token loss (additive over the paths), of the
logits (mean over scored tokens of the centred logit change's norm, as ``logit_attribution``
measures), and as a share of the total logit change (``<c_path, c_total> / |c_total|^2``
summed over tokens; the four shares sum to 1). The same is measured for random indices pushed
the same way, the baseline that says whether the index is special.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Literal, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import prompts_or_default, text_batches
from irm_lens.analysis.indices import check_layers, check_neuron, random_indices
from irm_lens.analysis.provenance import Provenance
from irm_lens.data.corpora import load_alignment
from irm_lens.errors import ConfigError
from irm_lens.hooks import permanent_hooks
from irm_lens.inject import inject
from irm_lens.irm import IRM
from irm_lens.losses import scored_rows

NormScalePath = Literal["total", "direct", "norm_scale", "remainder"]
PATHS: tuple[str, ...] = ("total", "direct", "norm_scale", "remainder")

# A push on one index: given the index, a context manager under which a forward pass is pushed.
Push = Callable[[int], ContextManager]


@dataclass(frozen=True)
class NormScaleSplit:
    """A push on one index (and on random ones) split into its direct and norm-scale paths.

    Attributes:
        neuron: The pushed index.
        layers: Where the push enters (``hook_resid_post`` of these layers, or the IRM's
            injection sites).
        delta: The push's size: in units of each token's residual RMS at the layer, or (with
            an IRM) a factor on the IRM's output at the index.
        pushed_by: ``"resid"`` (``delta`` x RMS added at the index) or ``"irm"`` (the IRM's own
            output at the index, the rest of its output left out).
        table: One row per (``index``, ``path``): ``kind`` (``"target"`` or ``"random"``),
            ``path`` (``total``, ``direct``, ``norm_scale``, ``remainder``), ``delta_loss``
            (change of the mean next-token loss, nats), ``logit_change`` (mean norm of the
            centred logit change), ``logit_share`` (share of the total logit change).
        loss_clean: The unpushed model's mean next-token loss on the texts.
        ln_final_w: The final norm's weight at ``neuron``.
        provenance: Model, IRM, texts and seed.
    """

    neuron: int
    layers: tuple[int, ...]
    delta: float
    pushed_by: Literal["resid", "irm"]
    table: pd.DataFrame
    loss_clean: float
    ln_final_w: float
    provenance: Provenance

    def shares(self, path: NormScalePath = "norm_scale") -> pd.Series:
        """Each pushed index's ``logit_share`` of ``path`` (the target first)."""
        rows = self.table[self.table["path"] == path]
        return rows.set_index("index")["logit_share"]

    @property
    def norm_scale_share(self) -> float:
        """The share of the target's logit change that goes through the norms' scales."""
        return float(self.shares().loc[self.neuron])

    def summary(self) -> pd.DataFrame:
        """Per path: the target's logit share and loss change against the random indices'
        (mean, max, and the share of random indices whose logit share is at least the
        target's)."""
        rows = []
        for path in PATHS:
            part = self.table[self.table["path"] == path]
            target = part[part["kind"] == "target"].iloc[0]
            rand = part[part["kind"] == "random"]
            rows.append(dict(
                path=path, target_share=float(target["logit_share"]),
                random_share_mean=_mean(rand["logit_share"]),
                random_share_max=float(rand["logit_share"].max()) if len(rand) else math.nan,
                random_at_least_target=(float((rand["logit_share"] >= target["logit_share"]).mean())
                                        if len(rand) else math.nan),
                target_delta_loss=float(target["delta_loss"]),
                random_delta_loss_mean=_mean(rand["delta_loss"]), n_random=len(rand),
            ))
        return pd.DataFrame(rows)

    def finding(self) -> str:
        """One measured sentence: does the index steer through the normaliser, compared with
        the random indices?"""
        row = self.summary().set_index("path").loc["norm_scale"]
        share, n = row["target_share"], int(row["n_random"])
        size = f"{self.delta:g} RMS" if self.pushed_by == "resid" else \
            f"{self.delta:g}x the IRM's output"
        where = f"pushed by {size}" + (f" at layer {self.layers[0]}" if len(self.layers) == 1
                                       else "")
        head = f"Index {self.neuron} ({where}): {share:.0%} of its logit effect goes through " \
               "the RMSNorm scales"
        if n == 0 or math.isnan(share):
            return head + "."
        base = (f"{n} random indices pushed the same way: {row['random_share_mean']:.0%} on "
                f"average, {row['random_share_max']:.0%} at most")
        if share > 0.5 and share > row["random_share_max"]:
            return f"{head}: it steers through the normaliser ({base})."
        if share > row["random_share_max"]:
            return f"{head}, more than any random index, but it acts mostly directly ({base})."
        return f"{head}; not more than random indices do ({base})."


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


class DivergentPush(ConfigError):
    """A run of the split gave non-finite logits: the push was too large to hold the scales."""


def norm_scale_split(
    model: HookedTransformer,
    neuron: int,
    texts: Sequence[str] | None = None,
    *,
    alignment: str | None = None,
    irm: IRM | None = None,
    layer: int | None = None,
    delta: float | None = None,
    n_random: int = 8,
    n_texts: int = 16,
    max_length: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> NormScaleSplit:
    """Split the effect of pushing ``neuron`` into its direct and norm-scale paths.

    Args:
        model: The host model.
        neuron: The residual index pushed.
        texts: Texts whose next-token loss and logits are measured (default: ``n_texts`` texts
            of ``alignment``, or held-out neutral prompts without one).
        alignment: A built-in alignment to take texts from when ``texts`` is None.
        irm: Push with the IRM's own output at ``neuron`` (times ``delta``) instead of a fixed
            push; the random indices get the IRM's output at theirs.
        layer: Where the push enters: ``hook_resid_post`` of this layer (default 0); with an
            IRM, one of its injected layers (default: all of them).
        delta: The push's size: in units of each token's residual RMS at ``layer`` (the same
            for every index, so indices compare; default 0.1), or a factor on the IRM's
            output (default 1: the IRM's own push). Keep a fixed push small: with every
            norm's scale held nothing renormalises the pushed run, and on the embedded model
            a push of one RMS at layer 0 grows without bound by layer 12 (non-finite logits,
            refused with a ``DivergentPush``, a ``ConfigError``); 0.1 stays finite for most
            indices, 0.01 for the attention sink's massive index 507.
        n_random: Random indices pushed the same way, as the baseline.

    Example:
        >>> split = irm_lens.norm_scale_split(model, 3, ["The cat sat."], n_random=2)  # doctest: +SKIP
        >>> split.finding()  # doctest: +SKIP
    """
    neuron = check_neuron(model, neuron)
    if delta is None:
        delta = 0.1 if irm is None else 1.0
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
        raise ConfigError(f"delta is the push's size, a finite number; got {delta!r}.")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ConfigError(f"n_random is a count of random indices (0 or more); got {n_random!r}.")
    layers, push = _push(model, irm, layer, float(delta))
    if texts is None:
        texts = (load_alignment(alignment).texts[:n_texts] if alignment is not None
                 else prompts_or_default(None, n_texts))
    texts = list(texts)
    batches = text_batches(model, texts, max_length=max_length, batch_size=batch_size)
    indices = [neuron, *random_indices(model.cfg.d_model, neuron, n_random, seed)]
    tallies = {index: _Tally() for index in indices}
    bar = progress_bar(total=len(batches) * (1 + 3 * len(indices)), desc="norm-scale split",
                       unit="pass", disable=not progress)
    loss_sum = n_scored = 0.0
    with bar:  # a divergent push stops it: the log says so before a smaller push starts
        for ids, _, loss_mask in batches:
            ids, loss_mask = ids.to(model.cfg.device), loss_mask.to(model.cfg.device)
            clean_logits, clean_scales = _scale_run(model, ids)
            clean, targets = _scored(clean_logits, ids, loss_mask)
            loss_sum += float(F.cross_entropy(clean, targets, reduction="sum"))
            n_scored += targets.numel()
            bar.update()
            for index in indices:
                runs = _path_runs(model, ids, lambda: push(index), clean_scales)
                tallies[index].add(clean, {k: _scored(v, ids, loss_mask)[0]
                                           for k, v in runs.items()}, targets)
                bar.update(3)
    rows = [dict(index=index, kind="target" if index == neuron else "random", path=path,
                 **values)
            for index, tally in tallies.items() for path, values in tally.result().items()]
    return NormScaleSplit(
        neuron=neuron, layers=layers, delta=float(delta),
        pushed_by="irm" if irm is not None else "resid", table=pd.DataFrame(rows),
        loss_clean=loss_sum / max(n_scored, 1.0),
        ln_final_w=float(model.ln_final.w[neuron]), provenance=Provenance.of(model, irm, texts, seed),
    )


def _push(model: HookedTransformer, irm: IRM | None, layer: int | None, delta: float
          ) -> tuple[tuple[int, ...], Push]:
    """The layers a push enters at, and the push itself (checked against the model / IRM)."""
    if irm is None:
        layers = check_layers(model, [0 if layer is None else layer])
        return layers, lambda index: _resid_push(model, index, layers[0], delta)
    irm.check_compatible(model)
    injected = tuple(irm.config.layers)
    if layer is None:
        layers = injected
    else:
        layers = check_layers(model, [layer])
        if layers[0] not in injected:
            raise ConfigError(
                f"The IRM injects at layers {list(injected)}; it has no output at layer {layer} "
                "to push with. Give one of those layers, or layer=None for all of them."
            )
    rows = [injected.index(lay) for lay in layers]

    def push(index: int) -> ContextManager:
        mask = torch.zeros(irm.config.n_injected, irm.config.d_model, device=model.cfg.device)
        mask[rows, index] = delta
        return inject(model, irm, scale=mask)

    return layers, push


def _resid_push(model: HookedTransformer, neuron: int, layer: int, delta: float) -> ContextManager:
    """Add ``delta`` times each token's residual RMS to ``neuron`` at ``layer``'s
    ``hook_resid_post``, for the duration of a ``with`` block."""

    def hook(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        rms = resid.float().pow(2).mean(-1).sqrt()  # [batch, pos]
        resid = resid.clone()
        resid[..., neuron] += (delta * rms).to(resid.dtype)
        return resid

    return permanent_hooks(model, [(get_act_name("resid_post", layer), hook, False)])


def _scale_names(model: HookedTransformer) -> list[str]:
    """Every RMSNorm's ``hook_scale`` in ``model`` (each block's ``ln1``, ``ln2``; ``ln_final``)."""
    names = [get_act_name("scale", layer, ln) for layer in range(model.cfg.n_layers)
             for ln in ("ln1", "ln2")] + [get_act_name("scale")]
    return [name for name in names if name in model.hook_dict]


def _scale_run(
    model: HookedTransformer,
    ids: Int[Tensor, "batch pos"],
    push: ContextManager | None = None,
    held: dict[str, Float[Tensor, "batch pos 1"]] | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Float[Tensor, "batch pos 1"]]]:
    """One forward pass under ``push``, every norm's scale set to ``held``'s when given; the
    logits and the scales the pass used.

    Every norm's ``hook_scale`` is hooked in every such pass (to record it, or to hold it), so
    all four runs of the split take TransformerLens's RMSNorm (``FastRMSNorm`` gives way to it
    when hooked): with nothing pushed and the clean scales held, the logits are bitwise clean.
    """
    names = _scale_names(model)
    hold = [(name, _hold(held[name]), False) for name in names] if held is not None else []
    with torch.no_grad(), push or nullcontext(), permanent_hooks(model, hold):
        logits, cache = model.run_with_cache(ids, names_filter=names)
    return logits, {name: cache[name] for name in names}


def _hold(value: Tensor):
    def hook(scale: Tensor, hook: HookPoint) -> Tensor:
        return value
    return hook


def _path_runs(
    model: HookedTransformer,
    ids: Int[Tensor, "batch pos"],
    push: Callable[[], ContextManager],
    clean_scales: dict[str, Float[Tensor, "batch pos 1"]],
) -> dict[str, Float[Tensor, "batch pos d_vocab"]]:
    """The logits of the pushed run, of the pushed run with the clean scales held (direct
    path) and of the clean run with the pushed scales set (norm-scale path)."""
    pushed, pushed_scales = _scale_run(model, ids, push())
    direct, _ = _scale_run(model, ids, push(), held=clean_scales)
    norm_scale, _ = _scale_run(model, ids, held=pushed_scales)
    runs = {"pushed": pushed, "direct": direct, "norm_scale": norm_scale}
    for name, logits in runs.items():
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        if bad:
            raise DivergentPush(
                f"The {name} run of the norm-scale split gave non-finite logits at {bad} "
                "position(s): with the norms' scales held nothing renormalises the push, and "
                "this one grew without bound. Give a smaller delta (the push's size)."
            )
    return runs


def _scored(logits: Float[Tensor, "batch pos d_vocab"], ids: Int[Tensor, "batch pos"],
            loss_mask: Int[Tensor, "batch pos"]
            ) -> tuple[Float[Tensor, "n_scored d_vocab"], Int[Tensor, " n_scored"]]:
    """The logits of the positions whose next token is scored (``masked_lm_loss``'s), and
    those tokens."""
    rows, targets = scored_rows(logits, ids, loss_mask)
    return rows.double(), targets


def _path_changes(
    clean: Float[Tensor, "n_scored d_vocab"], runs: dict[str, Float[Tensor, "n_scored d_vocab"]]
) -> dict[str, Float[Tensor, "n_scored d_vocab"]]:
    """Each path's centred logit change (a constant shift of every logit changes nothing)."""
    changes = {"total": runs["pushed"] - clean, "direct": runs["direct"] - clean,
               "norm_scale": runs["norm_scale"] - clean}
    changes["remainder"] = changes["total"] - changes["direct"] - changes["norm_scale"]
    return {path: c - c.mean(-1, keepdim=True) for path, c in changes.items()}


class _Tally:
    """One index's sums over scored tokens: per run the loss, per path the logit-change norm
    and its dot product with the total change."""

    def __init__(self) -> None:
        self.nll = dict.fromkeys(("clean", "pushed", "direct", "norm_scale"), 0.0)
        self.norm = dict.fromkeys(PATHS, 0.0)
        self.dot = dict.fromkeys(PATHS, 0.0)
        self.n = 0

    def add(self, clean: Tensor, runs: dict[str, Tensor], targets: Tensor) -> None:
        for name, logits in {"clean": clean, **runs}.items():
            self.nll[name] += float(F.cross_entropy(logits, targets, reduction="sum"))
        changes = _path_changes(clean, runs)
        for path, change in changes.items():
            self.norm[path] += float(change.norm(dim=-1).sum())
            self.dot[path] += float((change * changes["total"]).sum())
        self.n += targets.numel()

    def result(self) -> dict[str, dict[str, float]]:
        n = max(self.n, 1)
        loss = {path: (self.nll[run] - self.nll["clean"]) / n
                for path, run in (("total", "pushed"), ("direct", "direct"),
                                  ("norm_scale", "norm_scale"))}
        loss["remainder"] = loss["total"] - loss["direct"] - loss["norm_scale"]
        den = self.dot["total"]
        return {path: dict(delta_loss=loss[path], logit_change=self.norm[path] / n,
                           logit_share=self.dot[path] / den if den > 0 else math.nan)
                for path in PATHS}
