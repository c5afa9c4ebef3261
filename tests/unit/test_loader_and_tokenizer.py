"""Offline-packed blocks are dealt to data-parallel ranks without overlap, deterministically and
resumably; a tokenizer other than the one the data was prepared with is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.prep.tokenizer import TokenizerMismatch, require_same_tokenizer, tokenizer_fingerprint
from posttrain.training_lib.data.loader import PackedLoader


def blocks(n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 8)  # block i is full of the value i
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(8).repeat(n, 1)}


def test_ranks_get_disjoint_blocks_each_epoch_and_the_same_number_of_batches() -> None:
    data = blocks(21)
    loaders = [PackedLoader(data, rank, 2, micro_batch_size=2, seed=5) for rank in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 5  # 21 // (2 × 2)
    seen = [{int(v) for _ in range(5) for v in loader.next_batch()["input_ids"][:, 0]} for loader in loaders]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


def test_loader_resumes_where_it_stopped() -> None:
    data = blocks(13)
    straight = PackedLoader(data, 1, 2, 1, seed=0)
    expected = [straight.next_batch()["input_ids"].tolist() for _ in range(15)]
    first = PackedLoader(data, 1, 2, 1, seed=0)
    got = [first.next_batch()["input_ids"].tolist() for _ in range(7)]
    again = PackedLoader(data, 1, 2, 1, seed=0)
    again.load_state_dict(first.state_dict())
    got += [again.next_batch()["input_ids"].tolist() for _ in range(8)]
    assert got == expected


def test_a_different_tokenizer_is_refused(tiny_model: Path, tokenizer, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    manifest = {"tokenizer": {"uri": str(tiny_model), "fingerprint": tokenizer_fingerprint(tokenizer)}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert require_same_tokenizer(str(tiny_model), tmp_path) is not None

    other = tmp_path / "other-tokenizer"
    changed = tokenizer.__class__.from_pretrained(tiny_model)
    changed.chat_template = changed.chat_template.replace("<|im_end|>\n", "<|im_end|>\n\n")
    changed.save_pretrained(other)
    with pytest.raises(TokenizerMismatch, match="was prepared with"):
        require_same_tokenizer(str(other), tmp_path)
