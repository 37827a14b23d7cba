"""Text generation with and without an IRM: the unit that demos and evaluations build on."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.chat import format_prompt, prepend_bos_for
from irm_lens.data.precomputed import cached, content_key
from irm_lens.errors import ConfigError
from irm_lens.irm import IRM
from irm_lens.steering import Intervention, Prompting, SteeringVector, steer, system_prompt


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation with the IRM off (``unsteered``) and on (``steered``)."""

    prompt: str
    unsteered: str
    steered: str


@dataclass(frozen=True)
class Continuation:
    """A generated continuation and the token ids it came from (prompt excluded)."""

    prompt: str
    text: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    finished: bool  # stopped at an end token, not cut at max_new_tokens


def generate_continuations(
    model: HookedTransformer,
    prompts: list[str],
    *,
    intervention: Intervention | None = None,
    scale: float = 1.0,
    chat: bool = True,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Continuation]:
    """Continuations of ``prompts``, batched (left padding, KV cache), steered by
    ``intervention`` (an IRM, a ``SteeringVector`` or ``Prompting``) when given.

    Generation stops at the end-of-sequence token; the text is decoded up to it. Sampling is
    seeded per batch from ``seed``, so a call is reproducible. Without an IRM the token ids may
    come from the shipped precomputed results (``irm_lens.data.precomputed``); an IRM's
    continuations are always generated.
    """
    system = system_prompt(intervention)
    batches = []
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(model, p, chat, system=system)
                 for p in prompts[start : start + batch_size]]
        prepend_bos = prepend_bos_for(model, texts[0])
        tokens = model.to_tokens(texts, prepend_bos=prepend_bos, padding_side="left")  # [batch, pos]
        if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
            raise ConfigError(
                f"A prompt of {tokens.shape[1]} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {model.cfg.n_ctx} tokens. Lower "
                "max_new_tokens, or load the model with a larger n_ctx."
            )
        batches.append((start, tokens, prepend_bos))
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                    top_p=top_p)

    def run() -> list[Continuation]:
        return _generate(model, prompts, batches, intervention, scale, sampling, seed, progress)

    parts = _untrained(intervention)
    if parts is None:
        return run()
    key = _generation_key(model, parts, scale, seed, batch_size, sampling, batches)
    return _from_tensors(model, prompts, cached(key, lambda: _to_tensors(run())))


def _generation_key(model, parts, scale, seed, batch_size, sampling, batches) -> str:
    """The content key of an untrained intervention's continuations: the model and its
    tokenizer's stop tokens, the intervention, the decoding and each batch's prompt tokens
    (sampling's random streams differ between device types, and may between torch versions)."""
    tokenizer = model.tokenizer
    return content_key("continuations", model, torch.device(model.cfg.device).type,
                       torch.__version__, *parts, float(scale), seed, batch_size,
                       repr(sorted(sampling.items())),
                       repr((tokenizer.eos_token_id, tokenizer.pad_token_id)),
                       *(tokens for _, tokens, _ in batches))


def _generate(model, prompts, batches, intervention, scale, sampling, seed, progress
              ) -> list[Continuation]:
    """``generate_continuations``' continuations, generated batch by batch."""
    tokenizer = model.tokenizer
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    device = torch.device(model.cfg.device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    results: list[Continuation] = []
    for start, tokens, prepend_bos in progress_bar(batches, desc="generating", unit="batch",
                                                   disable=not progress):
        # Seeded per batch, without disturbing the caller's random streams.
        with steer(model, intervention, scale), torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed + start)
            out = model.generate(tokens, stop_at_eos=True, prepend_bos=prepend_bos,
                                 padding_side="left", verbose=False,
                                 **sampling)  # [batch, prompt_pos + new]
        prompt_len = tokens.shape[1]
        for prompt, row_prompt, row in zip(prompts[start : start + len(tokens)], tokens.tolist(),
                                           out[:, prompt_len:].tolist()):
            new_ids, finished = [], False
            for token in row:
                if token in stop_ids:
                    finished = True
                    break
                new_ids.append(token)
            prompt_ids = [t for t, m in zip(row_prompt, _real(row_prompt, tokenizer)) if m]
            results.append(_continuation(model, prompt, prompt_ids, new_ids, finished))
    return results


