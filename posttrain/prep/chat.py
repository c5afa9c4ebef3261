"""Chat rendering with the model's own template, and the loss mask over assistant tokens.

A reply trains as the model produces it at inference time: the prompt is the template's render of
the turns before it with the generation prompt, and the reply is what the template renders after
that prompt, up to and including the end-of-turn token (the special token that closes an assistant
reply; a newline or an end-of-sequence token the template adds after it never trains).

Most templates render conversations append-only: every reply of a conversation then lies in one
document, the conversation rendered once. Templates that rewrite earlier turns when later ones are
added (Qwen3 and DeepSeek-R1 drop the reasoning of earlier replies; Mistral v0.3 moves the system
prompt to the last user turn) give one document per reply that does not extend the document before
it, each with the history rendered as the template renders it for that reply. Templates with
`{% generation %}` markers say themselves which tokens are the assistant's; the end-of-turn token
right after a marked block trains too, and whitespace at a block's edges does not.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError as JinjaTemplateError

ROLES = ("system", "user", "assistant")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Stand-ins for message text when probing a template's layout: plain words survive trim, split, etc.
_USER, _USER2, _REPLY = "PosttrainProbeQuestion", "PosttrainProbeFollowup", "PosttrainProbeReply"


class TemplateError(ValueError):
    """The chat template refuses a conversation, or makes its assistant tokens impossible to find."""


@dataclass
class Tokenized:
    input_ids: list[int]
    assistant_mask: list[bool]  # True where the token is part of an assistant reply (trains)


@dataclass(frozen=True)
class TemplateShape:
    """How a template lays out one assistant reply, probed by rendering a one-turn conversation."""
    end_of_turn: str | None  # the special token that closes a reply (None: the template has none)
    lead: str  # text a reply starts with that the generation prompt does not hold (Mistral's " ")
    prefill: str  # text the generation prompt puts inside the reply (DeepSeek-R1's "<think>\n")


def _apply_template(tokenizer: Any, messages: list[dict], **kwargs: Any) -> Any:
    """`apply_chat_template`, with a template's own refusal (raise_exception) as our TemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except JinjaTemplateError as exc:
        hint = ""
        if messages and messages[0]["role"] == "system":
            hint = ("; if the template does not support a system turn, set data.fold_system_prompt: true to "
                    "merge the system prompt into the first user turn")
        raise TemplateError(f"the chat template refuses this conversation: {exc!s} (a rule of the template "
                            f"itself){hint}") from exc


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return _apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt: what a model answers from."""
    return list(_apply_template(tokenizer, messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """The conversation with a leading system message merged into the first user turn
    (system text, a blank line, user text), for templates without a system role."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def _added_tokens(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return sorted({str(getattr(t, "content", t)) for t in decoder.values()}, key=len, reverse=True)


def _special_at(tokenizer: Any, text: str) -> str | None:
    """The added (special) token `text` starts with, after any whitespace."""
    rest = text.lstrip()
    return next((t for t in _added_tokens(tokenizer) if t and rest.startswith(t)), None)


_SHAPES: dict[tuple, TemplateShape] = {}


def template_shape(tokenizer: Any) -> TemplateShape:
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, len(tokenizer))
    if key not in _SHAPES:
        user = {"role": "user", "content": _USER}
        prompt = _render(tokenizer, [user], True)
        one = _render(tokenizer, [user, {"role": "assistant", "content": _REPLY}], False)
        at = one.find(_REPLY)
        if at < 0:
            raise TemplateError("the chat template does not render an assistant message's content")
        before = one[:at]
        lead = before[len(prompt):] if before.startswith(prompt) else ""
        prefill = prompt[len(before):] if prompt.startswith(before) and not lead else ""
        # The end-of-turn token: the special token right after a reply that another turn follows
        # (the last reply of a conversation may be left open by the template, or be followed by EOS).
        two = _render(tokenizer, [user, {"role": "assistant", "content": _REPLY}, {"role": "user", "content": _USER2}],
                      False)
        after = two[two.find(_REPLY) + len(_REPLY):]
        _SHAPES[key] = TemplateShape(_special_at(tokenizer, after), lead, prefill)
    return _SHAPES[key]


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant reply with (`<|eot_id|>`,
    `<end_of_turn>`, `<|end|>`, `<|im_end|>`, ...), or None without a template or such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return template_shape(tokenizer).end_of_turn


def _close(tail: str, end_of_turn: str | None) -> str:
    """A reply: `tail` up to and including its end-of-turn token (added if the template leaves the
    last reply of a conversation open)."""
    if end_of_turn is None:
        return tail.rstrip()
    cut = tail.find(end_of_turn)
    return tail[:cut + len(end_of_turn)] if cut >= 0 else tail.rstrip() + end_of_turn


