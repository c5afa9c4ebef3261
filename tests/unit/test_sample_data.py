"""The committed sample data is exactly what the generator writes (nothing copied from elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import samples
from tests.conftest import SAMPLE_DATA


def test_generator_reproduces_the_committed_files(tmp_path: Path) -> None:
    written = samples.generate(tmp_path)
    for split, path in written.items():
        assert path.read_bytes() == (SAMPLE_DATA / f"{split}.jsonl").read_bytes()


def test_generator_reproduces_the_committed_preference_and_prompt_files(tmp_path: Path) -> None:
    for data_format, folder in (("preference", "tiny-preference"), ("prompt", "tiny-prompts")):
        written = samples.generate(tmp_path / data_format, data_format=data_format)
        for split, path in written.items():
            assert path.read_bytes() == (SAMPLE_DATA.parent / folder / f"{split}.jsonl").read_bytes()
    pairs = [json.loads(x) for x in (SAMPLE_DATA.parent / "tiny-preference" / "train.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_sample_data_has_system_prompts_multi_turn_and_a_long_tail() -> None:
    rows = [json.loads(line) for line in (SAMPLE_DATA / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 400
    assert sum(r["messages"][0]["role"] == "system" for r in rows) > 100
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows) > 50
    lengths = sorted(sum(len(m["content"]) for m in r["messages"]) for r in rows)
    assert lengths[-1] > 8 * lengths[len(lengths) // 2]  # skewed: a few are much longer than the median
