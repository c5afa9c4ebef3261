"""`data.prepare: ray`: the prepare stage as a Ray Data job on the run's cluster, with the same
output as the local one, byte for byte (manifest and shards), for every data format.

Each split, in three steps:
1. plan: each JSONL file is cut into byte ranges that start at a line (the driver seeks; it reads
   no more than one line per cut);
2. tokenize (Ray Data, one task per range, in parallel): the lines of a range go through the same
   functions the local prepare uses: chat rows `BATCH_ROWS` at a time through
   `ChatCounts.documents_batch` (chat template, masks, truncation; a batch that fails goes again
   row by row), preference and prompt rows through their format's `record`. A range returns its
   records (chat documents, pairs or prompts), their lengths and source lines, and its counts. A
   row the template refuses is returned as an error with its line, and the driver raises it for the
   first such line of the file, as the local prepare does;
3. write (one Ray task per output shard, in parallel): as the tokenized ranges stream back in file
   order, the driver cuts their records into the same windows the local prepare streams into
   shards (`window_full`, from the lengths alone) and submits each window's write as soon as the
   window is complete: the task gathers it from the tokenized ranges (Arrow slices, no Python
   lists), packs it where the layout packs, and writes its Parquet shard straight to the workspace,
   file:// or s3://. With at most a few writes in flight, and Ray Data tokenizing ahead only as far
   as its backpressure allows, the object store holds a bounded part of the split at any time,
   not the whole split.
The manifest is written last, by the driver. Never imports airflow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from posttrain.data_config import DataConfig
from posttrain.prep.chat import TemplateError
from posttrain.prep.formats import RowFormat
from posttrain.prep.packing import flat_documents, offsets_of
from posttrain.prep.prepare import (
    BATCH_ROWS,
    ChatCounts,
    block_pad_id,
    chat_stats,
    check_overlong,
    load_checked_tokenizer,
    manifest_for,
    row_format,
    split_uris,
    streaming_layout,
)
from posttrain.prep.shards import row_column_types, window_full, write_chat_shard, write_row_shard
from posttrain.prep.tokenizer import load_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
COUNTS = ("rows", "examples", "expanded", "truncated", "dropped", "no_target")
CHAT_COLUMNS = ("input_ids", "assistant_mask")
_TOKENIZERS: dict[str, Any] = {}  # per worker process: a Ray worker runs many tokenize tasks


def chunk_size(total_bytes: int, cpus: int) -> int:
    """About four ranges per CPU (so a slow range doesn't hold the others up), within bounds."""
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, -(-total_bytes // max(1, 4 * cpus))))


def plan_chunks(uri: str, chunk_bytes: int) -> list[dict[str, Any]]:
    """Byte ranges [start, end) of the file at `uri`, each starting at a line."""
    store = Store.at(uri)
    size = store.fs.size(store.path)
    bounds = [0]
    with store.open("rb") as fh:
        while bounds[-1] + chunk_bytes < size:
            fh.seek(bounds[-1] + chunk_bytes - 1)
            fh.readline()  # to the end of the line the cut falls in (the byte before the cut may end one)
            if fh.tell() >= size:
                break
            bounds.append(fh.tell())
    bounds.append(size)
    return [{"index": i, "uri": uri, "start": a, "end": b} for i, (a, b) in enumerate(pairwise(bounds))]


def _tokenizer(uri: str) -> Any:
    # Ray reserves one CPU for a tokenize task; the fast tokenizer's own thread pool would otherwise
    # spread each batch over every core of the node, beside the node's other tasks (as Ray caps
    # OMP_NUM_THREADS for the same reason). A cluster that sets it keeps its own setting.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if uri not in _TOKENIZERS:
        _TOKENIZERS[uri] = load_tokenizer(uri)
    return _TOKENIZERS[uri]


def _range_lines(chunk: dict[str, Any]) -> tuple[int, list[tuple[int, bytes]]]:
    """The range's line count and its non-empty (line number within the range, line) pairs."""
    with Store.at(chunk["uri"]).open("rb") as fh:
        fh.seek(chunk["start"])
        raw = fh.read(chunk["end"] - chunk["start"])
    lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        lines.pop()  # the file's line iteration gives no line after a final newline
    return len(lines), [(lineno, line) for lineno, line in enumerate(lines, 1) if line.strip()]


def _one_row(values: Any, item: Any) -> Any:
    """`values` (an Arrow array or a Python list) as one list<item> value: a range is one row."""
    values = values if isinstance(values, pa.Array) else pa.array(values, type=item)
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def tokenize_chat_range(chunk: dict[str, Any], tokenizer_uri: str, data: dict[str, Any]) -> pa.Table:
    """One byte range's chat documents and counts, as one table row (see the module)."""
    config = DataConfig.model_validate(data)
    tokenizer = _tokenizer(tokenizer_uri)
    n_lines, rows = _range_lines(chunk)
    counts, docs, doc_lines = ChatCounts(), [], []
    error, error_line = "", -1
    for start in range(0, len(rows), BATCH_ROWS):  # rendered and tokenized together, as the local prepare does
        batch = rows[start:start + BATCH_ROWS]
        try:
            per_row = counts.documents_batch(tokenizer, [json.loads(line) for _, line in batch], config)
        except Exception:  # row by row, so the error is the row's own (the counts are untouched)
            per_row = []
            for lineno, line in batch:
                try:
                    per_row.append(counts.documents(tokenizer, json.loads(line), config))
                except TemplateError as exc:
                    error, error_line = str(exc), lineno
                    break
        for (lineno, _), row_docs in zip(batch, per_row, strict=False):  # shorter after a refused row
            docs.extend(row_docs)
            doc_lines.extend([lineno] * len(row_docs))
        if error:
            break
    lengths, ids, trains = flat_documents(docs)
    offsets = pa.array(offsets_of(lengths).astype(np.int32))
    return _range_table(chunk, n_lines, error, error_line, {name: getattr(counts, name) for name in COUNTS},
                        lengths, doc_lines, assistant_tokens=int(trains.sum() - trains[offsets_of(lengths)[:-1]].sum()),
                        input_ids=pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
                        assistant_mask=pa.ListArray.from_arrays(offsets, pa.array(trains, type=pa.bool_())))


def tokenize_rows_range(chunk: dict[str, Any], tokenizer_uri: str, fmt: RowFormat) -> pa.Table:
    """One byte range's preference pairs or prompts and counts, as one table row (see the module)."""
    tokenizer = _tokenizer(tokenizer_uri)
    fmt = fmt.fresh()
    n_lines, rows = _range_lines(chunk)
    columns: dict[str, list] = {name: [] for name in fmt.kinds}
    lengths, lines = [], []
    error, error_line = "", -1
    for lineno, line in rows:
        try:
            record = fmt.record(tokenizer, json.loads(line))
        except TemplateError as exc:
            error, error_line = str(exc), lineno
            break
        if record is not None:
            for name, column in columns.items():
                column.append(record[name])
            lengths.append(1)
            lines.append(lineno)
    types = row_column_types(fmt.kinds)
    return _range_table(chunk, n_lines, error, error_line, fmt.counts, np.asarray(lengths, dtype=np.int64), lines,
                        **{name: pa.array(column, type=types[name]) for name, column in columns.items()})


def _range_table(chunk: dict[str, Any], n_lines: int, error: str, error_line: int, counts: dict[str, int],
                 lengths: np.ndarray, lines: list[int], assistant_tokens: int = 0, **records: Any) -> pa.Table:
    """A tokenized range: its summary (index, lines, error, counts, record lengths and source lines)
    and its records' columns, each one list value."""
    small = {"index": chunk["index"], "n_lines": n_lines, "error": error, "error_line": error_line, **counts,
             "assistant_tokens": assistant_tokens}
    return pa.table({**{name: [value] for name, value in small.items()},
                     "doc_lens": _one_row(pa.array(lengths.astype(np.int32)), pa.int32()),
                     "doc_lines": _one_row(lines, pa.int32()),
                     **{name: _one_row(values, None) for name, values in records.items()}})


def tokenize_batch(batch: pa.Table, fn: Any, **kwargs: Any) -> pa.Table:
    """Ray Data's batch: ranges (usually one) → their tokenized rows."""
    return pa.concat_tables([fn(chunk, **kwargs) for chunk in batch.to_pylist()])


def tokenized_blocks(chunks: list[dict[str, Any]], fn: Any, **kwargs: Any) -> Iterator[tuple[Any, list[dict]]]:
    """The ranges tokenized by Ray Data, streamed: (block ref, its summary rows) as each block is
    done, in file order. The records stay in the object store; the driver fetches the summaries
    only. Ray Data tokenizes ahead of the consumer only as far as its backpressure lets it, so the
    tokenized records held at once stay bounded however large the file."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # windows are cut in file order
    tokenized = (ray.data.from_items(chunks, override_num_blocks=len(chunks))
                 .map_batches(tokenize_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"fn": fn, **kwargs}))
    for bundle in tokenized.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            yield ref, ray.get(_summary.remote(ref))


class Writes:
    """The split's shard writes: `write_window` as Ray tasks, at most `limit` in flight (the driver
    stops taking ranges while they are, so tokenized ranges wait in the object store only as long as
    their windows' writes), or, with `remote=False`, in this process (tests). `results()`: each
    window's (name, blocks) in window order."""

    def __init__(self, out_uri: str, split: str, layout: dict[str, Any], columns: tuple[str, ...], *,
                 remote: bool = True, limit: int = 4, **extra: Any):
        self.args, self.extra, self.remote, self.limit = (out_uri, split), extra, remote, limit
        self.layout, self.columns = layout, columns
        self.pending: dict[Any, int] = {}
        self.done: dict[int, tuple[str, int]] = {}

    def submit(self, index: int, pieces: list[tuple[int, int, int]], first_lines: list[int], table_rows: list[int],
               tables: list[Any]) -> None:
        args = (*self.args, index, self.layout, pieces, self.columns, first_lines, table_rows, *tables)
        if not self.remote:
            self.done[index] = write_window(*args, **self.extra)
            return
        self.pending[_write_window.remote(*args, **self.extra)] = index
        while len(self.pending) > self.limit:
            self._wait(len(self.pending) - self.limit)

    def _wait(self, n: int) -> None:
        ready, _ = ray.wait(list(self.pending), num_returns=n)
        for ref, result in zip(ready, ray.get(ready), strict=True):
            self.done[self.pending.pop(ref)] = result

    def results(self) -> list[tuple[str, int]]:
        if self.pending:
            self._wait(len(self.pending))
        return [self.done[i] for i in sorted(self.done)]


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


def chat_layout(tokenizer: Any, recipe: Recipe, split: str) -> dict[str, Any]:
    return {"documents": streaming_layout(recipe, split), "max_len": recipe.data.max_seq_len,
            "pad_id": block_pad_id(tokenizer), "packing": recipe.data.packing.enabled}


ROWS_LAYOUT = {"documents": True, "max_len": 0, "pad_id": 0, "packing": False}  # windows of records, by count


def write_split(blocks: Iterable[tuple[Any, list[dict]]], tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store,
                split: str, n_ranges: int, remote: bool = True, limit: int = 4) -> dict:
    """From the tokenized ranges (`blocks`: each a table, or its Ray object ref, and its `summary`
    rows, in file order) to the written shards and the split's manifest entry."""
    if recipe.data.format == "chat":
        layout, columns, extra, fmt = chat_layout(tokenizer, recipe, split), CHAT_COLUMNS, {}, None
    else:
        fmt = row_format(recipe)
        layout, columns = ROWS_LAYOUT, tuple(fmt.kinds)
        extra = {"kinds": fmt.kinds, "prefix": f"{split}-{fmt.suffix}"}
    writes = Writes(out_dir.uri, split, layout, columns, remote=remote, limit=limit, **extra)
    windows = ShardWindows(uri, layout, writes.submit)
    for table, rows in blocks:
        for row_no, summary_row in enumerate(rows):
            windows.add(summary_row, table, row_no)
    summaries, written = windows.close(n_ranges), writes.results()
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


def summary(table: pa.Table) -> list[dict]:
    """A tokenized table's rows without their records (what the driver needs to plan the shards)."""
    small = [name for name in table.column_names
             if name not in ("doc_lines",) and not pa.types.is_list(table.schema.field(name).type)]
    return table.select([*small, "doc_lens"]).to_pylist()


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


# A summary is a few columns of a block: it needs no CPU of its own, and waiting for one behind the
# tokenize tasks would hold up the writes the driver submits as the summaries come in.
_summary = ray.remote(num_cpus=0)(summary)
_write_window = ray.remote(write_window)


def prepare_split_on_ray(tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store, split: str,
                         chunk_bytes: int | None = None) -> dict:
    """One split, tokenized and written by Ray tasks (see the module); its manifest entry."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    source = Store.at(uri)
    chunks = plan_chunks(uri, chunk_bytes or chunk_size(source.fs.size(source.path), cpus))
    if recipe.data.format == "chat":
        fn, kwargs = tokenize_chat_range, {"data": recipe.data.model_dump()}
    else:
        fn, kwargs = tokenize_rows_range, {"fmt": row_format(recipe)}
    blocks = tokenized_blocks(chunks, fn, tokenizer_uri=recipe.tokenizer_uri, **kwargs)
    return write_split(blocks, tokenizer, uri, recipe, out_dir, split, len(chunks), limit=2 * cpus)


def run(recipe: Recipe, workspace_uri: str, chunk_bytes: int | None = None) -> dict:
    """Prepare the recipe's splits into `<workspace>/data` on the cluster this job runs on; returns
    the manifest's split counts."""
    if not ray.is_initialized():
        ray.init()  # the job's cluster (RAY_ADDRESS)
    ray.data.DataContext.get_current().enable_progress_bars = False  # a job log, not a terminal
    tokenizer = load_checked_tokenizer(recipe)
    out_dir = Store.at(workspace_uri) / "data"
    splits = {}
    for name, uri in split_uris(recipe).items():
        stats = prepare_split_on_ray(tokenizer, uri, recipe, out_dir, name, chunk_bytes)
        check_overlong(uri, stats, recipe.data)
        splits[name] = stats
    (out_dir / "manifest.json").write_json(manifest_for(recipe, tokenizer, splits))
    return {name: {k: s[k] for k in ("rows", "tokens", "blocks") if k in s} for name, s in splits.items()}
