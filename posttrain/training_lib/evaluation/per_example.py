"""eval/per_example.parquet: one row per eval example, what each metric measured on it and the
generation where there is one, so promotion can compare two models example by example.

`example_id` is stable across runs for the same eval file (posttrain.promotion_stats.example_id:
line and a hash of the row); the file's metadata carries the eval set's and the tokenizer's
fingerprints, which promotion checks before pairing."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posttrain.prep.prepare import read_jsonl
from posttrain.promotion_stats import ID, example_id
from posttrain.storage_fs import Store, workspace_store

NAME = "per_example.parquet"


def ids_by_line(eval_uri: str) -> dict[int, str]:
    """line → example id for every row of the eval file."""
    return {line: example_id(line, row) for line, row in read_jsonl(eval_uri)}


def content_ids(rows: Iterable[Any]) -> list[str]:
    """Ids for prepared rows that no longer know their line (pairs, prompts): their position in
    the prepared split and a hash of their content; stable for the same file and preparation."""
    return [example_id(i, row) for i, row in enumerate(rows)]


def fingerprint(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def write(out_dir: Store | Path, by_key: Mapping[Any, Mapping[str, Any]], ids: Mapping[Any, str],
          metadata: Mapping[str, Any]) -> Store:
    """Rows of `by_key` (line or index → {column: value}) under their example id, in key order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(k for k in by_key if k in ids)
    columns = sorted({c for k in keys for c in by_key[k]})
    data = {ID: [ids[k] for k in keys], **{c: [by_key[k].get(c) for k in keys] for c in columns}}
    table = pa.table(data).replace_schema_metadata({"posttrain": json.dumps(dict(metadata))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    target = workspace_store(out_dir) / NAME
    target.write_bytes(buffer.getvalue())  # one object: a reader sees the whole table or none
    return target
