"""Packing variable-length documents into fixed-size blocks (best-fit decreasing).

A block carries, besides its tokens, shifted labels (label[i] is the target of position i, -100
where nothing trains), position ids that restart at every document, and the document lengths.
Restarting position ids is what the model's attention uses to build its block-diagonal causal
mask, so no token attends across documents.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Block:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)
    doc_rows: list[int] = field(default_factory=list)  # each document's source line (-1: unknown)


def shifted_labels(input_ids: Sequence[int], trains: Sequence[bool]) -> list[int]:
    """label[i] = input_ids[i + 1] where that next token trains; the last position predicts nothing,
    so no label ever points into the next document."""
    return [input_ids[i + 1] if trains[i + 1] else IGNORE for i in range(len(input_ids) - 1)] + [IGNORE]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of `capacity`: longest first, each into the fullest bin it fits.
    Deterministic: ties are broken by index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has length {size} > capacity {capacity}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (remaining - size, b))
    return bins


def pack(docs: Sequence[tuple[Sequence[int], Sequence[bool]]], block_size: int, pad_id: int,
         enabled: bool = True, rows: Sequence[int] | None = None) -> list[Block]:
    """Pack (input_ids, trains_mask) documents, each at most block_size long, into padded blocks.
    `rows`: each document's source line, kept per block so evaluation can score examples one by one."""
    lengths = [len(ids) for ids, _ in docs]
    groups = best_fit_decreasing(lengths, block_size) if enabled else [[i] for i in range(len(docs))]
    blocks = []
    for group in groups:
        block = Block()
        for i in group:
            ids, trains = docs[i]
            block.input_ids.extend(ids)
            block.labels.extend(shifted_labels(ids, trains))
            block.position_ids.extend(range(len(ids)))
            block.doc_lens.append(len(ids))
            block.doc_rows.append(rows[i] if rows is not None else -1)
        pad = block_size - len(block.input_ids)
        if pad:
            # Padding is a document of its own (positions restart) that never trains.
            block.input_ids.extend([pad_id] * pad)
            block.labels.extend([IGNORE] * pad)
            block.position_ids.extend(range(pad))
        blocks.append(block)
    return blocks
