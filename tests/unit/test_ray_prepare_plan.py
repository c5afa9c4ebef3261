"""The Ray prepare's planning, without Ray: byte ranges that start at lines, and shards cut, packed
and written from tokenized ranges exactly as the local prepare streams them (same bytes), with many
ranges and many shards. The Ray job itself: tests/integration/test_ray_jobs.py."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from posttrain.prep import shards
from posttrain.prep.chat import TemplateError
from posttrain.prep.prepare import prepare, row_format, tokenizer_facts
from posttrain.recipe import load_recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data import ray_prepare, ray_shards
from tests.conftest import write_recipe


def test_ranges_start_at_lines_and_cover_the_file(tmp_path: Path) -> None:
    lines = [b'{"n": %d}' % i + b" " * (i % 7) for i in range(300)] + [b"", b'{"last": 1}']
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b"\n".join(lines))  # no final newline
    raw = source.read_bytes()
    chunks = ray_prepare.plan_chunks(str(source), 97)
    assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) > 20
    assert chunks[0]["start"] == 0 and chunks[-1]["end"] == len(raw)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a["end"] == b["start"] and raw[b["start"] - 1:b["start"]] == b"\n"
    # A range larger than the file: one range.
    assert ray_prepare.plan_chunks(str(source), 1 << 20) == [{"index": 0, "uri": str(source), "start": 0,
                                                               "end": len(raw)}]


def ray_free(recipe, uri: str, out: Path, split: str, chunk_bytes: int, order=None) -> dict:
    """prepare_split_on_ray's steps, each as the Ray actor or task would run it, in this process.
    `order`: the order the tokenized ranges arrive in (default: file order)."""
    chunks = ray_prepare.plan_chunks(uri, chunk_bytes)
    if recipe.data.format == "chat":
        fn, kwargs = ray_prepare.tokenize_chat_range, {"data": recipe.data.model_dump()}
    else:
        fn, kwargs = ray_prepare.tokenize_rows_range, {"fmt": row_format(recipe)}
    actor = ray_prepare.TokenizeRanges(fn, recipe.tokenizer_uri, **kwargs)
    tables = [actor(pa.Table.from_pylist([chunk])) for chunk in chunks]
    blocks = [(tables[i], ray_prepare.summary(tables[i])) for i in (order or range(len(tables)))]
    facts = ray_prepare.facts_of(blocks[0][1][0])  # what the driver takes from the first range to arrive
    assert facts == tokenizer_facts(ray_prepare.load_tokenizer(recipe.tokenizer_uri))
    return ray_shards.write_split(blocks, facts, uri, recipe, Store.at(out) / "data", split, len(chunks),
                                   remote=False)


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_many_ranges_and_shards_give_the_local_bytes(tmp_path: Path, tiny_model: Path, mode: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "BLOCKS_PER_SHARD", 8)
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", 32)
    recipe = load_recipe(write_recipe(tmp_path, data={"packing": {"mode": mode}}))
    manifest = prepare(recipe, tmp_path / "local")
    for split, uri in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        stats = ray_free(recipe, uri, tmp_path / "ray", split, chunk_bytes=3000)
        assert json.dumps(stats) == json.dumps(manifest["splits"][split])
        # Ranges that come back out of order are cut into the same windows.
        n = len(ray_prepare.plan_chunks(uri, 3000))
        shuffled = ray_free(recipe, uri, tmp_path / "shuffled", split, chunk_bytes=3000,
                            order=[*range(1, n, 2), *range(0, n, 2)])
        assert json.dumps(shuffled) == json.dumps(stats)
        assert len(stats["shards"]) > 2
        for name in stats["shards"]:
            for ray_side in ("ray", "shuffled"):
                assert filecmp.cmp(tmp_path / "local" / name, tmp_path / ray_side / name, shallow=False), name


def test_a_refused_row_is_named_by_its_line_in_the_file(tmp_path: Path, tokenizer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.prep.prepare import prepare_chat
    from tests.unit.test_chat_masks import _family, tokenizer_for

    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [json.dumps(plain)] * 40
    rows[33] = json.dumps({"messages": [{"role": "system", "content": "s"}, *plain["messages"]]})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    recipe = load_recipe(write_recipe(tmp_path, data={"train": str(data), "eval": str(data)}))
    gemma2 = tokenizer_for(tokenizer, _family("gemma2"))  # refuses a system turn
    monkeypatch.setattr(ray_prepare, "load_tokenizer", lambda uri: gemma2)  # what each actor loads
    with pytest.raises(TemplateError) as local:
        prepare_chat(gemma2, str(data), recipe, tmp_path / "local", "train")
    with pytest.raises(TemplateError) as on_ray:
        ray_free(recipe, str(data), tmp_path / "ray", "train", chunk_bytes=500)
    assert f"{data} line 34: " in str(on_ray.value) and str(on_ray.value) == str(local.value)


ROW_FORMATS = {"preference": {"paradigm": "dpo", "data": "tiny-preference"},
               "prompt": {"paradigm": "grpo", "grpo": {"rewards": [{"name": "exact_match"}]}, "data": "tiny-prompts"}}


def row_recipe(tmp_path: Path, data_format: str, **data: Any):
    from tests.conftest import REPO

    spec = dict(ROW_FORMATS[data_format])
    folder = REPO / "dags" / "data" / spec.pop("data")
    data = {"format": data_format, "train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), **data}
    return load_recipe(write_recipe(tmp_path, data=data, **spec))


@pytest.mark.parametrize("data_format", ["preference", "prompt"])
def test_pairs_and_prompts_from_many_ranges_give_the_local_bytes(tmp_path: Path, tiny_model: Path, data_format: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Preference pairs and RL prompts are tokenized range by range in parallel too: many ranges
    and shards (a shard boundary inside a range and across ranges), same shards and manifest entry."""
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", 37)
    # max_seq_len small enough that some rows are truncated or dropped: the counts add up across ranges.
    recipe = row_recipe(tmp_path, data_format, max_seq_len=48 if data_format == "preference" else 40,
                        validation={"max_overlong_fraction": 1.0})
    manifest = prepare(recipe, tmp_path / "local")
    for split, uri in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        stats = ray_free(recipe, uri, tmp_path / "ray", split, chunk_bytes=2500)
        assert json.dumps(stats) == json.dumps(manifest["splits"][split])
        assert stats["dropped_overlong"] + stats.get("truncated", 0) > 0
        assert len(stats["shards"]) > (2 if split == "train" else 1)
        for name in stats["shards"]:
            assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "ray" / name, shallow=False), name


