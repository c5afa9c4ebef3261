"""Prepared layouts for the preference (DPO) and prompt (RL) formats.

preference: one row per pair, both sides tokenized with the chat template; only the completion
  (the messages after the prompt) trains. Columns chosen_input_ids, chosen_mask, rejected_input_ids,
  rejected_mask. A pair longer than max_seq_len on either side is truncated (both sides keep the
  prompt) or dropped, as the recipe says.
prompt: the prompt rendered with the generation prompt, ready for a rollout engine, plus the
  reference answer for verifiable rewards. Columns prompt_input_ids, prompt (JSON messages),
  answer. A prompt that leaves no room to generate is dropped (truncating a prompt changes the task).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain.prep.chat import fold_system_prompt, prompt_ids, tokenize_chat
from posttrain.prep.shards import RowShards
from posttrain.storage_fs import Store


def prepare_preference(tokenizer: Any, rows: Iterable[dict], max_len: int, overlong: str, out_dir: Path | Store,
                       split: str, fold_system: bool = False) -> dict:
    shards = RowShards(out_dir, f"{split}-pairs", {"chosen_input_ids": "ids", "chosen_mask": "mask",
                                                   "rejected_input_ids": "ids", "rejected_mask": "mask"})
    n_rows = truncated = dropped = tokens = 0
    for row in rows:
        n_rows += 1
        prompt = fold_system_prompt(row["prompt"]) if fold_system else row["prompt"]
        k = len(prompt)
        sides = {side: tokenize_chat(tokenizer, prompt + row[side], train_from_message=k)
                 for side in ("chosen", "rejected")}
        if any(len(t.input_ids) > max_len for t in sides.values()):
            if overlong == "drop":
                dropped += 1
                continue
            truncated += 1
        pair = {}
        for side, tok in sides.items():
            pair[f"{side}_input_ids"], pair[f"{side}_mask"] = tok.input_ids[:max_len], tok.assistant_mask[:max_len]
            tokens += len(pair[f"{side}_input_ids"])
        shards.add(**pair)
    shards.close()
    return {"rows": n_rows, "pairs": shards.rows, "tokens": tokens, "truncated": truncated,
            "dropped_overlong": dropped, "layout": "pairs", "shards": shards.names}


def prepare_prompts(tokenizer: Any, rows: Iterable[dict], max_len: int, out_dir: Path | Store, split: str,
                    min_new_tokens: int = 1, fold_system: bool = False) -> dict:
    shards = RowShards(out_dir, f"{split}-prompts", {"prompt_input_ids": "ids", "prompt": "text", "answer": "text"})
    n_rows = dropped = n_tokens = 0
    for row in rows:
        n_rows += 1
        prompt = fold_system_prompt(row["prompt"]) if fold_system else row["prompt"]
        tokens = prompt_ids(tokenizer, prompt)
        if len(tokens) + min_new_tokens > max_len:
            dropped += 1
            continue
        shards.add(prompt_input_ids=tokens, prompt=json.dumps(prompt), answer=row.get("answer"))
        n_tokens += len(tokens)
    shards.close()
    return {"rows": n_rows, "prompts": shards.rows, "tokens": n_tokens, "dropped_overlong": dropped,
            "layout": "prompts", "shards": shards.names}
