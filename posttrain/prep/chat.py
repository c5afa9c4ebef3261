"""Chat rendering with the model's own template, and the loss mask over assistant tokens.

Most real chat templates carry no `{% generation %}` markers, so the assistant spans are found by
rendering growing prefixes of the conversation: the text an assistant turn adds is what lies
between the render of the turns before it (with the generation prompt) and the render including
it. That only works when rendering is append-only; a template that rewrites earlier turns is
refused rather than trained on wrong tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The chat template makes assistant masks impossible to derive."""


@dataclass
class Tokenized:
    input_ids: list[int]
    assistant_mask: list[bool]  # True where the token is part of an assistant reply (trains)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character spans of every assistant reply from
    message `first` on, each including the end-of-turn marker but not the whitespace after it."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise TemplateError(
                "the chat template does not render conversations append-only (it rewrites or drops earlier "
                f"turns when later ones are added; first seen at message {i}), so assistant tokens cannot be "
                "located; give the template {% generation %} markers or use a template that keeps turns")
        start, end = len(before), len(upto.rstrip())
        content = message["content"].strip()
        if content and content not in full[start:end]:
            raise TemplateError(f"the chat template does not reproduce assistant message {i} verbatim")
        spans.append((start, end))
    return full, spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token trains if it overlaps an assistant span (a token that merges the last character
    before a reply with its first one still carries reply text)."""
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and start < spans[j][1] and end > spans[j][0])
    return mask


def _marker_mask(tokenizer: Any, messages: list[dict]) -> Tokenized:
    """Templates with {% generation %} markers say themselves which tokens are the assistant's."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return Tokenized(input_ids=list(enc["input_ids"]), assistant_mask=[bool(m) for m in enc["assistant_masks"]])


def _keep_last_turn(tok: Tokenized) -> Tokenized:
    """Only the last contiguous run of assistant tokens trains."""
    mask = list(tok.assistant_mask)
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return Tokenized(tok.input_ids, [start <= i <= end for i in range(len(mask))])


def tokenize_chat(tokenizer: Any, messages: list[dict], last_turn_only: bool = False,
                  train_from_message: int = 0) -> Tokenized:
    """Token ids of the rendered conversation and which of them belong to assistant replies
    (every reply, only the last one, or those from message `train_from_message` on: the
    completion of a preference pair)."""
    if _GENERATION_MARKER.search(tokenizer.chat_template or ""):
        tok = _marker_mask(tokenizer, messages)
        if train_from_message:
            prefix = len(tokenizer.apply_chat_template(messages[:train_from_message], tokenize=True,
                                                       add_generation_prompt=True, return_dict=False))
            tok.assistant_mask[:prefix] = [False] * min(prefix, len(tok.assistant_mask))
    else:
        text, spans = assistant_spans(tokenizer, messages, first=train_from_message)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tok = Tokenized(input_ids=list(enc["input_ids"]), assistant_mask=_mask_from_spans(enc["offset_mapping"], spans))
    return _keep_last_turn(tok) if last_turn_only else tok


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: (prompt messages, reference reply)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
