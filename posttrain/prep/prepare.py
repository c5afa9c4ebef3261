"""The prepare stage: raw JSONL → tokenized, masked (and for chat, packed) Parquet shards + manifest.json.

Runs wherever the Airflow task runs (no GPU needed) and writes under `<workspace>/data/`, a local
folder or an object store (see storage_fs.Store). The rows are streamed in and a chat split's shards
written as they fill (prep/shards.py: memory holds one shard's documents); the manifest is written
last, as one object, so a reader that finds it finds every shard it names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

from posttrain.data_config import DataConfig
from posttrain.prep.chat import TemplateError, Tokenized, chat_examples, chat_examples_batch, fold_system_prompt
from posttrain.prep.formats import PreferenceRows, PromptRows, RowFormat, prepare_rows
from posttrain.prep.shards import ChatShards
from posttrain.prep.tokenizer import ModelFs, TokenizerMismatch, load_tokenizer, tokenizer_fingerprint
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store

Opener = Callable[[str], AbstractContextManager[IO[bytes]]]
Document = tuple[list[int], list[bool]]  # a training document: token ids and which of them train


def read_jsonl(uri: str, open_binary: Opener | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-empty line, streamed from any fsspec URL (or `open_binary`,
    which the Airflow task gives to reach storage through its connection)."""
    opener = open_binary or (lambda u: fsspec.open(u, "rb"))
    with opener(uri) as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield lineno, json.loads(raw)


class Rows:
    """The rows of a JSONL file (see read_jsonl), remembering the line of the current one, so that a
    row the chat template refuses is named by file and line (`at_row`)."""

    def __init__(self, uri: str, open_binary: Opener | None = None):
        self.uri, self.open_binary, self.lineno = uri, open_binary, 0

    def __iter__(self) -> Iterator[dict]:
        for lineno, row in read_jsonl(self.uri, self.open_binary):
            self.lineno = lineno
            yield row

    def batches(self, size: int) -> Iterator[list[tuple[int, dict]]]:
        """(line number, row) pairs, `size` at a time (the last batch may be shorter)."""
        batch: list[tuple[int, dict]] = []
        for lineno, row in read_jsonl(self.uri, self.open_binary):
            batch.append((lineno, row))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    @contextmanager
    def at_row(self) -> Iterator[None]:
        try:
            yield
        except TemplateError as exc:
            raise TemplateError(f"{self.uri} line {self.lineno}: {exc}") from exc


def block_pad_id(tokenizer: Any) -> int:
    """The id that fills the end of a block (it never trains and no document attends to it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class OverlongData(ValueError):
    pass


def check_overlong(uri: str, stats: dict, data: DataConfig) -> None:
    overlong = stats.get("truncated", 0) + stats["dropped_overlong"]
    examples = stats.get("examples", stats["rows"])  # a chat row can give several examples (see chat_examples)
    if examples and overlong / examples > data.validation.max_overlong_fraction:
        raise OverlongData(
            f"{uri}: {overlong} of {examples} {'rows' if examples == stats['rows'] else 'examples'} "
            f"({overlong / examples:.1%}) are longer than "
            f"data.max_seq_len {data.max_seq_len}, more than data.validation.max_overlong_fraction "
            f"{data.validation.max_overlong_fraction:.1%}: raise max_seq_len or the fraction, or filter the data")


def row_format(recipe: Recipe) -> RowFormat:
    """The preference or prompt format of the recipe's data, as its settings make it."""
    data = recipe.data
    if data.format == "preference":
        return PreferenceRows(data.max_seq_len, data.packing.overlong, data.fold_system_prompt)
    # A prompt must leave room for the completions RL samples (max_seq_len bounds the prompt).
    return PromptRows(data.max_seq_len, min_new_tokens=1 if recipe.grpo is None else 0,
                      fold_system=data.fold_system_prompt)


def prepare_split(tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store, split: str,
                  open_binary: Opener | None = None) -> dict:
    if recipe.data.format == "chat":
        stats = prepare_chat(tokenizer, uri, recipe, out_dir, split, open_binary)
    else:
        rows = Rows(uri, open_binary)
        with rows.at_row():
            stats = prepare_rows(row_format(recipe), tokenizer, rows, out_dir, split)
    check_overlong(uri, stats, recipe.data)
    return stats


