"""A model's chat template: a prompt as a user turn, the text that ends a reply, and BOS.

Shared by tokenisation (``data.dataset``), generation and the analyses; it reads only the
tokenizer.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError
from transformer_lens import HookedTransformer


def format_prompt(
    model: HookedTransformer, prompt: str, chat: bool = True, *, system: str | None = None
) -> str:
    """``prompt`` as a user turn of the model's chat template, when it has one and ``chat``.

    ``system``, when given, is the system turn (replacing a template's default one). A template
    that has no system role gets it at the head of the user turn; without a template (or
    ``chat=False``) it is put before the prompt, separated by a blank line.
    """
    tokenizer = model.tokenizer
    if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt if system is None else f"{system}\n\n{prompt}"
    user = [{"role": "user", "content": prompt}]
    if system is not None:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *user], tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError:  # the template raises on a system turn (no system role)
            user = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
    return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)


def end_of_turn(model: HookedTransformer) -> str:
    """The text that ends an assistant turn in the model's chat template (e.g. ``"<|im_end|>"``).

    Read off the template: what it writes after an assistant reply, up to and including the
    EOS token when that appears, whitespace stripped. Without a template, or when the template
    writes nothing there (or refuses an assistant turn), the tokenizer's EOS token ("" when it
    has none).
    """
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    marker = "\x00reply\x00"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except TemplateError:  # a template that renders no assistant turn
        return eos
    after = rendered.split(marker, 1)[1].strip() if marker in rendered else ""
    if eos and eos in after:
        after = after[: after.index(eos) + len(eos)]
    return after or eos


def prepend_bos_for(model: HookedTransformer, text: str) -> bool:
    """Whether TransformerLens should prepend BOS to ``text``: not when it already starts with it.

    Chat templates such as Llama 2's (``"<s>[INST] ..."``) write the BOS themselves.
    """
    bos = model.tokenizer.bos_token
    return False if bos and text.startswith(bos) else bool(model.cfg.default_prepend_bos)
