"""What the report reads from a run workspace, one file at a time: a file that was never written is
None (its panel says which task writes it); one that can't be read goes to `problems` with its URI
and why (the report shows them), and nothing stops the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.promotion_stats import ID, Table, example_id, read_table
from posttrain.storage_fs import Store

# Shards per split read for the length histograms: enough for the shape, bounded for a large split.
MAX_SHARDS = 4
# Generations shown side by side.
SIDE_BY_SIDE = 10
# The length columns of each shard layout (posttrain/prep): label → column.
LENGTH_COLUMNS = {"blocks": {"documents": "doc_lens"}, "documents": {"documents": "input_ids"},
                  "pairs": {"chosen": "chosen_input_ids", "rejected": "rejected_input_ids"},
                  "prompts": {"prompts": "prompt_input_ids"}}

Locate = Callable[[str], Store]


@dataclass
class Lengths:
    """Token lengths of a split's examples (per label: documents, chosen/rejected sequences, prompts)
    and each packed block's fill, from the first `shards_read` of its `shards` shards."""

    series: dict[str, list[int]]
    fills: list[float]
    shards_read: int
    shards: int


@dataclass
class Example:
    """One eval example shown side by side: what was asked, what was expected, both generations."""

    example_id: str
    prompt: str | None
    reference: str | None
    challenger: str | None
    champion: str | None


@dataclass
class RunData:
    workspace: str
    recipe: dict | None = None
    steps: list[dict] = field(default_factory=list)  # train/metrics.jsonl, one row per logged step
    summary: dict | None = None
    manifest: dict | None = None
    lengths: dict[str, Lengths] = field(default_factory=dict)
    eval_metrics: dict | None = None
    decision: dict | None = None
    mine: Table | None = None  # this run's eval/per_example.parquet
    champion: dict | None = None  # the champion record this run is compared with
    theirs: Table | None = None  # the champion's per-example results
    examples: list[Example] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)  # {task_id, state, duration (s) or None}
    problems: list[str] = field(default_factory=list)

    @property
    def paradigm(self) -> str:
        return (self.recipe or {}).get("paradigm", "sft")


class Reader:
    """Reads files of any URI through `locate`, recording what it could not read."""

    def __init__(self, locate: Locate, problems: list[str]):
        self.locate, self.problems = locate, problems

    def _fail(self, uri: str, exc: Exception) -> None:
        self.problems.append(f"{uri}: {type(exc).__name__}: {exc}")

    def json(self, uri: str) -> Any:
        try:
            store = self.locate(uri)
            return store.read_json() if store.exists() else None
        except (OSError, ValueError) as exc:
            self._fail(uri, exc)
            return None

    def jsonl(self, uri: str) -> list[dict]:
        try:
            store = self.locate(uri)
            if not store.exists():
                return []
            text = store.read_text()
        except (OSError, ValueError) as exc:
            self._fail(uri, exc)
            return []
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # e.g. a line cut off by a killed writer: the rest still counts
                self.problems.append(f"{uri} line {lineno}: not valid JSON ({exc.msg}); line left out")
        return rows

    def table(self, uri: str | None) -> Table | None:
        if not uri:
            return None
        try:
            store = self.locate(uri)
            if not store.exists():
                return None
            with store.open("rb") as fh:
                return read_table(fh)
        except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
            self._fail(uri, exc)
            return None


def collect(locate: Locate, workspace: str, tasks: list[dict] | None = None) -> RunData:
    """Everything the report shows, from the workspace at `workspace` (and the champion's results)."""
    workspace = workspace.rstrip("/")
    run = RunData(workspace, tasks=list(tasks or []))
    read = Reader(locate, run.problems)
    run.recipe = read.json(f"{workspace}/recipe.json")
    run.steps = last_per_step(read.jsonl(f"{workspace}/train/metrics.jsonl"))
    run.summary = read.json(f"{workspace}/train/summary.json")
    run.manifest = read.json(f"{workspace}/data/manifest.json")
    if isinstance(run.manifest, dict):
        for split, info in (run.manifest.get("splits") or {}).items():
            lengths = split_lengths(read, workspace, info, run.manifest.get("max_seq_len"))
            if lengths is not None:
                run.lengths[split] = lengths
    run.eval_metrics = read.json(f"{workspace}/eval/metrics.json")
    run.decision = read.json(f"{workspace}/promotion/decision.json")
    run.mine = read.table(f"{workspace}/eval/per_example.parquet")
    run.champion = compared_champion(read, run)
    if run.champion:
        run.theirs = read.table(run.champion.get("per_example_uri"))
    samples = read.jsonl(f"{workspace}/eval/samples.jsonl")
    run.examples = side_by_side(read, run, samples)
    return run