@dataclass
class ChatCounts:
    """What happened to a split's chat rows on their way to documents (the manifest's counts)."""
    rows: int = 0
    examples: int = 0
    expanded: int = 0
    truncated: int = 0
    dropped: int = 0
    no_target: int = 0

    def documents(self, tokenizer: Any, row: dict, data: DataConfig) -> list[Document]:
        """The row's training documents (ids, trains mask), truncated or dropped as the recipe says."""
        toks = chat_examples(tokenizer, _messages(row, data), last_turn_only=data.train_on == "last_assistant_turn")
        return self._kept(toks, data)

    def documents_batch(self, tokenizer: Any, rows: list[dict], data: DataConfig) -> list[list[Document]]:
        """`documents` of each row, the rows rendered and tokenized together (see chat_examples_batch).
        The counts change only once every row has its examples, so a batch that raises can be redone
        row by row."""
        conversations = [_messages(row, data) for row in rows]
        examples = chat_examples_batch(tokenizer, conversations, last_turn_only=data.train_on == "last_assistant_turn")
        return [self._kept(toks, data) for toks in examples]

    def _kept(self, toks: list[Tokenized], data: DataConfig) -> list[Document]:
        """A row's examples as documents, counted; truncated or dropped where they are too long."""
        self.rows += 1
        self.examples += len(toks)
        self.expanded += len(toks) > 1  # a template that rewrites earlier turns: one example per reply
        docs = []
        for tok in toks:
            ids, mask = tok.input_ids, tok.assistant_mask
            if len(ids) > data.max_seq_len:
                if data.packing.overlong == "drop":
                    self.dropped += 1
                    continue
                self.truncated += 1
                ids, mask = ids[:data.max_seq_len], mask[:data.max_seq_len]
            if not any(mask[1:]):
                self.no_target += 1  # truncation cut every assistant token: nothing to learn from
                continue
            docs.append((ids, mask))
        return docs


def _messages(row: dict, data: DataConfig) -> list[dict]:
    return fold_system_prompt(row["messages"]) if data.fold_system_prompt else row["messages"]


def streaming_layout(recipe: Recipe, split: str) -> bool:
    """Training data in streaming mode stays unpacked (the trainer packs it); eval data is always
    packed offline."""
    return recipe.data.packing.mode == "streaming" and split == "train"


# Rows rendered and tokenized together (see chat_examples_batch): enough to make the per-call cost
# small, few enough that a batch's documents are a sliver of a shard's.
BATCH_ROWS = 256


def prepare_chat(tokenizer: Any, uri: str, recipe: Recipe, out_dir: Store, split: str,
                 open_binary: Opener | None = None) -> dict:
    streaming = streaming_layout(recipe, split)
    shards = ChatShards(out_dir, split, documents=streaming, max_len=recipe.data.max_seq_len,
                        pad_id=block_pad_id(tokenizer), packing=recipe.data.packing.enabled)
    counts = ChatCounts()
    source = Rows(uri, open_binary)
    for batch in source.batches(BATCH_ROWS):
        for lineno, docs in zip((n for n, _ in batch), _batch_documents(counts, tokenizer, batch, recipe.data, source),
                                strict=True):
            for ids, mask in docs:
                shards.add(ids, mask, row=lineno)  # evaluation scores each eval example by its line
    shards.close()
    return chat_stats(counts, shards, recipe.data.max_seq_len, streaming)


def _batch_documents(counts: ChatCounts, tokenizer: Any, batch: list[tuple[int, dict]], data: DataConfig,
                     source: Rows) -> list[list[Document]]:
    """The documents of a batch of rows. Where the batch fails (a row the template refuses, a row
    without messages), its rows go again one by one, so the error is the row's own and, for the
    template, names its line, as it did before rows were batched."""
    try:
        return counts.documents_batch(tokenizer, [row for _, row in batch], data)
    except Exception:  # whatever it was, the row-by-row pass raises it for the right row
        return [_row_documents(counts, tokenizer, lineno, row, data, source) for lineno, row in batch]


