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

from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.prep.packing import best_fit_decreasing, pack_columns
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
        name, blocks = write_chat_shard(self.out_dir, self.split, len(self.names), self.window, self.rows,
                                        documents=self.documents_layout, max_len=self.max_len, pad_id=self.pad_id,
                                        packing=self.packing)
        self.blocks += blocks
        self.names.append(name)
        self.window, self.rows, self.window_tokens = [], [], 0


def window_full(documents_in_window: int, window_tokens: int, *, documents: bool, packing: bool, max_len: int) -> bool:
    """Whether a window of chat documents makes a shard (see the module): the one rule both the
    streamed local prepare and the Ray job's shard planning follow, so both cut the same shards."""
    if documents or not packing:
        return documents_in_window >= (DOCS_PER_SHARD if documents else BLOCKS_PER_SHARD)
    return window_tokens >= BLOCKS_PER_SHARD * max_len


def write_chat_shard(out_dir: Path | Store, split: str, index: int, window: list[tuple[list[int], list[bool]]],
                     rows: list[int], *, documents: bool, max_len: int, pad_id: int, packing: bool) -> tuple[str, int]:
    """Pack (or, for the streaming layout, keep) one window's documents and write shard `index`;
    returns its name relative to the workspace and its block count (what offline packing gives)."""
    import pyarrow as pa

    if documents:
        # Unpacked; the block count is what offline packing would give (the manifest reports it).
        lengths = [len(ids) for ids, _ in window]
        n_blocks = len(best_fit_decreasing(lengths, max_len)) if packing else len(lengths)
        table = pa.table({"input_ids": _list_column((d[0] for d in window), len(window), pa.int32()),
                          "assistant_mask": _list_column((d[1] for d in window), len(window), pa.bool_())})
        name = f"{split}-docs-{index:05d}.parquet"
    else:
        cols = pack_columns(window, max_len, pad_id, enabled=packing, rows=rows)
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


def _list_column(values: Iterable[list], n: int, item: Any) -> Any:
    """A list<item> column of `n` Python lists, built from their values end to end and the offsets
    (what pa.array makes of the lists, without its per-element conversion)."""
    import pyarrow as pa

    lists = list(values)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=n), out=offsets[1:])
    dtype = np.bool_ if item == pa.bool_() else np.int32
    flat = np.fromiter(chain.from_iterable(lists), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=item))


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
        import pyarrow as pa

        types = {"ids": pa.list_(pa.int32()), "mask": pa.list_(pa.bool_()), "text": pa.string()}
        table = pa.table({name: pa.array(column, type=types[self.kinds[name]])
                          for name, column in self.window.items()})
        name = f"{self.prefix}-{len(self.names):05d}.parquet"
        write_table(table, self.out_dir / name)
        self.names.append(f"data/{name}")
        self.window = {name: [] for name in self.kinds}
