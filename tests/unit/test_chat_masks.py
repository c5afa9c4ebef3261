"""Loss masks come from the model's own chat template: only assistant replies (with their
end-of-turn marker) train, never system or user text."""

from __future__ import annotations

import json

import pytest

from posttrain.prep.chat import TemplateError, prompt_and_reference, tokenize_chat
from tests.conftest import SAMPLE_DATA
from tests.fixtures.chat_templates import REWRITES_HISTORY, WORKING, tokenizer_for

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "Reverse the order of these words: river stone"},
    {"role": "assistant", "content": "stone river"},
]


def labelled_text(tokenizer, messages) -> str:
    tok = tokenize_chat(tokenizer, messages)
    return tokenizer.decode([t for t, m in zip(tok.input_ids, tok.assistant_mask, strict=True) if m])


def test_only_assistant_tokens_and_end_of_turn_train(tokenizer) -> None:
    assert labelled_text(tokenizer, CONVERSATION) == "3 plus 4 is 7.<|im_end|>stone river<|im_end|>"


def test_masks_on_the_whole_sample_corpus(tokenizer) -> None:
    with (SAMPLE_DATA / "train.jsonl").open() as fh:
        rows = [json.loads(line) for line in fh][:100]
    for row in rows:
        expected = "".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
        assert labelled_text(tokenizer, row["messages"]) == expected


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    # Like templates that drop the reasoning of earlier assistant turns: the render of a prefix
    # is not a prefix of the render of the whole conversation.
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "(earlier)<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="append-only"):
        tokenize_chat(rewriting, CONVERSATION)


def test_prompt_and_reference_split_before_the_last_reply() -> None:
    prompt, reference = prompt_and_reference(CONVERSATION)
    assert prompt == CONVERSATION[:4] and reference == "stone river"


MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Avel?"},
    {"role": "assistant", "content": "The capital of Avel is Morrow."},
    {"role": "user", "content": "What is 12 minus 5?"},
    {"role": "assistant", "content": "12 minus 5 is 7."},
    {"role": "user", "content": "Reverse: stone river"},
    {"role": "assistant", "content": "river stone"},
]


@pytest.mark.parametrize("family", WORKING, ids=lambda f: f.name)
def test_labels_are_exactly_the_replies_on_every_template_family(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    replies = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert labelled_text(tok, MULTI_TURN) == "".join(r + family.end_of_turn for r in replies)
    # The labelled ids are the ids the model sees: the conversation tokenized once, as rendered.
    full = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tokenize_chat(tok, MULTI_TURN).input_ids == tok(full, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", WORKING, ids=lambda f: f.name)
def test_last_turn_only(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    out = tokenize_chat(tok, MULTI_TURN, last_turn_only=True)
    labelled = tok.decode([t for t, m in zip(out.input_ids, out.assistant_mask, strict=True) if m])
    assert labelled == "river stone" + family.end_of_turn


def test_reasoning_stripping_template_is_refused(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, REWRITES_HISTORY)
    conversation = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(TemplateError, match="does not render conversations append-only"):
        tokenize_chat(tok, conversation)
