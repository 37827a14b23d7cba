"""Text generation with and without an IRM: the unit that demos and evaluations build on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from irm_lens._progress import progress_bar
from irm_lens.chat import format_prompt, prepend_bos_for
from irm_lens.errors import ConfigError
from irm_lens.irm import IRM
from irm_lens.steering import Intervention, steer, system_prompt


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
    seeded per batch from ``seed``, so a call is reproducible.
    """
    tokenizer = model.tokenizer
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    device = torch.device(model.cfg.device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    results: list[Continuation] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress_bar(starts, desc="generating", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        system = system_prompt(intervention)
        texts = [format_prompt(model, p, chat, system=system) for p in batch]
        prepend_bos = prepend_bos_for(model, texts[0])
        tokens = model.to_tokens(texts, prepend_bos=prepend_bos, padding_side="left")  # [batch, pos]
        if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
            raise ConfigError(
                f"A prompt of {tokens.shape[1]} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {model.cfg.n_ctx} tokens. Lower "
                "max_new_tokens, or load the model with a larger n_ctx."
            )
        # Seeded per batch, without disturbing the caller's random streams.
        with steer(model, intervention, scale), torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed + start)
            out = model.generate(
                tokens,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                stop_at_eos=True,
                prepend_bos=prepend_bos,
                padding_side="left",
                verbose=False,
            )  # [batch, prompt_pos + new]
        prompt_len = tokens.shape[1]
        for prompt, row_prompt, row in zip(batch, tokens.tolist(), out[:, prompt_len:].tolist()):
            new_ids, finished = [], False
            for token in row:
                if token in stop_ids:
                    finished = True
                    break
                new_ids.append(token)
            prompt_ids = tuple(t for t, m in zip(row_prompt, _real(row_prompt, tokenizer)) if m)
            text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
            results.append(Continuation(prompt, text, prompt_ids, tuple(new_ids), finished))
    return results


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
