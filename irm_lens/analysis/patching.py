"""Activation patching of one residual index between the steered and the unsteered model.

The metric is the mean token log-probability of the alignment's texts: the steered model
(IRM on) assigns them ``logprob_steered``, the unsteered one ``logprob_unsteered``, and the gap
is what the IRM achieved. For one index, at one layer or at all of them:

- ``into_unsteered`` (denoising): the unsteered run gets the steered value of the index; the
  effect is the fraction of the gap it restores, ``(lp - lp_unsteered) / gap``;
- ``into_steered`` (noising): the steered run gets the unsteered value back; the effect is the
  fraction of the gap it loses, ``(lp_steered - lp) / gap``.

``target="irm"`` patches the IRM's contribution at the index (its output there is switched on in
the unsteered run, or off in the steered run); ``target="resid"`` patches the residual stream's
value at ``hook_resid_post`` (which also carries what earlier layers did with the IRM's push).
The same is done for random indices, so a reader sees whether the chosen one is special.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, get_args

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from irm_lens._progress import progress_bar
from irm_lens.analysis.conditions import score_conditions, stacked, text_batches
from irm_lens.analysis.indices import check_layers, check_neuron, random_indices
from irm_lens.analysis.provenance import Provenance
from irm_lens.data.corpora import load_alignment
from irm_lens.errors import ConfigError
from irm_lens.hooks import overwrite_index, permanent_hooks
from irm_lens.inject import inject
from irm_lens.irm import IRM
from irm_lens.losses import masked_lm_loss, scored_rows, unembed_rows

PatchTarget = Literal["irm", "resid"]
PATCH_TARGETS: tuple[str, ...] = get_args(PatchTarget)
DIRECTIONS: tuple[str, ...] = ("into_unsteered", "into_steered")


@dataclass(frozen=True)
class PatchingResult:
    """Patching one index (and random ones) between the steered and unsteered model.

    Attributes:
        neuron: The patched index.
        target: ``"irm"`` (the IRM's contribution) or ``"resid"`` (the residual value).
        table: One row per patch: ``direction``, ``layer`` (an int, or -1 for all layers at
            once), ``index``, ``kind`` (``"target"`` or ``"random"``), ``logprob``, ``effect``
            (fraction of the steering gap restored or lost; see the module docstring).
        logprob_unsteered, logprob_steered: The two ends of the gap (nats per token).
        provenance: Model, IRM and texts.
    """

    neuron: int
    target: PatchTarget
    table: pd.DataFrame
    logprob_unsteered: float
    logprob_steered: float
    provenance: Provenance

    @property
    def gap(self) -> float:
        return self.logprob_steered - self.logprob_unsteered

    def summary(self) -> pd.DataFrame:
        """All-layer patches: the target's effect against the random indices' (mean, max, and
        the share of random indices whose effect is at least the target's)."""
        rows = []
        all_layers = self.table[self.table["layer"] == -1]
        for direction in DIRECTIONS:
            part = all_layers[all_layers["direction"] == direction]
            target = float(part.loc[part["kind"] == "target", "effect"].iloc[0])
            rand = part.loc[part["kind"] == "random", "effect"]
            rows.append(dict(
                direction=direction, target_effect=target,
                random_mean=float(rand.mean()) if len(rand) else float("nan"),
                random_max=float(rand.max()) if len(rand) else float("nan"),
                random_at_least_target=float((rand >= target).mean()) if len(rand) else float("nan"),
                n_random=len(rand),
            ))
        return pd.DataFrame(rows)


def patch_neuron(
    model: HookedTransformer,
    irm: IRM,
    neuron: int,
    texts: Sequence[str] | None = None,
    *,
    alignment: str | None = None,
    target: PatchTarget = "irm",
    layers: Sequence[int] | None = None,
    n_random: int = 10,
    random_per_layer: bool = False,
    n_texts: int = 16,
    max_length: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> PatchingResult:
    """Patch ``neuron`` between the steered and unsteered model, per layer and at all layers.

    Args:
        model: The host model.
        irm: The trained IRM.
        neuron: The residual index.
        texts: Texts whose log-probability is the metric (default: ``n_texts`` texts of
            ``alignment``, the IRM's training alignment).
        alignment: A built-in alignment to take texts from when ``texts`` is None.
        target: ``"irm"`` or ``"resid"`` (see the module docstring).
        layers: Layers to patch one at a time (default: the IRM's injected layers for
            ``"irm"``, every layer for ``"resid"``).
        n_random: Random indices patched at all layers at once, as a baseline.
        random_per_layer: Also patch each random index layer by layer (``n_random`` times the
            per-layer cost).
    """
    neuron = check_neuron(model, neuron)
    irm.check_compatible(model)
    if target not in PATCH_TARGETS:
        raise ConfigError(f"target must be one of {PATCH_TARGETS}, got {target!r}.")
    if texts is None:
        if alignment is None:
            raise ConfigError("Give texts, or the alignment whose texts the metric scores.")
        texts = list(load_alignment(alignment).texts[:n_texts])
    texts = list(texts)
    injected = irm.config.layers
    if layers is None:
        layers = injected if target == "irm" else tuple(range(model.cfg.n_layers))
    layers = check_layers(model, layers)
    if target == "irm" and not set(layers) <= set(injected):
        raise ConfigError(
            f"The IRM injects at layers {list(injected)}; it has no contribution to patch at "
            f"{sorted(set(layers) - set(injected))}."
        )
    batches = text_batches(model, texts, max_length=max_length, batch_size=batch_size)
    randoms = random_indices(model.cfg.d_model, neuron, n_random, seed)

    patches: list[tuple[str, int, int, str]] = []  # (direction, layer or -1, index, kind)
    for direction in DIRECTIONS:
        for layer in (-1, *layers):
            patches.append((direction, layer, neuron, "target"))
        for r in randoms:
            for layer in (-1, *layers) if random_per_layer else (-1,):
                patches.append((direction, layer, r, "random"))

    # Single-layer patches start from their layer (see _single_layer_scores); the rest are
    # whole forward passes under a condition each.
    fast = [p[:3] for p in patches if p[1] != -1 and _starts_at_layer(irm, target)]
    conditions = {} if fast else {  # else the fast path scores both ends from its cached runs
        "unsteered": lambda ids: nullcontext(),
        "steered": lambda ids: inject(model, irm),
    }
    for direction, layer, index, _ in patches:
        if (direction, layer, index) in fast:
            continue
        chosen = layers if layer == -1 else (layer,)
        key = f"{direction}/{layer}/{index}"
        if target == "irm":
            conditions[key] = _irm_patch(model, irm, index, chosen, direction)
        else:
            conditions[key] = _resid_patch(model, irm, index, chosen, direction)
    scores = score_conditions(
        model, batches, conditions, progress=progress, desc=f"patching ({target})"
    ).set_index("condition")["logprob"].to_dict()
    scores.update(_single_layer_scores(model, irm, batches, fast, target, progress))
    lp_off, lp_on = float(scores["unsteered"]), float(scores["steered"])
    gap = lp_on - lp_off
    rows = []
    for direction, layer, index, kind in patches:
        lp = float(scores[f"{direction}/{layer}/{index}"])
        effect = (lp - lp_off) / gap if direction == "into_unsteered" else (lp_on - lp) / gap
        rows.append(dict(direction=direction, layer=layer, index=index, kind=kind,
                         logprob=lp, effect=effect if gap != 0 else float("nan")))
    return PatchingResult(
        neuron, target, pd.DataFrame(rows), lp_off, lp_on, Provenance.of(model, irm, texts, seed)
    )


def _starts_at_layer(irm: IRM, target: PatchTarget) -> bool:
    """Whether a single-layer patch can start from its layer's cached residual: the patched
    value sits at ``hook_resid_post``, where every later block's input comes from."""
    return target == "resid" or irm.config.inject_site == "resid_post"


def _single_layer_scores(
    model: HookedTransformer,
    irm: IRM,
    batches: Sequence[tuple[Tensor, Tensor, Tensor]],
    patches: Sequence[tuple[str, int, int]],
    target: PatchTarget,
    progress: bool,
) -> dict[str, float]:
    """Mean token log-probability under each single-layer patch ``(direction, layer, index)``,
    and (``"unsteered"``, ``"steered"``) under neither end's patch.

    Up to the patched layer such a run *is* the unsteered run (``into_unsteered``) or the
    steered one (``into_steered``), so it starts from that run's cached ``hook_resid_post`` with
    the patch applied there, and only the later blocks run (steered ones with the IRM's output,
    computed once per batch, added where ``inject`` adds it). Each value is formed by the same
    operations as under the whole-model condition (``_irm_patch`` / ``_resid_patch``), and
    only the scored positions are unembedded: the same log-probabilities to float rounding,
    for about half a forward pass each.
    """
    if not patches:
        return {}
    n_layers = model.cfg.n_layers
    post = [get_act_name("resid_post", layer) for layer in range(n_layers)]
    names = set(post) | {irm.config.read_site}
    if target == "irm":
        names |= {get_act_name(kind, layer) for layer in irm.config.layers
                  for kind in ("resid_mid", "mlp_out")}
    device = model.cfg.device
    keys = ["unsteered", "steered", *(f"{d}/{layer}/{i}" for d, layer, i in patches)]
    nll = dict.fromkeys(keys, 0.0)
    n_scored = 0.0
    bar = progress_bar(total=len(batches) * len(patches), desc=f"patching ({target}), per layer",
                       unit="pass", disable=not progress)
    for ids, _, loss_mask in batches:
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        n_tokens = float(loss_mask[:, 1:].sum())
        n_scored += n_tokens
        attention_mask, ends, clean, steered, delta = _both_ends(model, irm, ids, names)
        for key, logits in ends.items():
            nll[key] += float(masked_lm_loss(logits, ids, loss_mask)) * n_tokens
        for direction, layer, index in patches:
            resid = _patched_resid(irm, clean, steered, delta, direction, layer, index, target)
            later = [(name, _add(delta[k]), True) for k, name in enumerate(irm.config.hook_names())
                     if irm.config.layers[k] > layer and direction == "into_steered"]
            with torch.no_grad(), permanent_hooks(model, later):
                final = model(resid, start_at_layer=layer + 1, stop_at_layer=n_layers,
                              attention_mask=attention_mask)
                rows, targets = scored_rows(final, ids, loss_mask)  # unembed only what counts
                logits = unembed_rows(model, rows)
                nll[f"{direction}/{layer}/{index}"] += float(
                    F.cross_entropy(logits.float(), targets, reduction="sum"))
            bar.update()
    bar.close()
    return {key: -value / n_scored for key, value in nll.items()}


def _both_ends(model: HookedTransformer, irm: IRM, ids: Tensor, names: set[str]):
    """The unsteered and the steered run of one batch: the attention mask a forward pass from
    tokens uses, both runs' logits, their caches of ``names``, and the IRM's output split into
    its injected layers (its input precedes every injection, so it is the same in both runs)."""
    keep = lambda name: name in names  # noqa: E731
    with torch.no_grad():
        attention_mask = model.input_to_embed(ids)[3]
        clean_logits, clean = model.run_with_cache(ids, names_filter=keep)
        with inject(model, irm):
            steered_logits, steered = model.run_with_cache(ids, names_filter=keep)
        delta = einops.rearrange(irm(steered[irm.config.read_site]),
                                 "batch pos n_injected d_model -> n_injected batch pos d_model")
    ends = {"unsteered": clean_logits, "steered": steered_logits}
    return attention_mask, ends, clean, steered, delta


def _patched_resid(irm, clean, steered, delta, direction, layer, index, target):
    """``hook_resid_post`` of ``layer`` under one single-layer patch (see _single_layer_scores)."""
    name = get_act_name("resid_post", layer)
    source, other = (clean, steered) if direction == "into_unsteered" else (steered, clean)
    resid = source[name].clone()
    if target == "resid":
        resid[..., index] = other[name][..., index]
    elif direction == "into_unsteered":  # the IRM's output at (layer, index) alone
        push = delta[irm.config.layers.index(layer)][..., index]
        resid[..., index] = resid[..., index] + push.to(resid.dtype)
    else:  # the steered run without it: the block's own sum there, before the injection
        before = steered[get_act_name("resid_mid", layer)] + steered[get_act_name("mlp_out", layer)]
        resid[..., index] = before[..., index]
    return resid


def _add(value: Tensor):
    def hook(resid: Tensor, hook) -> Tensor:
        return resid + value.to(device=resid.device, dtype=resid.dtype)
    return hook


def _irm_patch(model, irm: IRM, index: int, layers: Sequence[int], direction: str):
    """Inject the IRM with only (``into_unsteered``) or all but (``into_steered``) its output at
    ``index`` on ``layers``."""
    rows = [irm.config.layers.index(layer) for layer in layers]
    mask = torch.zeros(irm.config.n_injected, irm.config.d_model, device=model.cfg.device)
    mask[rows, index] = 1.0
    if direction == "into_steered":
        mask = 1.0 - mask
    return lambda ids: inject(model, irm, scale=mask)


def _resid_patch(model, irm: IRM, index: int, layers: Sequence[int], direction: str):
    """Run the source model (steered for ``into_unsteered``, unsteered otherwise), record
    ``index`` at ``hook_resid_post`` of ``layers``, and write those values into the other."""
    names = [get_act_name("resid_post", layer) for layer in layers]

    @contextmanager
    def condition(ids: Tensor) -> Iterator[None]:
        source_steered = direction == "into_unsteered"
        with torch.no_grad(), (inject(model, irm) if source_steered else nullcontext()):
            _, cache = model.run_with_cache(ids, names_filter=names)
        values = {layer: cache[name][..., index] for layer, name in zip(layers, names)}
        target = nullcontext() if source_steered else inject(model, irm)
        patches = [(get_act_name("resid_post", layer), overwrite_index(index, value), False)
                   for layer, value in values.items()]
        with stacked(target, permanent_hooks(model, patches)):
            yield

    return condition
