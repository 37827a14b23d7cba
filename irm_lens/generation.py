"""Text generation with and without an IRM: the unit that demos and evaluations build on."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from irm_lens.inject import inject
from irm_lens.irm import IRM


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation with the IRM off (``unsteered``) and on (``steered``)."""

    prompt: str
    unsteered: str
    steered: str


def format_prompt(model: HookedTransformer, prompt: str, chat: bool = True) -> str:
    """``prompt`` as a user turn of the model's chat template, when it has one and ``chat``."""
    tokenizer = model.tokenizer
    if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


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
) -> str:
    """The continuation of ``prompt`` (without the prompt), steered by ``irm`` when given.

    With ``chat`` (default) the prompt is wrapped in the model's chat template if it has one.
    """
    context = inject(model, irm, scale=scale) if irm is not None else nullcontext()
    tokens = model.to_tokens(format_prompt(model, prompt, chat))  # [1, pos]
    with context, torch.no_grad():
        out = model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_at_eos=True,
            verbose=False,
        )
    return model.to_string(out[0, tokens.shape[1] :])


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
    results = []
    for prompt in tqdm(prompts, desc="generating", unit="prompt", disable=not progress):
        unsteered = continue_text(model, prompt, chat=chat, max_new_tokens=max_new_tokens)
        steered = continue_text(
            model, prompt, irm=irm, scale=scale, chat=chat, max_new_tokens=max_new_tokens
        )
        results.append(Generation(prompt, unsteered, steered))
    return results