def _row_documents(counts: ChatCounts, tokenizer: Any, lineno: int, row: dict, data: DataConfig,
                   source: Rows) -> list[Document]:
    source.lineno = lineno
    with source.at_row():
        return counts.documents(tokenizer, row, data)


def chat_stats(counts: ChatCounts, shards: Any, max_len: int, streaming: bool) -> dict:
    """A chat split's manifest entry; `shards` has the written shards' totals (see ChatShards)."""
    return {
        "rows": counts.rows,
        # Training examples the rows gave (more than rows where the chat template rewrites earlier
        # turns, so each reply is an example of its own) and how many rows did that.
        "examples": counts.examples,
        "expanded_rows": counts.expanded,
        "documents": shards.documents,
        "tokens": shards.tokens,
        "assistant_tokens": shards.assistant_tokens,
        # For the streaming layout: what offline packing would give.
        "blocks": shards.blocks,
        "fill_ratio": round(shards.tokens / (shards.blocks * max_len), 4) if shards.blocks else 0.0,
        "truncated": counts.truncated,
        "dropped_overlong": counts.dropped,
        "dropped_no_target": counts.no_target,
        "layout": "documents" if streaming else "blocks",
        "shards": shards.names,
    }


def require_teacher_tokenizer(recipe: Recipe, student_fingerprint: str, models: ModelFs | None = None) -> None:
    """Distillation compares the two models' distributions token by token: the teacher must
    split text into the same ids as the student."""
    teacher = tokenizer_fingerprint(load_tokenizer(recipe.kd.teacher, models))
    if teacher != student_fingerprint:
        raise TokenizerMismatch(
            f"kd.teacher {recipe.kd.teacher}: its tokenizer has fingerprint {teacher}, the student's "
            f"({recipe.tokenizer_uri}) has {student_fingerprint}; distillation needs the same tokenizer")


def split_uris(recipe: Recipe) -> dict[str, str]:
    return {"train": recipe.data.train, **({"eval": recipe.data.eval} if recipe.data.eval else {})}


def load_checked_tokenizer(recipe: Recipe, models: ModelFs | None = None) -> Any:
    tokenizer = load_tokenizer(recipe.tokenizer_uri, models)
    if recipe.kd is not None:  # refused here, before a model is trained on it
        require_teacher_tokenizer(recipe, tokenizer_fingerprint(tokenizer), models)
    return tokenizer


def tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records of the tokenizer (the Ray prepare's driver gets them from its
    workers, so it never loads the tokenizer itself)."""
    return {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "block_pad_id": block_pad_id(tokenizer)}


def manifest_for(recipe: Recipe, facts: dict[str, Any], splits: dict[str, dict]) -> dict:
    """The manifest of prepared data: the one layout both the local and the Ray prepare write.
    `facts`: the tokenizer's (tokenizer_facts)."""
    return {
        "format": recipe.data.format,
        "max_seq_len": recipe.data.max_seq_len,
        "packing": recipe.data.packing.model_dump(),
        "tokenizer": {"uri": recipe.tokenizer_uri, **facts},
        "splits": splits,
    }


def prepare(recipe: Recipe, workspace: Path | str | Store, open_binary: Opener | None = None,
            models: ModelFs | None = None) -> dict:
    """Tokenize, mask and pack the recipe's splits into workspace/data; return the manifest. The
    workspace is a local folder, a URI (its filesystem configured from the environment) or a Store
    (the Airflow task's, reached through the recipe's storage connection); `models` gives the
    filesystem that reaches an s3:// tokenizer or teacher (the task's connection; default: the
    environment's)."""
    tokenizer = load_checked_tokenizer(recipe, models)
    out_dir = (workspace if isinstance(workspace, Store) else Store.at(workspace)) / "data"
    splits = {name: prepare_split(tokenizer, uri, recipe, out_dir, name, open_binary)
              for name, uri in split_uris(recipe).items()}
    manifest = manifest_for(recipe, tokenizer_facts(tokenizer), splits)
    (out_dir / "manifest.json").write_json(manifest)
    return manifest
