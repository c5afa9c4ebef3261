"""Prepared layouts for the preference (DPO) and prompt (RL) formats.

preference: one row per pair, both sides tokenized with the chat template; only the completion
  (the messages after the prompt) trains. Columns chosen_input_ids, chosen_mask, rejected_input_ids,
  rejected_mask. A pair longer than max_seq_len on either side is truncated (both sides keep the
  prompt) or dropped, as the recipe says.
prompt: the prompt rendered with the generation prompt, ready for a rollout engine, plus the
  reference answer for verifiable rewards. Columns prompt_input_ids, prompt (JSON messages),
  answer. A prompt that leaves no room to generate is dropped (truncating a prompt changes the task).

Each format is a small class that turns one row into one record (or none) and counts what
happened; the local prepare streams rows through it into RowShards, and the Ray prepare runs the
same class over byte ranges of the file in parallel and writes the same shards (ray_prepare).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from posttrain.prep.chat import fold_system_prompt, prompt_ids, tokenize_chat
from posttrain.prep.shards import RowShards
from posttrain.storage_fs import Store


class _Counted:
    counts: dict[str, int]

    def fresh(self) -> _Counted:
        """The same format with its counts at zero (each Ray range counts its own rows)."""
        return replace(self, counts=dict.fromkeys(self.counts, 0))


@dataclass
class PreferenceRows(_Counted):
    max_len: int
    overlong: str = "truncate"
    fold_system: bool = False
    suffix: ClassVar[str] = "pairs"
    kinds: ClassVar[dict[str, str]] = {"chosen_input_ids": "ids", "chosen_mask": "mask",
                                       "rejected_input_ids": "ids", "rejected_mask": "mask"}
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("rows", "tokens", "truncated", "dropped_overlong"), 0))

    def record(self, tokenizer: Any, row: dict) -> dict | None:
        """The row's pair (both sides tokenized, cut to max_len), or None where it is dropped."""
        self.counts["rows"] += 1
        prompt = fold_system_prompt(row["prompt"]) if self.fold_system else row["prompt"]
        k = len(prompt)
        sides = {side: tokenize_chat(tokenizer, prompt + row[side], train_from_message=k)
                 for side in ("chosen", "rejected")}
        if any(len(t.input_ids) > self.max_len for t in sides.values()):
            if self.overlong == "drop":
                self.counts["dropped_overlong"] += 1
                return None
            self.counts["truncated"] += 1
        pair = {}
        for side, tok in sides.items():
            pair[f"{side}_input_ids"] = tok.input_ids[:self.max_len]
            pair[f"{side}_mask"] = tok.assistant_mask[:self.max_len]
            self.counts["tokens"] += len(pair[f"{side}_input_ids"])
        return pair

    def stats(self, kept: int, names: list[str]) -> dict:
        c = self.counts
        return {"rows": c["rows"], "pairs": kept, "tokens": c["tokens"], "truncated": c["truncated"],
                "dropped_overlong": c["dropped_overlong"], "layout": "pairs", "shards": names}


@dataclass
class PromptRows(_Counted):
    max_len: int
    min_new_tokens: int = 1  # room a rollout needs after the prompt
    fold_system: bool = False
    suffix: ClassVar[str] = "prompts"
    kinds: ClassVar[dict[str, str]] = {"prompt_input_ids": "ids", "prompt": "text", "answer": "text"}
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("rows", "tokens", "dropped_overlong"), 0))

    def record(self, tokenizer: Any, row: dict) -> dict | None:
        """The row's rendered prompt and answer, or None where the prompt leaves no room to generate."""
        self.counts["rows"] += 1
        prompt = fold_system_prompt(row["prompt"]) if self.fold_system else row["prompt"]
        tokens = prompt_ids(tokenizer, prompt)
        if len(tokens) + self.min_new_tokens > self.max_len:
            self.counts["dropped_overlong"] += 1
            return None
        self.counts["tokens"] += len(tokens)
        return {"prompt_input_ids": tokens, "prompt": json.dumps(prompt), "answer": row.get("answer")}

    def stats(self, kept: int, names: list[str]) -> dict:
        c = self.counts
        return {"rows": c["rows"], "prompts": kept, "tokens": c["tokens"], "dropped_overlong": c["dropped_overlong"],
                "layout": "prompts", "shards": names}


RowFormat = PreferenceRows | PromptRows


def prepare_rows(fmt: RowFormat, tokenizer: Any, rows: Iterable[dict], out_dir: Path | Store, split: str) -> dict:
    """Stream `rows` through the format into `<split>-<suffix>-NNNNN.parquet` shards; the split's
    manifest entry."""
    shards = RowShards(out_dir, f"{split}-{fmt.suffix}", fmt.kinds)
    for row in rows:
        if (record := fmt.record(tokenizer, row)) is not None:
            shards.add(**record)
    shards.close()
    return fmt.stats(shards.rows, shards.names)


def prepare_preference(tokenizer: Any, rows: Iterable[dict], max_len: int, overlong: str, out_dir: Path | Store,
                       split: str, fold_system: bool = False) -> dict:
    return prepare_rows(PreferenceRows(max_len, overlong, fold_system), tokenizer, rows, out_dir, split)


def prepare_prompts(tokenizer: Any, rows: Iterable[dict], max_len: int, out_dir: Path | Store, split: str,
                    min_new_tokens: int = 1, fold_system: bool = False) -> dict:
    return prepare_rows(PromptRows(max_len, min_new_tokens, fold_system), tokenizer, rows, out_dir, split)
