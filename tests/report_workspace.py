"""A synthetic run workspace with every file the run report reads, written as the stages write
them (the same names, layouts and Parquet columns), for the report's tests."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.promotion_stats import example_id
from posttrain.storage_fs import Store

EVAL_ROWS = 12
STEPS = 8
PARADIGM_KEYS = {
    "sft": {},
    "dpo": {"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margin": 0.2, "rewards/accuracy": 0.5},
    "kd": {"kd/forward_kl": 2.0, "kd/cross_entropy": 5.0},
    "grpo": {"reward/mean": 0.3, "reward/std": 0.1, "reward/exact_match": 0.25, "reward/exact_match_std": 0.1,
             "reward/length_penalty": -0.05, "reward/length_penalty_std": 0.02, "kl": 0.01, "clip_fraction": 0.0,
             "completion_len": 11.0},
}
FORMATS = {"sft": "chat", "kd": "chat", "dpo": "preference", "grpo": "prompt"}
METRIC = {"sft": "eval_loss", "kd": "eval_loss", "dpo": "preference_accuracy", "grpo": "reward_mean"}


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def write_eval_file(path: Path) -> list[str]:
    """The eval JSONL; returns each row's example id (line-numbered from 1, as evaluation does)."""
    rows = [chat_row(i) for i in range(EVAL_ROWS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [example_id(line, row) for line, row in enumerate(rows, 1)]


def per_example(store: Store, ids: list[str], paradigm: str, shift: float, who: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    columns: dict[str, list[Any]] = {"example_id": ids}
    if paradigm in ("sft", "kd"):
        columns |= {"eval_loss__sum": [30.0 + shift + i for i in range(n)], "eval_loss__tokens": [10] * n,
                    "exact_match": [float(i % 3 == 0) for i in range(n)],
                    "generated": [f"{who} answer {i}" if i < 8 else None for i in range(n)]}
    if paradigm == "kd":
        columns |= {"kl_to_teacher__sum": [20.0 + shift] * n, "kl_to_teacher__tokens": [10] * n}
    if paradigm == "dpo":
        columns |= {"preference_accuracy": [float(i % 2) for i in range(n)], "reward_margin": [0.1 + shift] * n,
                    "dpo_loss": [0.69 - shift] * n}
    if paradigm == "grpo":
        columns |= {"reward_mean": [0.5 + shift] * n, "generated": [f"{who} says {i}" for i in range(n)]}
    table = pa.table(columns).replace_schema_metadata({"posttrain": json.dumps({"eval_fingerprint": "f" * 64,
                                                                               "tokenizer_fingerprint": "t" * 16})})
    with store.open("wb") as fh:
        pq.write_table(table, fh)


def shards(ws: Store, paradigm: str, max_len: int) -> dict[str, Any]:
    """The prepared splits' shards and the manifest's split records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits: dict[str, Any] = {}
    for split, count in (("train", 40), ("eval", EVAL_ROWS)):
        lengths = [8 + (7 * i) % 50 for i in range(count)]
        if paradigm in ("sft", "kd"):
            blocks = [lengths[i:i + 3] for i in range(0, count, 3)]
            table = pa.table({"doc_lens": pa.array(blocks, type=pa.list_(pa.int32()))})
            name, info = f"data/{split}-00000.parquet", {"documents": count, "blocks": len(blocks), "layout": "blocks",
                                                          "fill_ratio": sum(lengths) / (len(blocks) * max_len),
                                                          "truncated": 1, "dropped_overlong": 0,
                                                          "dropped_no_target": 0}
        elif paradigm == "dpo":
            table = pa.table({"chosen_input_ids": [[1] * n for n in lengths],
                              "rejected_input_ids": [[2] * (n + 3) for n in lengths]})
            name, info = f"data/{split}-pairs-00000.parquet", {"pairs": count, "layout": "pairs", "truncated": 0,
                                                                "dropped_overlong": 1}
        else:
            table = pa.table({"prompt_input_ids": [[1] * n for n in lengths], "prompt": ["p"] * count,
                              "answer": ["a"] * count})
            name, info = f"data/{split}-prompts-00000.parquet", {"prompts": count, "layout": "prompts",
                                                                  "dropped_overlong": 0}
        with (ws / name).open("wb") as fh:
            pq.write_table(table, fh)
        splits[split] = {"rows": count, "tokens": sum(lengths), **info, "shards": [name]}
    return splits


def write_workspace(root: str, paradigm: str = "sft", champion: bool = True) -> str:
    """A finished run of `paradigm` under `root` (a path or URI; the storage root of its recipe),
    compared with a champion from an earlier run; returns the workspace URI."""
    ws_uri = f"{root}/rep/runs/second"
    ws = Store.at(ws_uri)
    eval_file = f"{root}/data/eval.jsonl"
    if "://" in root:
        ids = [example_id(line, chat_row(line - 1)) for line in range(1, EVAL_ROWS + 1)]
        Store.at(eval_file).write_text("".join(json.dumps(chat_row(i)) + "\n" for i in range(EVAL_ROWS)))
    else:
        ids = write_eval_file(Path(eval_file))
    if paradigm in ("dpo", "grpo"):  # positions in the prepared split, not lines
        ids = [example_id(i, {"row": i}) for i in range(EVAL_ROWS)]
    max_len = 64
    metric = METRIC[paradigm]
    recipe = {"name": "rep", "paradigm": paradigm, "data": {"format": FORMATS[paradigm], "eval": eval_file},
              "storage": {"root": root},
              "promotion": {"metric": metric, "mode": "min" if metric == "eval_loss" else "max",
                            "min_improvement": 0.01}}
    (ws / "recipe.json").write_json(recipe)
    lines = []
    for step in range(1, STEPS + 1):
        row = {"step": step, "loss": 3.0 / step, "lr": 1e-3 * (1 - step / (STEPS + 1)), "grad_norm": 1.0 + 0.1 * step,
               "tokens": 512, "tokens_per_s": 1000.0 + step, "tokens_per_s_per_device": 500.0 + step,
               "mfu": 0.01 * step, **PARADIGM_KEYS[paradigm]}
        lines.append(json.dumps(row))
    lines.insert(3, json.dumps({"step": 3, "loss": math.pi}))  # a resumed job logs step 3 again: the later one counts
    (ws / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (ws / "data" / "manifest.json").write_json({"format": FORMATS[paradigm], "max_seq_len": max_len,
                                                 "packing": {"enabled": True, "overlong": "truncate"},
                                                 "splits": shards(ws, paradigm, max_len)})
    metrics = {"sft": {"eval_loss": 3.2, "exact_match": 0.33, "eval_tokens": 120},
               "kd": {"eval_loss": 3.2, "exact_match": 0.33, "kl_to_teacher": 2.0},
               "dpo": {"preference_accuracy": 0.5, "reward_margin": 0.2, "dpo_loss": 0.6},
               "grpo": {"reward_mean": 0.7}}[paradigm]
    (ws / "eval" / "metrics.json").write_json(metrics)
    per_example(ws / "eval" / "per_example.parquet", ids, paradigm, shift=0.0, who="challenger")
    if paradigm == "grpo":
        (ws / "eval" / "samples.jsonl").write_text("".join(json.dumps(
            {"prompt": [{"role": "user", "content": f"prompt {i}"}], "answer": f"answer {i}",
             "generated": f"challenger says {i}"}) + "\n" for i in range(EVAL_ROWS)))
    previous = None
    if champion:
        champion_results = f"{root}/rep/evaluations/first/per_example.parquet"
        per_example(Store.at(champion_results), ids, paradigm, shift=0.5, who="champion")
        previous = {"version": "first", "value": 3.25, "per_example_uri": champion_results,
                    "workspace": f"{root}/rep/runs/first"}
    comparison = {"metric": metric, "n": EVAL_ROWS, "difference": -0.05, "low": -0.08, "high": -0.02,
                  "confidence_level": 0.95, "resamples": 2000, "seed": 0} if champion else None
    (ws / "promotion" / "decision.json").write_json({
        "promoted": True, "reason": "the upper bound -0.02 is below -0.01, so promoted", "decision": "confidence",
        "metric": metric, "value": metrics[metric], "comparison": comparison, "previous_champion": previous})
    return ws_uri


TASKS = [{"task_id": "resolve_recipe", "state": "success", "duration": 1.5},
         {"task_id": "train", "state": "success", "duration": 42.0},
         {"task_id": "promote", "state": "skipped", "duration": 0.4},
         {"task_id": "ray_cluster_teardown", "state": None, "duration": None}]
