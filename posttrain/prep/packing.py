"""Packing variable-length documents into fixed-size blocks (best-fit decreasing).

A block carries, besides its tokens, shifted labels (label[i] is the target of position i, -100
where nothing trains), position ids that restart at every document, and the document lengths.
Restarting position ids is what the model's attention uses to build its block-diagonal causal
mask, so no token attends across documents.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

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
    # Longest first; a stable sort keeps equal lengths in index order, reverse=True included.
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
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


@dataclass
class PackedColumns:
    """`pack`'s blocks as flat columns, what a Parquet shard is written from without a Python list
    per block: the token columns' values end to end with `block_offsets` (n_blocks + 1) into them,
    and the per-document columns likewise with `doc_offsets`."""
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    block_offsets: np.ndarray
    doc_lens: np.ndarray
    doc_rows: np.ndarray
    doc_offsets: np.ndarray


def flat_documents(docs: Sequence[tuple[Sequence[int], Sequence[bool]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, ids, trains) of the documents, their tokens end to end (int32, bool). A trains mask
    longer than its ids is cut to them, as shifted_labels reads it."""
    lengths = np.fromiter((len(ids) for ids, _ in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in docs), dtype=np.int32, count=total)
    masks: Iterable[Sequence[bool]] = (m for _, m in docs)
    if any(len(m) != len(i) for i, m in docs):
        masks = (m[:len(i)] for i, m in docs)
    trains = np.fromiter(chain.from_iterable(masks), dtype=np.bool_, count=total)
    return lengths, ids, trains


def pack_columns(docs: Sequence[tuple[Sequence[int], Sequence[bool]]], block_size: int, pad_id: int,
                 enabled: bool = True, rows: Sequence[int] | None = None) -> PackedColumns:
    """`pack`, the same blocks value for value, computed on whole arrays (a shard's labels and
    positions built token by token in Python cost more than tokenizing its rows)."""
    return pack_flat(*flat_documents(docs), block_size, pad_id, enabled=enabled, rows=rows)


def pack_flat(lengths: np.ndarray, ids: np.ndarray, trains: np.ndarray, block_size: int, pad_id: int,
              enabled: bool = True, rows: Sequence[int] | np.ndarray | None = None) -> PackedColumns:
    """`pack_columns` of documents given end to end (see flat_documents)."""
    docs = range(lengths.size)
    if lengths.size and lengths.min() == 0:
        raise ValueError("a document without tokens cannot be packed")
    groups = best_fit_decreasing(lengths.tolist(), block_size) if enabled else [[i] for i in range(len(docs))]
    order = np.fromiter(chain.from_iterable(groups), dtype=np.int64, count=len(docs))
    doc_offsets = offsets_of(np.fromiter(map(len, groups), dtype=np.int64, count=len(groups)))
    # Labels in document order: the next token where it trains; a document's last token predicts nothing.
    starts = np.cumsum(lengths) - lengths
    labels = np.full(ids.size, IGNORE, dtype=np.int32)
    labels[:-1] = np.where(trains[1:], ids[1:], IGNORE)
    labels[starts + lengths - 1] = IGNORE
    # The documents in block order, then each block's padding after its last document.
    sizes = lengths[order]
    block_tokens = np.add.reduceat(sizes, doc_offsets[:-1]) if groups else np.zeros(0, dtype=np.int64)
    pad = np.maximum(block_size - block_tokens, 0)
    block_offsets = offsets_of(block_tokens + pad)
    in_order = np.arange(sizes.sum()) + np.repeat(starts[order] - (np.cumsum(sizes) - sizes), sizes)
    block_of_doc = np.repeat(np.arange(len(groups)), np.diff(doc_offsets))
    dest = np.arange(in_order.size) + np.repeat((np.cumsum(pad) - pad)[block_of_doc], sizes)
    out_ids = np.full(block_offsets[-1], pad_id, dtype=np.int32)
    out_labels = np.full(block_offsets[-1], IGNORE, dtype=np.int32)
    out_ids[dest], out_labels[dest] = ids[in_order], labels[in_order]
    # Positions restart at every document and at the padding (a document of its own).
    seg_starts = np.concatenate([dest[offsets_of(sizes)[:-1]], block_offsets[:-1] + block_tokens])
    seg_lens = np.concatenate([sizes, pad])
    by_start = np.argsort(seg_starts, kind="stable")
    seg_starts, seg_lens = seg_starts[by_start], seg_lens[by_start]
    positions = (np.arange(block_offsets[-1]) - np.repeat(seg_starts, seg_lens)).astype(np.int32)
    doc_rows = np.asarray(rows, dtype=np.int32)[order] if rows is not None else np.full(len(docs), -1, np.int32)
    return PackedColumns(out_ids, out_labels, positions, block_offsets.astype(np.int32),
                         sizes.astype(np.int32), doc_rows, doc_offsets.astype(np.int32))


def offsets_of(sizes: np.ndarray) -> np.ndarray:
    """[0, s0, s0 + s1, ...]: where each of consecutive runs of `sizes` starts, and the end."""
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes, dtype=np.int64)])
