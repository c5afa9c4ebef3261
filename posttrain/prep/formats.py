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
from posttrain.storage_fs import Store


def _write(table: dict[str, Any], path: Path | Store) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with path.open("wb") as fh:  # a local file or an object (streamed in parts)
        pq.write_table(pa.table(table), fh)


def prepare_preference(tokenizer: Any, rows: Iterable[dict], max_len: int, overlong: str, out_dir: Path | Store,
                       split: str, fold_system: bool = False) -> dict:
    import pyarrow as pa

    cols: dict[str, list] = {"chosen_input_ids": [], "chosen_mask": [], "rejected_input_ids": [], "rejected_mask": []}
    n_rows = truncated = dropped = 0
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
        for side, tok in sides.items():
            cols[f"{side}_input_ids"].append(tok.input_ids[:max_len])
            cols[f"{side}_mask"].append(tok.assistant_mask[:max_len])
    name = f"{split}-pairs-00000.parquet"
    _write({"chosen_input_ids": pa.array(cols["chosen_input_ids"], type=pa.list_(pa.int32())),
            "chosen_mask": pa.array(cols["chosen_mask"], type=pa.list_(pa.bool_())),
            "rejected_input_ids": pa.array(cols["rejected_input_ids"], type=pa.list_(pa.int32())),
            "rejected_mask": pa.array(cols["rejected_mask"], type=pa.list_(pa.bool_()))}, out_dir / name)
    tokens = sum(len(x) for x in cols["chosen_input_ids"] + cols["rejected_input_ids"])
    return {"rows": n_rows, "pairs": len(cols["chosen_input_ids"]), "tokens": tokens, "truncated": truncated,
            "dropped_overlong": dropped, "layout": "pairs", "shards": [f"data/{name}"]}


def prepare_prompts(tokenizer: Any, rows: Iterable[dict], max_len: int, out_dir: Path | Store, split: str,
                    min_new_tokens: int = 1, fold_system: bool = False) -> dict:
    import pyarrow as pa

    ids, prompts, answers = [], [], []
    n_rows = dropped = 0
    for row in rows:
        n_rows += 1
        prompt = fold_system_prompt(row["prompt"]) if fold_system else row["prompt"]
        tokens = prompt_ids(tokenizer, prompt)
        if len(tokens) + min_new_tokens > max_len:
            dropped += 1
            continue
        ids.append(tokens)
        prompts.append(json.dumps(prompt))
        answers.append(row.get("answer"))
    name = f"{split}-prompts-00000.parquet"
    _write({"prompt_input_ids": pa.array(ids, type=pa.list_(pa.int32())), "prompt": pa.array(prompts, pa.string()),
            "answer": pa.array(answers, pa.string())}, out_dir / name)
    return {"rows": n_rows, "prompts": len(ids), "tokens": sum(map(len, ids)), "dropped_overlong": dropped,
            "layout": "prompts", "shards": [f"data/{name}"]}
