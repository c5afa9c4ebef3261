"""Packing: blocks are full, every document lands exactly once, and no token attends to or
predicts across a document boundary."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.prep.packing import IGNORE, best_fit_decreasing, pack, pack_columns, shifted_labels


def test_best_fit_decreasing_places_every_item_once_within_capacity() -> None:
    rng = random.Random(0)
    lengths = [min(512, max(8, int(rng.lognormvariate(4, 1)))) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    fill = sum(lengths) / (len(bins) * 512)
    assert fill > 0.95, fill
    assert bins == best_fit_decreasing(lengths, 512)  # deterministic


def test_item_longer_than_capacity_is_an_error() -> None:
    with pytest.raises(ValueError, match="length 9 > capacity 8"):
        best_fit_decreasing([3, 9], 8)


def test_blocks_restart_positions_and_labels_stay_inside_documents() -> None:
    docs = [([10, 11, 12, 13], [False, False, True, True]), ([20, 21, 22], [False, True, True]),
            ([30, 31], [False, True])]
    [block] = pack(docs, block_size=12, pad_id=0)
    assert block.doc_lens == [4, 3, 2]
    assert block.input_ids == [10, 11, 12, 13, 20, 21, 22, 30, 31, 0, 0, 0]
    assert block.position_ids == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    # label i is the target of position i; the last token of a document predicts nothing.
    assert block.labels == [IGNORE, 12, 13, IGNORE, 21, 22, IGNORE, 31, IGNORE, IGNORE, IGNORE, IGNORE]
    assert shifted_labels([1, 2], [True, True]) == [2, IGNORE]


@pytest.mark.parametrize("enabled", [True, False])
def test_packed_columns_are_the_blocks_value_for_value(enabled: bool) -> None:
    # The shards are written from pack_columns; the blocks it describes must be pack's, exactly.
    rng = random.Random(1)
    docs = []
    for _ in range(300):
        n = rng.choice([1, 2, rng.randrange(1, 64), 64])
        docs.append(([rng.randrange(5000) for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]))
    rows = [rng.randrange(1000) for _ in docs]
    for with_rows in (rows, None):
        blocks = pack(docs, block_size=64, pad_id=3, enabled=enabled, rows=with_rows)
        cols = pack_columns(docs, block_size=64, pad_id=3, enabled=enabled, rows=with_rows)
        tok, doc = cols.block_offsets.tolist(), cols.doc_offsets.tolist()
        assert len(tok) == len(doc) == len(blocks) + 1
        for b, block in enumerate(blocks):
            for name in ("input_ids", "labels", "position_ids"):
                assert getattr(cols, name)[tok[b]:tok[b + 1]].tolist() == getattr(block, name), (b, name)
            for name in ("doc_lens", "doc_rows"):
                assert getattr(cols, name)[doc[b]:doc[b + 1]].tolist() == getattr(block, name), (b, name)
    empty = pack_columns([], block_size=64, pad_id=3, enabled=enabled)
    assert empty.block_offsets.tolist() == [0] and empty.input_ids.size == 0


@pytest.mark.parametrize("backend", ["posttrain_docs", "sdpa"])
def test_packed_loss_equals_documents_run_one_by_one(tiny_model, backend: str) -> None:
    """The document mask is real: the loss of a packed block equals the token-weighted sum of
    the losses of its documents run alone (float32, 1e-5), for our per-document attention and for
    transformers' block-diagonal SDPA mask."""
    from transformers import AutoModelForCausalLM

    from posttrain.training_lib.losses.cross_entropy import summed_cross_entropy
    from posttrain.training_lib.models.attention import packed_forward, register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=backend).eval()
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in (37, 64, 19, 80):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        docs.append((ids, [i % 3 != 0 for i in range(n)]))
    [block] = pack(docs, block_size=256, pad_id=0)
    as_tensors = {k: torch.tensor([getattr(block, k)]) for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        packed = summed_cross_entropy(packed_forward(model, as_tensors), as_tensors["labels"])
        separate = torch.zeros(())
        for ids, trains in docs:
            single = {"input_ids": torch.tensor([ids]), "position_ids": torch.arange(len(ids))[None],
                      "labels": torch.tensor([shifted_labels(ids, trains)])}
            separate += summed_cross_entropy(packed_forward(model, single), single["labels"])
    n_targets = int((as_tensors["labels"] != IGNORE).sum())
    assert abs(packed.item() - separate.item()) / n_targets < 1e-5


def test_backend_that_cannot_isolate_documents_is_an_error(tiny_model) -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    from posttrain.training_lib.models.attention import DocumentMaskError, document_attention, packed_forward

    # Same kernel under another name: nothing vouches that it respects document boundaries.
    AttentionInterface.register("unvetted", document_attention)
    AttentionMaskInterface.register("unvetted", lambda *a, **k: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="unvetted")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 0]])}
    with pytest.raises(DocumentMaskError, match="cannot keep packed documents apart"):
        packed_forward(model, batch)
