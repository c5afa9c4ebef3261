"""Preference pairs from the prepared Parquet shards, packed per micro-batch without padding.

A micro-batch of k pairs is one row: chosen₀ rejected₀ chosen₁ rejected₁ … back to back, each
sequence with its own position ids restarting at 0, so the per-document attention keeps every
sequence to itself and no compute goes to padding (the row is only rounded up to a multiple of
`pad_to`, the tail being one more, untrained, sequence). Sequence 2i is pair i's chosen side,
2i + 1 its rejected side. The order of the pairs over epochs and ranks is PackedLoader's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.prep.packing import IGNORE, shifted_labels
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import PackedLoader, split_tables

Pair = tuple[list[int], list[bool], list[int], list[bool]]  # chosen ids, mask, rejected ids, mask


def read_pairs(workspace: Store | Path, split: str) -> list[Pair]:
    pairs: list[Pair] = []
    for table in split_tables(workspace, split):
        pairs.extend(zip(*(table.column(c).to_pylist() for c in
                           ("chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask")), strict=True))
    if not pairs:
        raise ValueError(f"{workspace / 'data'}: the prepared {split} split holds no preference pairs")
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int, pad_to: int = 64) -> dict[str, torch.Tensor]:
    """One packed row of the pairs' sequences (see the module doc). `num_sequences` counts the
    padding tail too, so per-sequence sums have a slot for it."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for chosen, chosen_mask, rejected, rejected_mask in pairs:
        for seq, mask in ((chosen, chosen_mask), (rejected, rejected_mask)):
            ids += seq
            labels += shifted_labels(seq, mask)
            positions += range(len(seq))
    num_sequences = 2 * len(pairs)
    tail = -len(ids) % pad_to
    if tail:
        ids += [pad_id] * tail
        labels += [IGNORE] * tail
        positions += range(tail)
        num_sequences += 1
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "num_sequences": torch.tensor(num_sequences)}


class PairLoader(PackedLoader):
    """`micro_batch_size` pairs per batch for this data-parallel rank, resumable by (epoch, batch)."""

    def __init__(self, pairs: list[Pair], rank: int, world_size: int, micro_batch_size: int, seed: int,
                 pad_id: int, pad_to: int = 64, grad_accum: int = 1):
        self.pairs, self.pad_id, self.pad_to = pairs, pad_id, pad_to
        super().__init__({"input_ids": torch.empty(len(pairs), 0)}, rank, world_size, micro_batch_size, seed,
                         grad_accum=grad_accum)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.state.batch >= self.batches_per_epoch:
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        idx = self._epoch_indices(self.state.epoch)[self.state.batch]
        self.state.batch += 1
        return {**collate_pairs([self.pairs[i] for i in idx.tolist()], self.pad_id, self.pad_to), "index": idx}
