"""`data.prepare: ray`: the prepare stage as a Ray Data job on the run's cluster, with the same
output as the local one, byte for byte (manifest and shards), for every data format.

Each split, in three steps:
1. plan: each JSONL file is cut into byte ranges that start at a line (the driver seeks; it reads
   no more than one line per cut);
2. tokenize (Ray Data, a pool of one actor per CPU, each loading the tokenizer once; one range per
   call, in parallel): the lines of a range go through the same functions the local prepare uses:
   chat rows `BATCH_ROWS` at a time through
   `ChatCounts.documents_batch` (chat template, masks, truncation; a batch that fails goes again
   row by row), preference and prompt rows through their format's `record`. A range returns its
   records (chat documents, pairs or prompts), their lengths and source lines, and its counts. A
   row the template refuses is returned as an error with its line, and the driver raises it for the
   first such line of the file, as the local prepare does. Each range carries the tokenizer's facts
   (fingerprint, size, pad and eos ids) too: the driver never loads the tokenizer (seconds of
   imports, serial, before the pool starts), it takes them from the first range (and checks a
   distillation teacher's tokenizer against them before any shard is written);
3. write (one call per output shard to a few writer actors, in parallel; ray_shards.py): as the
   tokenized ranges stream back in file order, the driver cuts their records into the same windows
   the local prepare streams into shards (`window_full`, from the lengths alone) and submits each
   window's write as soon as the window is complete: the writer gathers it from the tokenized
   ranges (Arrow slices, no Python lists), packs it where the layout packs, and writes its Parquet
   shard straight to the workspace, file:// or s3://. With at most a few writes in flight, and Ray Data tokenizing
   ahead only as far as its backpressure allows, the object store holds a bounded part of the split
   at any time, not the whole split.
The manifest is written last, by the driver. Never imports airflow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from itertools import chain, pairwise
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
    check_overlong,
    manifest_for,
    require_teacher_tokenizer,
    row_format,
    split_uris,
    tokenizer_facts,
)
from posttrain.prep.shards import row_column_types
from posttrain.prep.tokenizer import TokenizerMismatch, load_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data.ray_shards import COUNTS, write_split

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
RANGES_PER_CPU = 8


def chunk_size(total_bytes: int, cpus: int) -> int:
    """About `RANGES_PER_CPU` ranges per CPU, within bounds: small enough that the last range to
    finish leaves the other CPUs idle only briefly, and that a window's write starts early; large
    enough that a range's fixed costs (a call, a block) stay small beside its tokenizing."""
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, -(-total_bytes // max(1, RANGES_PER_CPU * cpus))))


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


def tokenize_chat_range(chunk: dict[str, Any], tokenizer: Any, data: dict[str, Any]) -> pa.Table:
    """One byte range's chat documents and counts, as one table row (see the module)."""
    config = DataConfig.model_validate(data)
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


def tokenize_rows_range(chunk: dict[str, Any], tokenizer: Any, fmt: RowFormat) -> pa.Table:
    """One byte range's preference pairs or prompts and counts, as one table row (see the module)."""
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


class TokenizeRanges:
    """Ray Data's callable class: one actor per CPU loads the tokenizer once (a task per range in
    fresh worker processes would load it again and again: seconds of imports each time) and
    tokenizes range after range with `fn`. Each tokenized range carries the tokenizer's facts."""

    def __init__(self, fn: Any, tokenizer_uri: str, **kwargs: Any):
        # The actor holds one CPU; the fast tokenizer's own thread pool would otherwise spread each
        # batch over every core of the node, beside the other actors (as Ray caps OMP_NUM_THREADS
        # for the same reason). A cluster that sets it keeps its own setting.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.fn, self.kwargs = fn, kwargs
        self.tokenizer = load_tokenizer(tokenizer_uri)
        self.facts = tokenizer_facts(self.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """A batch of ranges (usually one) → their tokenized rows."""
        tables = [self.fn(chunk, self.tokenizer, **self.kwargs) for chunk in batch.to_pylist()]
        table = pa.concat_tables(tables)
        for name, value in self.facts.items():
            table = table.append_column(f"tokenizer_{name}", pa.array([value] * len(table), pa.string()
                                                                        if name == "fingerprint" else pa.int64()))
        return table


def facts_of(summary_row: dict) -> dict[str, Any]:
    """The tokenizer's facts a tokenized range carries (TokenizeRanges)."""
    return {name[len("tokenizer_"):]: value for name, value in summary_row.items() if name.startswith("tokenizer_")}


def tokenized_blocks(chunks: list[dict[str, Any]], cpus: int, fn: Any, tokenizer_uri: str,
                     **kwargs: Any) -> Iterator[tuple[Any, list[dict]]]:
    """The ranges tokenized by Ray Data, streamed: (block ref, its summary rows) as each block is
    done, in file order. The records stay in the object store: the driver maps each block (zero
    copy on its own node; one transfer from another node), reads its summary and lets it go. (A
    summary task would be a Ray worker process started for it: the actors hold every CPU, and Ray
    kills idle workers beyond one per CPU within a second, so each summary would pay a process
    start and its imports.) Ray Data tokenizes ahead of the consumer only as far as its
    backpressure lets it, so the tokenized records held at once stay bounded however large the
    file. `cpus`: the tokenize actors, one CPU each."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # windows are cut in file order
    tokenized = (ray.data.from_items(chunks, override_num_blocks=len(chunks))
                 .map_batches(TokenizeRanges, batch_size=1, batch_format="pyarrow", num_cpus=1,
                              compute=ray.data.ActorPoolStrategy(size=min(cpus, len(chunks))),
                              fn_constructor_kwargs={"fn": fn, "tokenizer_uri": tokenizer_uri, **kwargs}))
    for bundle in tokenized.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            yield ref, summary(ray.get(ref))


def summary(table: pa.Table) -> list[dict]:
    """A tokenized table's rows without their records (what the driver needs to plan the shards)."""
    small = [name for name in table.column_names
             if name not in ("doc_lines",) and not pa.types.is_list(table.schema.field(name).type)]
    return table.select([*small, "doc_lens"]).to_pylist()


def prepare_split_on_ray(uri: str, recipe: Recipe, out_dir: Store, split: str, chunk_bytes: int | None,
                         check_facts: Callable[[dict[str, Any]], None]) -> dict:
    """One split, tokenized and written by Ray (see the module); its manifest entry.
    `check_facts(tokenizer facts)` runs once the first range is tokenized, before any shard is
    written."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # a writer and a tokenize actor at least
    source = Store.at(uri)
    chunks = plan_chunks(uri, chunk_bytes or chunk_size(source.fs.size(source.path), cpus))
    if recipe.data.format == "chat":
        fn, kwargs = tokenize_chat_range, {"data": recipe.data.model_dump()}
    else:
        fn, kwargs = tokenize_rows_range, {"fmt": row_format(recipe)}
    blocks = tokenized_blocks(chunks, cpus, fn, tokenizer_uri=recipe.tokenizer_uri, **kwargs)
    first = next(blocks)  # plan_chunks gives every file, even an empty one, a range
    facts = facts_of(first[1][0])
    check_facts(facts)
    return write_split(chain([first], blocks), facts, uri, recipe, out_dir, split, len(chunks), limit=2 * cpus)


def run(recipe: Recipe, workspace_uri: str, chunk_bytes: int | None = None) -> dict:
    """Prepare the recipe's splits into `<workspace>/data` on the cluster this job runs on; returns
    the manifest's split counts."""
    if not ray.is_initialized():
        ray.init()  # the job's cluster (RAY_ADDRESS)
    ray.data.DataContext.get_current().enable_progress_bars = False  # a job log, not a terminal
    out_dir = Store.at(workspace_uri) / "data"
    splits: dict[str, dict] = {}
    facts: dict[str, Any] = {}

    def check_facts(split_facts: dict[str, Any]) -> None:
        if facts and split_facts != facts:  # the tokenizer's files were replaced between the splits
            raise TokenizerMismatch(f"{recipe.tokenizer_uri}: the tokenizer changed while the splits were prepared "
                                    f"({facts['fingerprint']} → {split_facts['fingerprint']})")
        if not facts and recipe.kd is not None:  # refused here, before a model is trained on it
            require_teacher_tokenizer(recipe, split_facts["fingerprint"])
        facts.update(split_facts)

    for name, uri in split_uris(recipe).items():
        stats = prepare_split_on_ray(uri, recipe, out_dir, name, chunk_bytes, check_facts)
        check_overlong(uri, stats, recipe.data)
        splits[name] = stats
    (out_dir / "manifest.json").write_json(manifest_for(recipe, facts, splits))
    return {name: {k: s[k] for k in ("rows", "tokens", "blocks") if k in s} for name, s in splits.items()}
