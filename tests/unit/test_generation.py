"""generate_continuations' stop flag and end_of_turn, on the tiny random Llama."""

from __future__ import annotations

import pytest

from irm_lens.chat import end_of_turn
from irm_lens.generation import generate_continuations


def test_a_continuation_says_whether_it_reached_an_end_token(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id

    def force_eos(logits, hook):  # [batch, pos, d_vocab]
        logits[..., eos] = 1e4
        return logits

    (cut,) = generate_continuations(tiny_model, ["abc"], chat=False, max_new_tokens=3)
    assert len(cut.new_ids) == 3 and not cut.finished
    with tiny_model.hooks(fwd_hooks=[("unembed.hook_out", force_eos)]):
        (ended,) = generate_continuations(tiny_model, ["abc"], chat=False, max_new_tokens=3)
    assert ended.new_ids == () and ended.text == "" and ended.finished


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, "</s>"),  # no template: the EOS token
        ("role tags", "</s>"),  # the conftest template closes an assistant turn with "</s>"
        # ChatML-like: what follows the reply, up to and including EOS, stripped.
        ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}", "</s>"),
        # A turn end that is not the EOS token is taken whole.
        ("{% for m in messages %}{{ m['content'] }} <end_of_turn>\n{% endfor %}", "<end_of_turn>"),
        # A template that writes nothing after the reply: the EOS token.
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "</s>"),
        # One that refuses an assistant turn: the EOS token.
        ("{% if messages[-1]['role'] != 'user' %}{{ raise_exception('no') }}{% endif %}", "</s>"),
    ],
)
def test_end_of_turn_is_read_off_the_chat_template(chat_model, template, expected):
    tokenizer = chat_model.tokenizer  # the fixture resets the template afterwards
    if template != "role tags":
        tokenizer.chat_template = template
    assert end_of_turn(chat_model) == expected
