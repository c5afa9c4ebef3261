"""Streaming packing: deterministic, disjoint across data-parallel ranks, and resumable at the
exact next block."""

from __future__ import annotations

import random

from posttrain.training_lib.data.streaming import StreamingLoader, StreamingPacker


def corpus(n: int = 300, seed: int = 0) -> tuple[list[list[int]], list[list[bool]]]:
    rng = random.Random(seed)
    ids, trains = [], []
    for doc in range(n):
        length = min(120, max(4, int(rng.lognormvariate(3, 0.8))))
        ids.append([doc] * length)  # every token names its document
        trains.append([i % 2 == 1 for i in range(length)])
    return ids, trains


def blocks(packer: StreamingPacker, k: int) -> list[list[int]]:
    return [packer.next_block().input_ids for _ in range(k)]


def docs_in(block_ids: list[list[int]], pad: int = -1) -> set[int]:
    return {t for b in block_ids for t in b if t != pad}


def test_same_seed_same_stream_other_seed_other_order() -> None:
    ids, trains = corpus()
    a = blocks(StreamingPacker(ids, trains, 256, -1, seed=3, buffer_docs=40), 30)
    b = blocks(StreamingPacker(ids, trains, 256, -1, seed=3, buffer_docs=40), 30)
    c = blocks(StreamingPacker(ids, trains, 256, -1, seed=4, buffer_docs=40), 30)
    assert a == b and a != c


def test_ranks_share_no_document_and_cover_the_epoch() -> None:
    ids, trains = corpus()
    seen = []
    for rank in range(2):
        packer = StreamingPacker(ids, trains, 256, -1, seed=0, rank=rank, world_size=2, buffer_docs=32)
        epoch_blocks = []
        while packer.epoch == 0:
            epoch_blocks.append(packer.next_block().input_ids)
        seen.append(docs_in(epoch_blocks[:-1]))  # the last one already belongs to epoch 1
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(ids)))


def test_blocks_are_full_size_and_documents_whole() -> None:
    ids, trains = corpus()
    packer = StreamingPacker(ids, trains, 256, -1, seed=0, buffer_docs=64)
    lengths = {d: len(x) for d, x in enumerate(ids)}
    for _ in range(20):
        block = packer.next_block()
        assert len(block.input_ids) == 256
        for doc, n in zip([block.input_ids[sum(block.doc_lens[:i])] for i in range(len(block.doc_lens))],
                          block.doc_lens, strict=True):
            assert lengths[doc] == n


def test_resume_continues_at_the_exact_next_block() -> None:
    ids, trains = corpus()
    straight = StreamingLoader(StreamingPacker(ids, trains, 256, -1, seed=1, rank=1, world_size=2, buffer_docs=25), 2)
    expected = [straight.next_batch()["input_ids"].tolist() for _ in range(40)]

    first = StreamingLoader(StreamingPacker(ids, trains, 256, -1, seed=1, rank=1, world_size=2, buffer_docs=25), 2)
    got = [first.next_batch()["input_ids"].tolist() for _ in range(17)]
    state = first.state_dict()
    resumed = StreamingLoader(StreamingPacker(ids, trains, 256, -1, seed=1, rank=1, world_size=2, buffer_docs=25), 2)
    resumed.load_state_dict(state)
    got += [resumed.next_batch()["input_ids"].tolist() for _ in range(23)]
    assert got == expected  # 40 batches span several buffers and an epoch boundary
