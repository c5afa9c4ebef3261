"""Chat JSONL → the two tables the expectations run on (one row per conversation, one per turn).

Rows that are not JSON, or not objects, can't become table rows; they are collected as problems
with their line numbers instead of being dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatFrames:
    conversations: Any  # pandas.DataFrame: line, messages_is_list, n_messages, last_role, role_order_ok, fingerprint
    turns: Any  # pandas.DataFrame: line, turn, role, content_is_str, content_blank
    unreadable: list[dict] = field(default_factory=list)  # {"line", "error"}


MISSING = "<missing>"  # stands for an absent role: Great Expectations' set checks skip nulls


def _role_order_ok(roles: list) -> bool:
    """An optional system prompt first, then user and assistant taking turns, user first. Rows
    with no messages or an unknown role are left to the rules about those (one finding per fault)."""
    if not roles or any(r not in ("system", "user", "assistant") for r in roles):
        return True
    turns = roles[1:] if roles[0] == "system" else roles
    return bool(turns) and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns))


def chat_frames(lines: Iterable[bytes]) -> ChatFrames:
    import pandas as pd

    conversations, turns, unreadable = [], [], []
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
        messages = row.get("messages")
        is_list = isinstance(messages, list) and len(messages) > 0
        last = messages[-1] if is_list else None
        roles = [m.get("role") if isinstance(m, dict) else None for m in (messages if is_list else [])]
        conversations.append({
            "line": lineno,
            "messages_is_list": is_list,
            "n_messages": len(messages) if is_list else 0,
            "last_role": last.get("role") if isinstance(last, dict) else None,
            "role_order_ok": _role_order_ok(roles),
            "fingerprint": hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16],
        })
        for i, message in enumerate(messages if is_list else []):
            message = message if isinstance(message, dict) else {}
            content = message.get("content")
            turns.append({
                "line": lineno,
                "turn": i,
                "role": message.get("role") or MISSING,
                "content_is_str": isinstance(content, str),
                "content_blank": isinstance(content, str) and not content.strip(),
            })
    return ChatFrames(
        conversations=pd.DataFrame(conversations, columns=["line", "messages_is_list", "n_messages", "last_role",
                                                           "role_order_ok", "fingerprint"]),
        turns=pd.DataFrame(turns, columns=["line", "turn", "role", "content_is_str", "content_blank"]),
        unreadable=unreadable,
    )
