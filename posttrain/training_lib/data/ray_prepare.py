"""`data.prepare: ray`: the prepare stage as a Ray Data job on the run's cluster, with the same
output as the local one, byte for byte (manifest and shards).

Chat data, in three steps:
1. plan: each JSONL file is cut into byte ranges that start at a line (the driver seeks; it reads
   no more than one line per cut);
2. tokenize (Ray Data, one task per range, in parallel): the lines of a range go through the same
   `ChatCounts.documents_batch` the local prepare uses, `BATCH_ROWS` at a time (chat template,
   masks, truncation; a batch that fails goes again row by row); a range returns
   its documents, their lengths and its counts. A row the template refuses is returned as an error
   with its line, and the driver raises it for the first such line of the file, as the local
   prepare does;
3. pack and write (one Ray task per output shard, in parallel): the driver cuts the documents, in
   file order, into the same windows the local prepare streams into shards (`window_full`, from the
   lengths alone), and each task packs its window and writes its Parquet shard (`write_chat_shard`)
   straight to the workspace, file:// or s3://.
The manifest is written last, by the driver. Preference and prompt data are prepared by the local
functions in the job's driver (one process, on the cluster; their rows are not split up yet).
Never imports airflow.
"""

from __future__ import annotations

import json
import logging
from itertools import pairwise
from typing import Any

import ray
import ray.data

from posttrain.data_config import DataConfig
from posttrain.prep.chat import TemplateError
from posttrain.prep.prepare import (
    BATCH_ROWS,
    ChatCounts,
    block_pad_id,
    chat_stats,
    check_overlong,
    load_checked_tokenizer,
    manifest_for,
    prepare_split,
    split_uris,
    streaming_layout,
)
from posttrain.prep.shards import window_full, write_chat_shard
from posttrain.prep.tokenizer import load_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
COUNTS = ("rows", "examples", "expanded", "truncated", "dropped", "no_target")
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
    if uri not in _TOKENIZERS:
        _TOKENIZERS[uri] = load_tokenizer(uri)
    return _TOKENIZERS[uri]


def tokenize_chunk(chunk: dict[str, Any], tokenizer_uri: str, data: dict[str, Any]) -> dict[str, Any]:
    """One byte range's documents and counts (see the module). Lines are numbered within the range."""
    config = DataConfig.model_validate(data)
    tokenizer = _tokenizer(tokenizer_uri)
    with Store.at(chunk["uri"]).open("rb") as fh:
        fh.seek(chunk["start"])
        raw = fh.read(chunk["end"] - chunk["start"])
    lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        lines.pop()  # the file's line iteration gives no line after a final newline
    counts, ids, masks, doc_lines = ChatCounts(), [], [], []
    error, error_line = "", -1
    rows = [(lineno, line) for lineno, line in enumerate(lines, 1) if line.strip()]
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
        for (lineno, _), docs in zip(batch, per_row, strict=False):  # shorter after a refused row
            for doc_ids, mask in docs:
                ids.append(doc_ids)
                masks.append(mask)
                doc_lines.append(lineno)
        if error:
            break
    return {"index": chunk["index"], "n_lines": len(lines), "error": error, "error_line": error_line,
            **{name: getattr(counts, name) for name in COUNTS},
            "doc_lens": [len(d) for d in ids], "doc_lines": doc_lines,
            "assistant_tokens": sum(sum(m[1:]) for m in masks), "input_ids": ids, "assistant_mask": masks}


def tokenize_batch(batch: Any, tokenizer_uri: str, data: dict[str, Any]) -> Any:
    import pyarrow as pa

    out = [tokenize_chunk(chunk, tokenizer_uri, data) for chunk in batch.to_pylist()]
    ints, bools = pa.list_(pa.int32()), pa.list_(pa.bool_())
    types = {"doc_lens": ints, "doc_lines": ints, "input_ids": pa.list_(ints), "assistant_mask": pa.list_(bools)}
    return pa.table({name: pa.array([o[name] for o in out], type=types.get(name)) for name in out[0]})


def prepare_chat_split(tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store, split: str,
                       chunk_bytes: int | None = None) -> dict:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    source = Store.at(uri)
    chunks = plan_chunks(uri, chunk_bytes or chunk_size(source.fs.size(source.path), cpus))
    tokenized = (ray.data.from_items(chunks, override_num_blocks=len(chunks))
                 .map_batches(tokenize_batch, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"tokenizer_uri": recipe.tokenizer_uri, "data": recipe.data.model_dump()})
                 .materialize())
    refs = tokenized.to_arrow_refs()
    # The driver takes the small columns only; the documents stay in the object store.
    small = ray.get([_summary.remote(ref) for ref in refs])
    return write_chat_split(tokenizer, uri, recipe, out_dir, split, refs, small,
                            write=lambda *args: _write_window.remote(*args), gather=ray.get)


