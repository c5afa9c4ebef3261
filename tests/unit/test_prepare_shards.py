"""prepare writes a chat split's shards as they fill: it never holds more than one shard's worth of
documents, every document lands in exactly one shard, and the loaders read the shards back."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.prep import shards
from posttrain.prep.prepare import prepare
from posttrain.recipe import load_recipe
from posttrain.training_lib.data.loader import read_blocks, read_documents
from tests.conftest import write_recipe


def test_window_holds_at_most_one_shard(tmp_path: Path) -> None:
    writer = shards.ChatShards(tmp_path, "train", documents=False, max_len=16, pad_id=0, packing=True)
    for n in range(200):
        writer.add(list(range(3 + n % 9)), [False, True] * 6)
        assert writer.window_tokens < shards.BLOCKS_PER_SHARD * 16
    writer.close()
    assert writer.window == [] and len(writer.names) == 1 and writer.documents == 200


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_small_shards_hold_every_document_once(tmp_path: Path, tiny_model: Path, mode: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(write_recipe(tmp_path, data={"packing": {"mode": mode}}))
    whole = prepare(recipe, tmp_path / "whole")["splits"]
    monkeypatch.setattr(shards, "BLOCKS_PER_SHARD", 8)
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", 32)
    split = prepare(recipe, tmp_path / "sharded")["splits"]
    for name in ("train", "eval"):
        assert len(split[name]["shards"]) > 2 and len(whole[name]["shards"]) == 1
        for key in ("rows", "documents", "tokens", "assistant_tokens"):
            assert split[name][key] == whole[name][key], (name, key)
    # Packing per shard fills the blocks nearly as well as packing the split at once.
    assert split["eval"]["blocks"] <= whole["eval"]["blocks"] * 1.1 + len(split["eval"]["shards"])
    blocks = read_blocks(tmp_path / "sharded", "eval")
    assert blocks["input_ids"].shape[0] == split["eval"]["blocks"]
    assert int((blocks["position_ids"] == 0).sum()) >= split["eval"]["documents"]
    if mode == "streaming":
        ids, _ = read_documents(tmp_path / "sharded", "train")
        assert sorted(map(tuple, ids)) == sorted(map(tuple, read_documents(tmp_path / "whole", "train")[0]))


def test_pairs_and_prompts_are_written_a_shard_at_a_time(tokenizer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.prep.formats import prepare_preference, prepare_prompts
    from posttrain.prep.prepare import read_jsonl
    from tests.conftest import REPO

    data = REPO / "dags" / "data"
    pairs = [r for _, r in read_jsonl(str(data / "tiny-preference" / "eval.jsonl"))]
    prompts = [r for _, r in read_jsonl(str(data / "tiny-prompts" / "eval.jsonl"))]

    def run(folder: Path) -> tuple[dict, dict, pa.Table, pa.Table]:
        folder.mkdir()
        a = prepare_preference(tokenizer, pairs, 256, "truncate", folder, "eval")
        b = prepare_prompts(tokenizer, prompts, 256, folder, "eval")
        tables = [pa.concat_tables([pq.read_table(folder / s.removeprefix("data/")) for s in x["shards"]])
                  for x in (a, b)]
        return a, b, *tables

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", 10)
    split = run(tmp_path / "split")
    assert len(split[0]["shards"]) == -(-split[0]["pairs"] // 10) and len(whole[0]["shards"]) == 1
    assert len(split[1]["shards"]) == -(-split[1]["prompts"] // 10) and len(whole[1]["shards"]) == 1
    assert {k: v for k, v in split[0].items() if k != "shards"} == {k: v for k, v in whole[0].items() if k != "shards"}
    assert split[2].equals(whole[2]) and split[3].equals(whole[3])