def _reply_as_last_turn(tokenizer: Any, messages: list[dict], i: int, full: str) -> str:
    """Message i's content as the template renders it when it is the last turn; its raw content
    when the template drops part of it even then (DeepSeek-R1 drops every reply's reasoning)."""
    raw = messages[i]["content"]
    probe = _render(tokenizer, messages[:i] + [{**messages[i], "content": _REPLY}], False)
    at = probe.find(_REPLY)
    if at >= 0:
        before, after = probe[:at], probe[at + len(_REPLY):]
        if full.startswith(before) and full.endswith(after) and len(full) - len(after) >= len(before):
            body = full[len(before):len(full) - len(after)]
            if raw.strip() in body:
                return body
    return raw


def reply_turn(tokenizer: Any, messages: list[dict], i: int) -> tuple[str, str]:
    """(prompt, reply) for assistant message i as the model meets it at inference time: the turns
    before it rendered with the generation prompt, and the text it must produce after that prompt,
    ending with its end-of-turn token."""
    shape = template_shape(tokenizer)
    prompt = _render(tokenizer, messages[:i], True)
    full = _render(tokenizer, messages[:i + 1], False)
    if full.startswith(prompt):
        return prompt, _close(full[len(prompt):], shape.end_of_turn)
    # The render with the reply is no extension of the prompt: the generation prompt pre-fills part
    # of the reply, or the template renders the history differently once the reply is added.
    body = _reply_as_last_turn(tokenizer, messages, i, full)
    if shape.prefill:
        if body.startswith(shape.prefill):
            body = body[len(shape.prefill):]
        elif shape.prefill.strip() and body.lstrip().startswith(shape.prefill.strip()):
            body = body.lstrip()[len(shape.prefill.strip()):].lstrip("\n")
    return prompt, shape.lead + body + (shape.end_of_turn or "")


def _documents(tokenizer: Any, messages: list[dict], trained: list[int]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Texts with the [start, end) character spans that train: a reply joins the document before it
    when its prompt extends that document, else it starts a new one."""
    docs: list[tuple[str, list[tuple[int, int]]]] = []
    for i in trained:
        prompt, reply = reply_turn(tokenizer, messages, i)
        span = (len(prompt), len(prompt) + len(reply))
        if docs and prompt.startswith(docs[-1][0]):
            docs[-1] = (prompt + reply, [*docs[-1][1], span])
        else:
            docs.append((prompt + reply, [span]))
    if docs:  # what the template renders after the last reply (a newline, an EOS) stays, untrained
        full = _render(tokenizer, messages, False)
        if full.startswith(docs[-1][0]):
            docs[-1] = (full, docs[-1][1])
    return docs


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token trains if it overlaps an assistant span (a token that merges the last character
    before a reply with its first one still carries reply text)."""
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and start < spans[j][1] and end > spans[j][0])
    return mask


_BLANK: weakref.WeakKeyDictionary[Any, dict[int, bool]] = weakref.WeakKeyDictionary()


def _is_blank(tokenizer: Any, known: dict[int, bool], token: int) -> bool:
    """Whether `token` decodes to whitespace only, remembered per tokenizer (decoding every token of
    every row again was 40% of preparing a marker template's rows)."""
    blank = known.get(token)
    if blank is None:
        blank = known[token] = not tokenizer.decode([token]).strip()
    return blank


def _trim_marked(tokenizer: Any, ids: list[int], marks: list[int], eot_id: int | None,
                 known: dict[int, bool]) -> Tokenized:
    """The template's generation marks made a loss mask (see _marker_masks); `known`: the
    tokenizer's whitespace-only tokens so far (see _is_blank). The marks are walked as bytes: `find`
    skips the untrained stretches in C, so Python touches only a run's edges (a per-token loop here
    was a third of preparing a row)."""
    mask = bytearray(marks)
    n = len(ids)
    i = mask.find(1)
    while i >= 0:
        j = mask.find(0, i)
        j = n if j < 0 else j
        start, end = i, j
        while start < end and ids[start] != eot_id and _is_blank(tokenizer, known, ids[start]):
            mask[start] = 0
            start += 1
        while end > start and ids[end - 1] != eot_id and _is_blank(tokenizer, known, ids[end - 1]):
            end -= 1
            mask[end] = 0
        if end > start and ids[end - 1] != eot_id and end < n and ids[end] == eot_id:
            mask[end] = 1
            j = end + 1
        i = mask.find(1, j)
    return Tokenized(ids, list(map(bool, mask)))


