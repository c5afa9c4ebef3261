"""Preference and prompt data: their own suites and prepared layouts (for the DPO and RL trainers),
and the over-length guard of the prepare stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from posttrain.prep.formats import prepare_preference, prepare_prompts
from posttrain.recipe import DataValidationConfig, load_recipe
from posttrain.validation.frames import build_frames
from posttrain.validation.suites import run_suite
from tests.conftest import write_recipe

SYSTEM = {"role": "system", "content": "Answer briefly."}
PAIR = {"prompt": [SYSTEM, {"role": "user", "content": "What is 2 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "2 plus 2 is 4."}],
        "rejected": [{"role": "assistant", "content": "2 plus 2 is 5."}]}
PROMPT = {"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "answer": "7"}


def failures(rows: list, data_format: str) -> dict[str, list[int]]:
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    results = run_suite(build_frames(lines, data_format), data_format, DataValidationConfig(min_rows=1), 1, "t")
    return {r.rule: r.example_lines for r in results if not r.success}


def test_preference_suite() -> None:
    assert failures([PAIR], "preference") == {}
    same = {**PAIR, "rejected": PAIR["chosen"]}
    user_side = {**PAIR, "chosen": [{"role": "user", "content": "x"}]}
    no_prompt = {**PAIR, "prompt": []}
    ends_with_assistant = {**PAIR, "prompt": PAIR["prompt"] + [{"role": "assistant", "content": "hm"}]}
    assert failures([PAIR, same, user_side, no_prompt, ends_with_assistant], "preference") == {
        "chosen differs from rejected": [2],
        "chosen is a non-empty list of assistant messages": [3],
        "prompt is a non-empty list of messages": [4],
        "prompt ends with the user": [5],
    }


def test_prompt_suite() -> None:
    assert failures([PROMPT, {"prompt": PROMPT["prompt"]}], "prompt") == {}
    bad_answer = {**PROMPT, "answer": 7}
    empty = {"prompt": [{"role": "user", "content": ""}]}
    assert failures([PROMPT, bad_answer, empty], "prompt") == {
        "answer, when present, is a string": [2], "content is not empty": [3]}


def test_preference_layout_trains_only_the_completions(tokenizer, tmp_path: Path) -> None:
    stats = prepare_preference(tokenizer, [PAIR, PAIR], 256, "truncate", tmp_path, "train")
    assert stats["pairs"] == 2 and stats["layout"] == "pairs"
    table = pq.read_table(tmp_path / "train-pairs-00000.parquet").to_pylist()[0]
    for side in ("chosen", "rejected"):
        ids, mask = table[f"{side}_input_ids"], table[f"{side}_mask"]
        assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == \
            PAIR[side][0]["content"] + "<|im_end|>"
    # Both sides share the prompt tokens exactly.
    n = table["chosen_mask"].index(True)
    assert table["chosen_input_ids"][:n] == table["rejected_input_ids"][:n]


def test_prompt_layout_ends_with_the_generation_prompt(tokenizer, tmp_path: Path) -> None:
    long = {"prompt": [{"role": "user", "content": "word " * 400}]}
    stats = prepare_prompts(tokenizer, [PROMPT, long], 128, tmp_path, "train")
    assert (stats["prompts"], stats["dropped_overlong"]) == (1, 1)
    [row] = pq.read_table(tmp_path / "train-prompts-00000.parquet").to_pylist()
    assert tokenizer.decode(row["prompt_input_ids"]).endswith("<|im_start|>assistant\n")
    assert row["answer"] == "7" and json.loads(row["prompt"]) == PROMPT["prompt"]


def test_too_many_overlong_rows_fail_prepare_with_numbers(tmp_path: Path) -> None:
    from posttrain.prep.prepare import OverlongData, prepare

    recipe = load_recipe(write_recipe(tmp_path, data={"max_seq_len": 64,
                                                      "validation": {"min_rows": 1, "max_overlong_fraction": 0.05}}))
    message = r"train.jsonl: \d+ of 400 rows \(\d+\.\d%\) are longer than data.max_seq_len 64"
    with pytest.raises(OverlongData, match=message):
        prepare(recipe, tmp_path / "ws")