def write_chat_split(tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store, split: str, tables: list[Any],
                     small: list[list[dict]], write: Any, gather: Any) -> dict:
    """From the tokenized ranges (`tables`, as Ray object refs, and their `summary` rows) to the
    written shards and the split's manifest entry. `write` runs `write_window` (as a Ray task) and
    `gather` waits for what it returns."""
    data = recipe.data
    where: dict[int, tuple[int, int]] = {}  # range index → (table, row); Ray Data may put several in a table
    summaries: dict[int, dict] = {}
    for pos, rows in enumerate(small):
        for row_no, row in enumerate(rows):
            where[row["index"]], summaries[row["index"]] = (pos, row_no), row
    counts, first_line = ChatCounts(), 0
    for i in range(len(summaries)):
        s = summaries[i]
        if s["error"]:  # the first row of the file the template refuses, as the local prepare names it
            raise TemplateError(f"{uri} line {first_line + s['error_line']}: {s['error']}")
        for name in COUNTS:
            setattr(counts, name, getattr(counts, name) + s[name])
        s["first_line"] = first_line
        first_line += s["n_lines"]
    streaming = streaming_layout(recipe, split)
    layout = {"documents": streaming, "max_len": data.max_seq_len, "pad_id": block_pad_id(tokenizer),
              "packing": data.packing.enabled}
    windows = plan_windows([summaries[i]["doc_lens"] for i in range(len(summaries))], layout)
    written = gather([write(out_dir.uri, split, index, layout, pieces,
                            [summaries[c]["first_line"] for c, _, _ in pieces], [where[c][1] for c, _, _ in pieces],
                            *[tables[where[c][0]] for c, _, _ in pieces])
                      for index, pieces in enumerate(windows)])
    totals = _Totals(documents=sum(len(s["doc_lens"]) for s in summaries.values()),
                     tokens=sum(sum(s["doc_lens"]) for s in summaries.values()),
                     assistant_tokens=sum(s["assistant_tokens"] for s in summaries.values()),
                     blocks=sum(blocks for _, blocks in written), names=[name for name, _ in written])
    return chat_stats(counts, totals, data.max_seq_len, streaming)


class _Totals:
    def __init__(self, **values: Any):
        self.__dict__.update(values)


def plan_windows(doc_lens: list[list[int]], layout: dict[str, Any]) -> list[list[tuple[int, int, int]]]:
    """The shards' windows, as the local prepare cuts them: each a list of (chunk, first doc, end doc)
    pieces of consecutive documents in file order. A split without documents gets one empty shard."""
    windows: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    n_docs = tokens = 0
    for chunk, lens in enumerate(doc_lens):
        start = 0
        for d, length in enumerate(lens):
            n_docs, tokens = n_docs + 1, tokens + length
            if window_full(n_docs, tokens, documents=layout["documents"], packing=layout["packing"],
                           max_len=layout["max_len"]):
                windows.append([*current, (chunk, start, d + 1)])
                current, start, n_docs, tokens = [], d + 1, 0, 0
        if start < len(lens):
            current.append((chunk, start, len(lens)))
    if current or not windows:
        windows.append(current)
    return windows


def summary(table: Any) -> list[dict]:
    """A tokenized table's rows without their documents (what the driver needs to plan the shards)."""
    return table.drop_columns(["input_ids", "assistant_mask"]).to_pylist()


def write_window(out_uri: str, split: str, index: int, layout: dict[str, Any], pieces: list[tuple[int, int, int]],
                  first_lines: list[int], table_rows: list[int], *tables: Any) -> tuple[str, int]:
    """Pack one shard's window (its documents gathered from the tokenized ranges) and write it."""
    window, rows = [], []
    for (_, start, end), first, row, table in zip(pieces, first_lines, table_rows, tables, strict=True):
        ids = table["input_ids"][row].values.slice(start, end - start).to_pylist()
        masks = table["assistant_mask"][row].values.slice(start, end - start).to_pylist()
        lines = table["doc_lines"][row].values.slice(start, end - start).to_pylist()
        window.extend(zip(ids, masks, strict=True))
        rows.extend(first + line for line in lines)
    return write_chat_shard(Store.at(out_uri), split, index, window, rows, **layout)


_summary = ray.remote(summary)
_write_window = ray.remote(write_window)


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
        if recipe.data.format == "chat":
            stats = prepare_chat_split(tokenizer, uri, recipe, out_dir, name, chunk_bytes)
            check_overlong(uri, stats, recipe.data)
        else:
            log.warning("data.format %s: %s is prepared in the job's driver process (not split up yet)",
                        recipe.data.format, uri)
            stats = prepare_split(tokenizer, uri, recipe, out_dir, name)
        splits[name] = stats
    (out_dir / "manifest.json").write_json(manifest_for(recipe, tokenizer, splits))
    return {name: {k: s[k] for k in ("rows", "tokens", "blocks") if k in s} for name, s in splits.items()}