def _marker_masks(tokenizer: Any, conversations: list[list[dict]]) -> list[Tokenized]:
    """Templates with {% generation %} markers say themselves which tokens are the assistant's. A
    marked run loses the whitespace-only tokens at its edges (the newline after a role header or
    after the end-of-turn token) and gains the end-of-turn token right after it, if the markers
    left it out: the model must learn to stop.

    Several conversations go through one apply_chat_template call: it renders each on its own and
    tokenizes them in one batch (one encode_batch, no padding), which gives every conversation the
    ids and marks of its own call at a fraction of the per-call cost. One conversation keeps the
    plain call (its refusals, e.g. of an empty conversation, stay the library's own)."""
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    if len(conversations) == 1:
        enc = _apply_template(tokenizer, conversations[0], **kwargs)
        pairs = [(enc["input_ids"], enc["assistant_masks"])]
    else:
        enc = _apply_template(tokenizer, conversations, **kwargs)
        pairs = list(zip(enc["input_ids"], enc["assistant_masks"], strict=True))
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    known = _BLANK.setdefault(tokenizer, {})
    return [_trim_marked(tokenizer, list(ids), marks, eot_id, known) for ids, marks in pairs]


def _marker_mask(tokenizer: Any, messages: list[dict]) -> Tokenized:
    """One conversation's mask from the template's generation markers (see _marker_masks)."""
    return _marker_masks(tokenizer, [messages])[0]


def _keep_last_turn(tok: Tokenized) -> Tokenized:
    """Only the last contiguous run of assistant tokens trains."""
    mask = bytearray(tok.assistant_mask)
    n, end = len(mask), mask.rfind(1)
    if end < 0:
        return Tokenized(tok.input_ids, [False] * n)
    start = mask.rfind(0, 0, end) + 1  # rfind gives -1 where the run starts the sequence
    return Tokenized(tok.input_ids, [False] * start + [True] * (end + 1 - start) + [False] * (n - end - 1))


def _is_marker_template(tokenizer: Any) -> bool:
    return bool(_GENERATION_MARKER.search(tokenizer.chat_template or ""))


def _from_marks(tokenizer: Any, tok: Tokenized, messages: list[dict], last_turn_only: bool,
                train_from_message: int) -> list[Tokenized]:
    """A marker template's one example of a conversation, restricted as chat_examples asks."""
    if train_from_message:
        prefix = len(prompt_ids(tokenizer, messages[:train_from_message]))
        tok.assistant_mask[:prefix] = [False] * min(prefix, len(tok.assistant_mask))
    return [_keep_last_turn(tok) if last_turn_only else tok]


def chat_examples_batch(tokenizer: Any, conversations: list[list[dict]], last_turn_only: bool = False,
                        train_from_message: int = 0) -> list[list[Tokenized]]:
    """chat_examples of each conversation, the same examples, but a marker template's conversations
    are rendered and tokenized together (see _marker_masks), which is what makes preparing a split
    fast. Anything but a list of non-empty conversations goes one by one (each gets its own refusal)."""
    batchable = len(conversations) > 1 and all(isinstance(c, list) and c for c in conversations)
    if not (batchable and _is_marker_template(tokenizer)):
        return [chat_examples(tokenizer, c, last_turn_only, train_from_message) for c in conversations]
    return [_from_marks(tokenizer, tok, messages, last_turn_only, train_from_message)
            for tok, messages in zip(_marker_masks(tokenizer, conversations), conversations, strict=True)]


def chat_examples(tokenizer: Any, messages: list[dict], last_turn_only: bool = False,
                  train_from_message: int = 0) -> list[Tokenized]:
    """The training examples of one conversation: token ids and which of them train (every reply,
    only the last one, or those from message `train_from_message` on: the completion of a
    preference pair). One example unless the template rewrites earlier turns (see the module)."""
    if _is_marker_template(tokenizer):
        return _from_marks(tokenizer, _marker_mask(tokenizer, messages), messages, last_turn_only, train_from_message)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from_message]
    if last_turn_only:
        trained = trained[-1:]
    if not trained:
        return []
    out = []
    for text, spans in _documents(tokenizer, messages, trained):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(Tokenized(list(enc["input_ids"]), _mask_from_spans(enc["offset_mapping"], spans)))
    return out


def tokenize_chat(tokenizer: Any, messages: list[dict], last_turn_only: bool = False,
                  train_from_message: int = 0) -> Tokenized:
    """The conversation as one example (see chat_examples); a template that rewrites earlier turns
    can need several for several trained replies, and then this raises."""
    examples = chat_examples(tokenizer, messages, last_turn_only, train_from_message)
    if len(examples) != 1:
        raise TemplateError(
            f"the chat template renders the trained replies of this conversation as {len(examples)} examples "
            "(it rewrites earlier turns when later ones are added), not one sequence")
    return examples[0]


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: (prompt messages, reference reply)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
