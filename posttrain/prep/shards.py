"""Writing a chat split's Parquet shards as the documents arrive, so prepare holds one shard's worth
of documents at a time, not the split.

Documents are collected into a window that is packed and written as one shard when it is full:
for packed blocks, when its tokens would fill BLOCKS_PER_SHARD blocks (so a shard holds about that
many, a few more where packing leaves gaps); for the unpacked layout of streaming packing, every
DOCS_PER_SHARD documents. Best-fit decreasing runs inside each window: over a window of a thousand
blocks it fills them as well as over the whole split, and a split smaller than one window is packed
exactly as before (one window).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from posttrain.prep.packing import best_fit_decreasing, flat_documents, offsets_of, pack_flat
from posttrain.storage_fs import Store

BLOCKS_PER_SHARD = 1024
DOCS_PER_SHARD = BLOCKS_PER_SHARD * 16


def write_table(table: Any, target: Path | Store) -> None:
    """One Parquet shard, streamed to its file or object (an object store gets it in parts)."""
    import pyarrow.parquet as pq

    with target.open("wb") as fh:
        pq.write_table(table, fh)


class ChatShards:
    """The shards of one split: `add` each document, then `close`; the counts and `names` (relative
    to the workspace) are what the manifest records."""

    def __init__(self, out_dir: Path | Store, split: str, *, documents: bool, max_len: int, pad_id: int,
                 packing: bool):
        self.out_dir, self.split, self.documents_layout = out_dir, split, documents
        self.max_len, self.pad_id, self.packing = max_len, pad_id, packing
        self.window: list[tuple[list[int], list[bool]]] = []
        self.rows: list[int] = []  # the window's documents' source lines
        self.window_tokens = 0
        self.names: list[str] = []
        self.documents = self.tokens = self.assistant_tokens = self.blocks = 0

    def add(self, ids: list[int], mask: list[bool], row: int = -1) -> None:
        self.window.append((ids, mask))
        self.rows.append(row)
        self.window_tokens += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        self.assistant_tokens += sum(mask[1:])
        if self._full():
            self._flush()

    def close(self) -> None:
        """Write what is left (an empty split still gets one, empty, shard)."""
        if self.window or not self.names:
            self._flush()

    def _full(self) -> bool:
        return window_full(len(self.window), self.window_tokens, documents=self.documents_layout,
                           packing=self.packing, max_len=self.max_len)

    def _flush(self) -> None:
        name, blocks = write_chat_shard(self.out_dir, self.split, len(self.names), *flat_documents(self.window),
                                        np.asarray(self.rows, dtype=np.int32), documents=self.documents_layout,
                                        max_len=self.max_len, pad_id=self.pad_id, packing=self.packing)
        self.blocks += blocks
        self.names.append(name)
        self.window, self.rows, self.window_tokens = [], [], 0


def window_full(documents_in_window: int, window_tokens: int, *, documents: bool, packing: bool, max_len: int) -> bool:
    """Whether a window of chat documents makes a shard (see the module): the one rule both the
    streamed local prepare and the Ray job's shard planning follow, so both cut the same shards."""
    if documents or not packing:
        return documents_in_window >= (DOCS_PER_SHARD if documents else BLOCKS_PER_SHARD)
    return window_tokens >= BLOCKS_PER_SHARD * max_len


def write_chat_shard(out_dir: Path | Store, split: str, index: int, lengths: np.ndarray, ids: np.ndarray,
                     trains: np.ndarray, rows: np.ndarray, *, documents: bool, max_len: int, pad_id: int,
                     packing: bool) -> tuple[str, int]:
    """Pack (or, for the streaming layout, keep) one window's documents, given end to end (see
    flat_documents), and write shard `index`; returns its name relative to the workspace and its
    block count (what offline packing gives). `rows`: each document's source line."""
    import pyarrow as pa

    if documents:
        # Unpacked; the block count is what offline packing would give (the manifest reports it).
        n_blocks = len(best_fit_decreasing(lengths.tolist(), max_len)) if packing else int(lengths.size)
        offsets = pa.array(offsets_of(lengths).astype(np.int32))
        table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
                          "assistant_mask": pa.ListArray.from_arrays(offsets, pa.array(trains, type=pa.bool_()))})
        name = f"{split}-docs-{index:05d}.parquet"
    else:
        cols = pack_flat(lengths, ids, trains, max_len, pad_id, enabled=packing, rows=rows)
        n_blocks = len(cols.block_offsets) - 1
        blocks, docs = pa.array(cols.block_offsets), pa.array(cols.doc_offsets)
        table = pa.table({
            "input_ids": pa.ListArray.from_arrays(blocks, pa.array(cols.input_ids)),
            "labels": pa.ListArray.from_arrays(blocks, pa.array(cols.labels)),
            "position_ids": pa.ListArray.from_arrays(blocks, pa.array(cols.position_ids)),
            "doc_lens": pa.ListArray.from_arrays(docs, pa.array(cols.doc_lens)),
            "doc_rows": pa.ListArray.from_arrays(docs, pa.array(cols.doc_rows)),
        })
        name = f"{split}-{index:05d}.parquet"
    write_table(table, out_dir / name)
    return f"data/{name}", n_blocks


class RowShards:
    """Rows of fixed columns (preference pairs, RL prompts), written DOCS_PER_SHARD at a time as
    `<prefix>-NNNNN.parquet`. Column kinds: "ids" (int32 lists), "mask" (bool lists), "text"."""

    def __init__(self, out_dir: Path | Store, prefix: str, kinds: dict[str, str]):
        self.out_dir, self.prefix, self.kinds = out_dir, prefix, kinds
        self.window: dict[str, list] = {name: [] for name in kinds}
        self.rows = 0
        self.names: list[str] = []

    def add(self, **values: Any) -> None:
        for name, column in self.window.items():
            column.append(values[name])
        self.rows += 1
        if len(next(iter(self.window.values()))) >= DOCS_PER_SHARD:
            self._flush()

    def close(self) -> None:
        """Write what is left (an empty split still gets one, empty, shard)."""
        if any(self.window.values()) or not self.names:
            self._flush()

    def _flush(self) -> None:
        self.names.append(write_row_shard(self.out_dir, self.prefix, len(self.names), self.kinds, self.window))
        self.window = {name: [] for name in self.kinds}


def row_column_types(kinds: dict[str, str]) -> dict[str, Any]:
    import pyarrow as pa

    types = {"ids": pa.list_(pa.int32()), "mask": pa.list_(pa.bool_()), "text": pa.string()}
    return {name: types[kind] for name, kind in kinds.items()}


def write_row_shard(out_dir: Path | Store, prefix: str, index: int, kinds: dict[str, str],
                    columns: dict[str, Any]) -> str:
    """Shard `index` of a row layout from its columns (Python lists or Arrow arrays of the kinds'
    types); returns its name relative to the workspace."""
    import pyarrow as pa

    types = row_column_types(kinds)
    table = pa.table({name: columns[name] if isinstance(columns[name], pa.Array | pa.ChunkedArray)
                      else pa.array(columns[name], type=types[name]) for name in kinds})
    name = f"{prefix}-{index:05d}.parquet"
    write_table(table.combine_chunks(), out_dir / name)
    return f"data/{name}"
