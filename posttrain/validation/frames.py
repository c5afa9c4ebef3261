"""Data files → the two tables the expectations run on: one row per example, one per message.

Formats (JSON lines):
- chat:       {"messages": [{"role", "content"}, ...]} ending with the assistant
- preference: {"prompt": [messages ending with the user], "chosen": [assistant message(s)],
               "rejected": [assistant message(s)]}
- prompt:     {"prompt": [messages ending with the user], "answer": "..." (optional, for rewards)}

Rows that are not JSON, or not objects, can't become table rows; they are collected as problems
with their line numbers instead of being dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
MISSING = "<missing>"  # stands for an absent role: Great Expectations' set checks skip nulls


@dataclass
class Frames:
    rows: Any  # pandas.DataFrame, one row per example; always has `line` and `fingerprint`
    turns: Any  # pandas.DataFrame, one row per message: line, part, role, content_is_str, content_blank
    unreadable: list[dict] = field(default_factory=list)  # {"line", "error"}


def _role_order_ok(roles: list) -> bool:
    """An optional system prompt first, then user and assistant taking turns, user first. Rows
    with no messages or an unknown role are left to the rules about those (one finding per fault)."""
    if not roles or any(r not in ROLES for r in roles):
        return True
    turns = roles[1:] if roles[0] == "system" else roles
    return bool(turns) and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns))


def _messages(value: Any) -> list:
    return value if isinstance(value, list) and value else []


def _roles(messages: list) -> list:
    return [m.get("role") if isinstance(m, dict) else None for m in messages]


def _turn_rows(lineno: int, part: str, messages: list) -> list[dict]:
    rows = []
    for message in messages:
        message = message if isinstance(message, dict) else {}
        content = message.get("content")
        rows.append({"line": lineno, "part": part, "role": message.get("role") or MISSING,
                     "content_is_str": isinstance(content, str),
                     "content_blank": isinstance(content, str) and not content.strip()})
    return rows


def _fingerprint(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chat_row(lineno: int, row: dict) -> tuple[dict, list[dict]]:
    messages = _messages(row.get("messages"))
    roles = _roles(messages)
    return ({"line": lineno, "messages_is_list": bool(messages), "last_role": roles[-1] if roles else None,
             "role_order_ok": _role_order_ok(roles), "fingerprint": _fingerprint(row.get("messages"))},
            _turn_rows(lineno, "messages", messages))


def _prompt_fields(lineno: int, row: dict) -> tuple[dict, list[dict]]:
    prompt = _messages(row.get("prompt"))
    roles = _roles(prompt)
    return ({"line": lineno, "prompt_is_list": bool(prompt),
             "prompt_ends_with_user": not prompt or roles[-1] == "user",
             "role_order_ok": _role_order_ok(roles)},
            _turn_rows(lineno, "prompt", prompt))


def _preference_row(lineno: int, row: dict) -> tuple[dict, list[dict]]:
    out, turns = _prompt_fields(lineno, row)
    for side in ("chosen", "rejected"):
        completion = _messages(row.get(side))
        out[f"{side}_is_assistant"] = bool(completion) and all(r == "assistant" for r in _roles(completion))
        turns += _turn_rows(lineno, side, completion)
    out["chosen_differs"] = json.dumps(row.get("chosen"), sort_keys=True) != json.dumps(row.get("rejected"),
                                                                                       sort_keys=True)
    out["fingerprint"] = _fingerprint(row)
    return out, turns


def _prompt_row(lineno: int, row: dict) -> tuple[dict, list[dict]]:
    out, turns = _prompt_fields(lineno, row)
    out["answer_ok"] = "answer" not in row or isinstance(row["answer"], str)
    out["fingerprint"] = _fingerprint(row)
    return out, turns


ROW_BUILDERS = {"chat": _chat_row, "preference": _preference_row, "prompt": _prompt_row}


def build_frames(lines: Iterable[bytes], data_format: str) -> Frames:
    import pandas as pd

    build = ROW_BUILDERS[data_format]
    rows, turns, unreadable = [], [], []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            unreadable.append({"line": lineno, "error": f"not UTF-8: {exc.reason} at byte {exc.start}"})
            continue
        except json.JSONDecodeError as exc:
            unreadable.append({"line": lineno, "error": f"not JSON: {exc.msg} (column {exc.colno})"})
            continue
        if not isinstance(row, dict):
            unreadable.append({"line": lineno, "error": f"expected a JSON object, got {type(row).__name__}"})
            continue
        example, messages = build(lineno, row)
        rows.append(example)
        turns.extend(messages)
    columns = list(build(0, {})[0])
    return Frames(rows=pd.DataFrame(rows, columns=columns),
                  turns=pd.DataFrame(turns, columns=["line", "part", "role", "content_is_str", "content_blank"]),
                  unreadable=unreadable)
