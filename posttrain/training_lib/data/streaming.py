"""Streaming packing: blocks are packed on the fly from a shuffled stream of documents.

Each epoch the documents are shuffled (a pure function of seed and epoch) and dealt to the
data-parallel ranks round-robin, so no two ranks see the same document. A rank reads its share
into a bounded buffer of `buffer_docs` documents, packs the buffer best-fit-decreasing, and hands
out its blocks; then the next buffer. The stream cycles through epochs without end, so every rank
always has a next block and no rank waits in a collective for another.

The position in the stream is (epoch, where the current buffer starts, blocks already handed out
from it); packing is deterministic, so a resume re-reads that buffer, packs it again and continues
at the exact next block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.prep.packing import Block, pack
from posttrain.training_lib.seeding import derive_seed


class StreamingPacker:
    def __init__(self, input_ids: Sequence[Sequence[int]], trains: Sequence[Sequence[bool]], block_size: int,
                 pad_id: int, seed: int, rank: int = 0, world_size: int = 1, buffer_docs: int = 512):
        if not input_ids:
            raise ValueError("the stream holds no documents")
        self.input_ids, self.trains = input_ids, trains
        self.block_size, self.pad_id, self.seed = block_size, pad_id, seed
        self.rank, self.world_size, self.buffer_docs = rank, world_size, buffer_docs
        self.epoch, self.buffer_start, self.emitted = 0, 0, 0
        self._blocks: list[Block] | None = None
        self._next_start = 0

    def _rank_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(len(self.input_ids), generator=g)[self.rank::self.world_size].tolist()

    def _fill(self) -> None:
        order = self._rank_order(self.epoch)
        if self.buffer_start >= len(order):
            self.epoch, self.buffer_start = self.epoch + 1, 0
            order = self._rank_order(self.epoch)
        chosen = order[self.buffer_start:self.buffer_start + self.buffer_docs]
        self._next_start = self.buffer_start + len(chosen)
        self._blocks = pack([(self.input_ids[i], self.trains[i]) for i in chosen], self.block_size, self.pad_id)

    def next_block(self) -> Block:
        if self._blocks is None:
            self._fill()
        while self.emitted >= len(self._blocks):
            self.buffer_start, self.emitted = self._next_start, 0
            self._fill()
        block = self._blocks[self.emitted]
        self.emitted += 1
        return block

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "buffer_start": self.buffer_start, "emitted": self.emitted}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.buffer_start, self.emitted = state["epoch"], state["buffer_start"], state["emitted"]
        self._blocks = None  # packed again from buffer_start on the next call


class StreamingLoader:
    """Micro-batches of streamed blocks, as tensors (the same shape PackedLoader gives)."""

    def __init__(self, packer: StreamingPacker, micro_batch_size: int):
        self.packer, self.mbs = packer, micro_batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        blocks = [self.packer.next_block() for _ in range(self.mbs)]
        return {k: torch.tensor([getattr(b, k) for b in blocks], dtype=torch.long)
                for k in ("input_ids", "labels", "position_ids")}

    def state_dict(self) -> dict[str, int]:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.packer.load_state_dict(state)