@pytest.mark.parametrize("data_format", ["preference", "prompt"])
def test_a_refused_pair_or_prompt_is_named_by_its_line_in_the_file(tmp_path: Path, tokenizer, data_format: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_chat_masks import _family, tokenizer_for

    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    reply = [{"role": "assistant", "content": "4"}]
    rows = [{"prompt": prompt, "chosen": reply, "rejected": reply, "answer": "4"}] * 60
    rows[47] = {**rows[0], "prompt": [{"role": "system", "content": "Be brief."}, *prompt]}
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = row_recipe(tmp_path, data_format, train=str(data), eval=str(data))
    gemma2 = tokenizer_for(tokenizer, _family("gemma2"))  # refuses a system turn
    monkeypatch.setattr(ray_prepare, "load_tokenizer", lambda uri: gemma2)
    with pytest.raises(TemplateError) as on_ray:
        ray_free(recipe, str(data), tmp_path / "ray", "train", chunk_bytes=800)
    assert f"{data} line 48: " in str(on_ray.value) and "System role not supported" in str(on_ray.value)


def test_each_window_is_written_once_its_ranges_are_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver streams: a window's write is submitted as soon as the ranges it takes records from
    have arrived, not after the whole split (so tokenized ranges are released as the split goes)."""
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", 25)
    submitted: list[tuple[int, list, int]] = []
    arrived = 0

    def submit(index: int, pieces: list, first_lines: list, rows: list, tables: list) -> None:
        assert all(c < arrived for c, _, _ in pieces), "a window was cut before its ranges arrived"
        submitted.append((index, pieces, arrived))

    layout = {"documents": True, "max_len": 0, "pad_id": 0, "packing": False}
    windows = ray_shards.ShardWindows("rows.jsonl", layout, submit)
    per_range = 10
    for i in range(12):
        arrived = i + 1
        windows.add({"index": i, "n_lines": per_range, "error": "", "error_line": -1, "doc_lens": [1] * per_range},
                    table=f"table-{i}", row=0)
    windows.close(12)
    # 25 records a window, 10 a range: windows 0-3 are full and each goes as soon as the range
    # holding its last record arrives (ranges 3, 5, 8, 10); the last 20 records go at close.
    assert [(index, when) for index, _, when in submitted] == [(0, 3), (1, 5), (2, 8), (3, 10), (4, 12)]
    assert [sum(b - a for _, a, b in pieces) for _, pieces, _ in submitted] == [25, 25, 25, 25, 20]
