"""Writing the Ray prepare's shards (see ray_prepare): the tokenized ranges, taken in file order,
are cut into the windows the local prepare streams into shards, and each window is written by a
writer actor as soon as it is complete. Never imports airflow."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from posttrain.prep.chat import TemplateError
from posttrain.prep.prepare import ChatCounts, chat_stats, row_format, streaming_layout
from posttrain.prep.shards import window_full, write_chat_shard, write_row_shard
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store

COUNTS = ("rows", "examples", "expanded", "truncated", "dropped", "no_target")  # ChatCounts' fields
CHAT_COLUMNS = ("input_ids", "assistant_mask")


class Writes:
    """The split's shard writes: `write_window` on `limit` writer actors, one window each at a time
    (the driver stops taking ranges while all are busy, so tokenized ranges wait in the object store
    only as long as their windows' writes), or, with `remote=False`, in this process (tests).
    `results()`: each window's (name, blocks) in window order; `close()` stops the writers."""

    def __init__(self, out_uri: str, split: str, layout: dict[str, Any], columns: tuple[str, ...], *,
                 remote: bool = True, limit: int = 4, **extra: Any):
        self.args, self.extra, self.remote = (out_uri, split), extra, remote
        self.layout, self.columns = layout, columns
        self.writers = [ShardWriter.remote() for _ in range(limit)] if remote else []
        self.idle = list(self.writers)
        self.pending: dict[Any, tuple[int, Any]] = {}
        self.done: dict[int, tuple[str, int]] = {}

    def submit(self, index: int, pieces: list[tuple[int, int, int]], first_lines: list[int], table_rows: list[int],
               tables: list[Any]) -> None:
        args = (*self.args, index, self.layout, pieces, self.columns, first_lines, table_rows, *tables)
        if not self.remote:
            self.done[index] = write_window(*args, **self.extra)
            return
        if not self.idle:
            self._wait(1)
        writer = self.idle.pop()
        self.pending[writer.write.remote(*args, **self.extra)] = (index, writer)

    def _wait(self, n: int) -> None:
        ready, _ = ray.wait(list(self.pending), num_returns=n)
        for ref, result in zip(ready, ray.get(ready), strict=True):
            index, writer = self.pending.pop(ref)
            self.done[index] = result
            self.idle.append(writer)

    def results(self) -> list[tuple[str, int]]:
        if self.pending:
            self._wait(len(self.pending))
        return [self.done[i] for i in sorted(self.done)]

    def close(self) -> None:
        for writer in self.writers:
            ray.kill(writer)
        self.writers = self.idle = []


class ShardWindows:
    """Cuts a split's records, range by range in file order, into the windows the local prepare
    streams into shards (`window_full`, from the lengths alone), and submits each window's write as
    soon as it is complete: a list of (range, first record, end record) pieces of consecutive
    records, with the tables holding them. A range that arrives early waits for those before it; a
    range the template refused raises for the first such line of the file, as the local prepare
    does. A split without records gets one empty shard."""

    def __init__(self, uri: str, layout: dict[str, Any], submit: Any):
        self.uri, self.layout, self.submit = uri, layout, submit
        self.summaries: list[dict] = []  # the ranges taken so far, in file order (no records)
        self.early: dict[int, tuple[dict, Any, int]] = {}
        self.first_line = 0
        self.current: list[tuple[dict, Any, int, int, int]] = []  # the open window's pieces
        self.n_docs = self.tokens = self.windows = 0

    def add(self, summary: dict, table: Any, row: int) -> None:
        """A tokenized range: its summary row and where its records are (`table`, `row`)."""
        self.early[summary["index"]] = (summary, table, row)
        while len(self.summaries) in self.early:
            self._take(*self.early.pop(len(self.summaries)))

    def _take(self, s: dict, table: Any, row: int) -> None:
        if s["error"]:
            raise TemplateError(f"{self.uri} line {self.first_line + s['error_line']}: {s['error']}")
        s["first_line"], self.first_line = self.first_line, self.first_line + s["n_lines"]
        self.summaries.append(s)
        lens, start, layout = s["doc_lens"], 0, self.layout
        for d, length in enumerate(lens):
            self.n_docs, self.tokens = self.n_docs + 1, self.tokens + length
            if window_full(self.n_docs, self.tokens, documents=layout["documents"], packing=layout["packing"],
                           max_len=layout["max_len"]):
                self._submit([*self.current, (s, table, row, start, d + 1)])
                self.current, start, self.n_docs, self.tokens = [], d + 1, 0, 0
        if start < len(lens):
            self.current.append((s, table, row, start, len(lens)))
        # The split's totals need the range's counts only: the driver keeps no per-record list.
        s["n_records"], s["record_tokens"] = len(lens), sum(lens)
        del s["doc_lens"]

    def _submit(self, pieces: list[tuple[dict, Any, int, int, int]]) -> None:
        self.submit(self.windows, [(s["index"], a, b) for s, _, _, a, b in pieces],
                    [s["first_line"] for s, *_ in pieces], [row for _, _, row, _, _ in pieces],
                    [table for _, table, _, _, _ in pieces])
        self.windows += 1

    def close(self, n_ranges: int) -> list[dict]:
        """Submit the last window; the ranges' summaries in file order."""
        if self.early or len(self.summaries) != n_ranges:
            raise RuntimeError(f"{self.uri}: {len(self.summaries)} of {n_ranges} byte ranges came back tokenized")
        if self.current or not self.windows:
            self._submit(self.current)
        self.current = []
        return self.summaries


def chat_layout(pad_id: int, recipe: Recipe, split: str) -> dict[str, Any]:
    return {"documents": streaming_layout(recipe, split), "max_len": recipe.data.max_seq_len,
            "pad_id": pad_id, "packing": recipe.data.packing.enabled}


ROWS_LAYOUT = {"documents": True, "max_len": 0, "pad_id": 0, "packing": False}  # windows of records, by count


def write_split(blocks: Iterable[tuple[Any, list[dict]]], facts: dict[str, Any], uri: str, recipe: Recipe,
                out_dir: Store, split: str, n_ranges: int, remote: bool = True, limit: int = 4) -> dict:
    """From the tokenized ranges (`blocks`: each a table, or its Ray object ref, and its `summary`
    rows, in file order) to the written shards and the split's manifest entry. `facts`: the
    tokenizer's (prepare.tokenizer_facts)."""
    if recipe.data.format == "chat":
        layout, columns, extra, fmt = chat_layout(facts["block_pad_id"], recipe, split), CHAT_COLUMNS, {}, None
    else:
        fmt = row_format(recipe)
        layout, columns = ROWS_LAYOUT, tuple(fmt.kinds)
        extra = {"kinds": fmt.kinds, "prefix": f"{split}-{fmt.suffix}"}
    writes = Writes(out_dir.uri, split, layout, columns, remote=remote, limit=limit, **extra)
    try:
        windows = ShardWindows(uri, layout, writes.submit)
        for table, rows in blocks:
            for row_no, summary_row in enumerate(rows):
                windows.add(summary_row, table, row_no)
        summaries, written = windows.close(n_ranges), writes.results()
    finally:
        writes.close()
    names, records = [name for name, _ in written], sum(s["n_records"] for s in summaries)
    if fmt is not None:
        fmt = fmt.fresh()
        for name in fmt.counts:
            fmt.counts[name] = sum(s[name] for s in summaries)
        return fmt.stats(records, names)
    counts = ChatCounts(**{name: sum(s[name] for s in summaries) for name in COUNTS})
    totals = _Totals(documents=records, tokens=sum(s["record_tokens"] for s in summaries),
                     assistant_tokens=sum(s["assistant_tokens"] for s in summaries),
                     blocks=sum(blocks for _, blocks in written), names=names)
    return chat_stats(counts, totals, recipe.data.max_seq_len, layout["documents"])


class _Totals:
    def __init__(self, **values: Any):
        self.__dict__.update(values)


def _gather(pieces: list[tuple[int, int, int]], table_rows: list[int], tables: tuple[Any, ...],
            name: str) -> pa.Array | None:
    """The window's values of one column: its pieces' slices of the ranges' records, end to end
    (None for a window without pieces)."""
    parts = [table[name][row].values.slice(start, end - start)
             for (_, start, end), row, table in zip(pieces, table_rows, tables, strict=True)]
    return pa.concat_arrays(parts) if parts else None


def write_window(out_uri: str, split: str, index: int, layout: dict[str, Any], pieces: list[tuple[int, int, int]],
                 columns: tuple[str, ...], first_lines: list[int], table_rows: list[int], *tables: Any,
                 kinds: dict[str, str] | None = None, prefix: str = "") -> tuple[str, int]:
    """Gather one shard's window from the tokenized ranges and write it: chat documents packed (or
    kept, for the streaming layout), or preference / prompt records as they are."""
    out = Store.at(out_uri)
    if kinds is not None:
        gathered = {name: _gather(pieces, table_rows, tables, name) for name in columns}
        return write_row_shard(out, prefix, index, kinds, {name: values if values is not None else []
                                                           for name, values in gathered.items()}), 0
    lines = [np.asarray(table["doc_lines"][row].values.slice(start, end - start)) + first
             for (_, start, end), first, row, table in zip(pieces, first_lines, table_rows, tables, strict=True)]
    if not pieces:
        empty = np.zeros(0, dtype=np.int64)
        return write_chat_shard(out, split, index, empty, empty.astype(np.int32), empty.astype(np.bool_),
                                empty.astype(np.int32), **layout)
    docs = _gather(pieces, table_rows, tables, "input_ids")
    masks = _gather(pieces, table_rows, tables, "assistant_mask")
    lengths = np.diff(np.asarray(docs.offsets)).astype(np.int64)
    return write_chat_shard(out, split, index, lengths, np.asarray(docs.flatten()),
                            np.asarray(masks.flatten(), dtype=np.bool_), np.concatenate(lines).astype(np.int32),
                            **layout)


# The tokenize actors hold every CPU of the cluster for the whole split: a write asking for a CPU
# would wait for the last range to be tokenized, and the tokenized ranges with it in the object
# store. A write is a small part of a range's work (gather, pack, Parquet) and at most `limit` run
# at once (Writes), so it takes no CPU of its own and borrows a little beside the actors. Actors, not
# tasks: Ray kills idle workers beyond one per CPU within a second, so each write task would start
# a worker process (a second of imports each). SPREAD puts the writers of a multi-node cluster on
# every node, not all on the driver's.
@ray.remote(num_cpus=0, scheduling_strategy="SPREAD")
class ShardWriter:
    def write(self, *args: Any, **kwargs: Any) -> tuple[str, int]:
        return write_window(*args, **kwargs)