def last_per_step(rows: list[dict]) -> list[dict]:
    """One row per step, in step order: a job resumed from a checkpoint logs the steps after it again,
    and the later record is the one that counts."""
    by_step = {r["step"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def split_lengths(read: Reader, workspace: str, info: dict, max_len: int | None) -> Lengths | None:
    columns = LENGTH_COLUMNS.get(info.get("layout", ""))
    shards = info.get("shards") or []
    if not columns or not shards:
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    series: dict[str, list[int]] = {label: [] for label in columns}
    fills: list[float] = []
    read_count = 0
    for name in shards[:MAX_SHARDS]:
        uri = f"{workspace}/{name}"
        try:
            with read.locate(uri).open("rb") as fh:
                table = pq.read_table(fh, columns=list(columns.values()))
        except Exception as exc:  # missing shard, not Parquet, another layout's columns
            read._fail(uri, exc)
            continue
        read_count += 1
        for label, column in columns.items():
            values = table.column(column).combine_chunks()
            if column == "doc_lens":  # a packed block's documents: their lengths, and the block's fill
                series[label].extend(values.flatten().to_pylist())
                if max_len:
                    fills.extend(sum(lens) / max_len for lens in values.to_pylist())
            else:
                series[label].extend(pc.list_value_length(values).to_pylist())
    if not read_count:
        return None
    return Lengths(series, fills, read_count, len(shards))


def compared_champion(read: Reader, run: RunData) -> dict | None:
    """The champion this run was compared with: the one promote decided against, else (no decision:
    promote did not run) the current pointer, unless it names this run."""
    if isinstance(run.decision, dict) and "previous_champion" in run.decision:
        return run.decision["previous_champion"]
    recipe = run.recipe or {}
    root, name = (recipe.get("storage") or {}).get("root"), recipe.get("name")
    if not root or not name:
        return None
    pointer = read.json(f"{str(root).rstrip('/')}/{name}/champion.json")
    if not isinstance(pointer, dict) or pointer.get("workspace", "").rstrip("/") == run.workspace:
        return None
    return pointer


def side_by_side(read: Reader, run: RunData, samples: list[dict]) -> list[Example]:
    """Up to SIDE_BY_SIDE examples with this run's generation, the champion's on the same example
    where it has one, and the prompt and reference where they can be found again."""
    if run.mine is None or "generated" not in run.mine[0]:
        return []
    cols = run.mine[0]
    mine = {i: g for i, g in zip(cols[ID], cols["generated"], strict=True) if g is not None}
    theirs: dict[str, str] = {}
    if run.theirs is not None and "generated" in run.theirs[0]:
        t = run.theirs[0]
        theirs = {i: g for i, g in zip(t[ID], t["generated"], strict=True) if g is not None}
    both = [i for i in mine if i in theirs]
    chosen = sorted(both or mine, key=_line_of)[:SIDE_BY_SIDE]
    context = prompts_of(read, run, chosen, samples)
    return [Example(i, *context.get(i, (None, None)), mine[i], theirs.get(i)) for i in chosen]


def _line_of(example: str) -> tuple[int, str]:
    head = example.split("-", 1)[0]
    return (int(head), example) if head.isdigit() else (0, example)


def prompts_of(read: Reader, run: RunData, ids: list[str], samples: list[dict]) -> dict[str, tuple[str, str]]:
    """example id → (prompt, reference). Chat: the eval file's line the id names (only when the row
    there still hashes to the id). Prompts (GRPO): the run's samples, which follow the split's order."""
    recipe = run.recipe or {}
    data = recipe.get("data") or {}
    found: dict[str, tuple[str, str]] = {}
    if data.get("format", "chat") == "chat" and data.get("eval"):
        wanted = {_line_of(i)[0]: i for i in ids}
        uri = data["eval"]
        try:
            with read.locate(uri).open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if lineno > max(wanted, default=0):
                        break
                    if lineno in wanted and raw.strip():
                        row = json.loads(raw)
                        if example_id(lineno, row) == wanted[lineno]:
                            found[wanted[lineno]] = chat_prompt(row.get("messages") or [])
        except (OSError, ValueError) as exc:
            read._fail(uri, exc)
    elif samples and run.mine is not None:
        order, generated = run.mine[0][ID], run.mine[0]["generated"]
        for index, sample in enumerate(samples[: len(order)]):
            # The samples follow the per-example rows; a sample whose generation differs is another one.
            if order[index] in ids and sample.get("generated") == generated[index]:
                found[order[index]] = (last_user(sample.get("prompt") or []), str(sample.get("answer", "")))
    return found


def chat_prompt(messages: list[dict]) -> tuple[str, str]:
    """(the last user turn before the final reply, the final reply): what the model was asked to write."""
    reply = messages[-1].get("content", "") if messages and messages[-1].get("role") == "assistant" else ""
    return last_user(messages[:-1] if reply else messages), str(reply)


def last_user(messages: list[dict]) -> str:
    users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""