def _continuation(model: HookedTransformer, prompt: str, prompt_ids: list[int],
                  new_ids: list[int], finished: bool) -> Continuation:
    """A ``Continuation``, its text decoded from ``new_ids``."""
    text = model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return Continuation(prompt, text, tuple(prompt_ids), tuple(new_ids), finished)


def _untrained(intervention: Intervention | None) -> tuple | None:
    """What a generation's key needs of an intervention that was not trained (none, a persona
    prompt, a steering vector); None for an IRM."""
    if intervention is None:
        return ("unsteered",)
    if isinstance(intervention, Prompting):
        return ("prompting", intervention.system)
    if isinstance(intervention, SteeringVector):
        c = intervention.config
        return ("vector", c.site, tuple(c.layers), c.positions, float(c.scale),
                intervention.vectors)
    return None


def _to_tensors(results: list[Continuation]) -> dict[str, Tensor]:
    """Continuations as flat token ids and lengths (for ``irm_lens.data.precomputed``)."""
    def ids(rows):
        return torch.tensor([t for row in rows for t in row], dtype=torch.int32)

    def lengths(rows):
        return torch.tensor([len(row) for row in rows], dtype=torch.int32)

    prompt_ids, new_ids = [c.prompt_ids for c in results], [c.new_ids for c in results]
    return dict(prompt_ids=ids(prompt_ids), prompt_lengths=lengths(prompt_ids),
                new_ids=ids(new_ids), new_lengths=lengths(new_ids),
                finished=torch.tensor([c.finished for c in results], dtype=torch.uint8))


def _from_tensors(model: HookedTransformer, prompts: list[str], tensors: dict[str, Tensor]
                  ) -> list[Continuation]:
    """The continuations ``_to_tensors`` stored, texts decoded again."""
    rows = {}
    for name in ("prompt", "new"):
        flat, lengths = tensors[f"{name}_ids"].tolist(), tensors[f"{name}_lengths"].tolist()
        rows[name] = [flat[end - n : end] for end, n in zip(accumulate(lengths), lengths)]
    return [_continuation(model, prompt, p, n, bool(f)) for prompt, p, n, f in
            zip(prompts, rows["prompt"], rows["new"], tensors["finished"].tolist(), strict=True)]


def _real(ids: list[int], tokenizer) -> list[bool]:
    """Mask of the non-padding tokens of a left-padded row."""
    pad = tokenizer.pad_token_id
    first = next((i for i, t in enumerate(ids) if t != pad), len(ids))
    return [i >= first for i in range(len(ids))]


def continue_text(
    model: HookedTransformer,
    prompt: str,
    *,
    irm: IRM | None = None,
    chat: bool = True,
    scale: float = 1.0,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """The continuation of one ``prompt`` (without the prompt), steered by ``irm`` when given.

    With ``chat`` (default) the prompt is wrapped in the model's chat template if it has one.
    """
    (result,) = generate_continuations(
        model, [prompt], intervention=irm, scale=scale, chat=chat, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
    )
    return result.text


def compare_generations(
    model: HookedTransformer,
    irm: IRM,
    prompts: list[str],
    *,
    scale: float = 1.0,
    chat: bool = True,
    max_new_tokens: int = 30,
    progress: bool = True,
) -> list[Generation]:
    """Greedy continuations of each prompt with the IRM off and on."""
    kwargs = dict(chat=chat, max_new_tokens=max_new_tokens, progress=progress)
    off = generate_continuations(model, prompts, **kwargs)
    on = generate_continuations(model, prompts, intervention=irm, scale=scale, **kwargs)
    return [Generation(p, a.text, b.text) for p, a, b in zip(prompts, off, on)]
