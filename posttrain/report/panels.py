"""The report's panels, built from `RunData`. Every panel is always there: without its data it says
what is missing and which task writes it, instead of failing or disappearing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import posttrain.report.plots as plots
from posttrain.eval_metrics import METRICS
from posttrain.promotion_stats import contributions
from posttrain.report.collect import RunData

STATE_COLORS = {"success": "#188038", "failed": "#d93025", "upstream_failed": "#e8710a", "skipped": "#9aa0a6"}


@dataclass
class Panel:
    key: str  # the element id, stable for tests and links
    title: str
    body: str  # HTML
    has_data: bool


def empty(key: str, title: str, why: str) -> Panel:
    return Panel(key, title, f'<p class="empty">No data: {escape(why)}</p>', False)


def image(key: str, title: str, uri: str, caption: str = "") -> Panel:
    note = f'<p class="note">{escape(caption)}</p>' if caption else ""
    return Panel(key, title, f'<img alt="{escape(title)}" src="{uri}">{note}', True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(value: Any) -> str:
    if value is None:
        return '<span class="none">–</span>'
    if isinstance(value, float):
        return f"{value:.6g}"
    return escape(str(value))


NO_STEPS = "train/metrics.jsonl has no steps (the train task did not run, or failed before its first logged step)"


def step_panel(run: RunData, key: str, title: str, keys: dict[str, str], ylabel: str, why: str = NO_STEPS,
               log_y: bool = False) -> Panel:
    """A per-step plot of metrics.jsonl columns (column → legend label); empty where none has a value."""
    if not run.steps:
        return empty(key, title, NO_STEPS)
    series = {label: ([r["step"] for r in run.steps], [r.get(column) for r in run.steps])
              for column, label in keys.items()}
    series = {label: xy for label, xy in series.items() if any(v is not None for v in xy[1])}
    if not series:
        return empty(key, title, why)
    return image(key, title, plots.lines(series, "step", ylabel, log_y=log_y))


def training(run: RunData) -> list[Panel]:
    mfu_why = ("MFU was not reported (no Llama-family config.json for the model, or no peak FLOP/s known for "
               "the device: set tracking.peak_tflops; the train log says which)")
    return [
        step_panel(run, "train-loss", "Training loss", {"loss": "loss"}, "loss"),
        step_panel(run, "train-lr", "Learning rate", {"lr": "learning rate"}, "learning rate"),
        step_panel(run, "train-grad-norm", "Gradient norm", {"grad_norm": "grad norm (before clipping)"},
                   "grad norm"),
        step_panel(run, "train-tokens-per-s", "Tokens per second",
                   {"tokens_per_s": "all workers", "tokens_per_s_per_device": "per device"}, "tokens/s"),
        step_panel(run, "train-mfu", "Model FLOPs utilization", {"mfu": "MFU"}, "MFU", why=mfu_why),
    ]


def data(run: RunData) -> list[Panel]:
    manifest = run.manifest if isinstance(run.manifest, dict) else None
    missing = "data/manifest.json was not written (the prepare_data task did not run or failed)"
    if manifest is None:
        return [empty("data-lengths", "Example lengths", missing), empty("data-fill", "Packing fill", missing),
                empty("data-rows", "Rows kept, truncated and dropped", missing)]
    max_len = manifest.get("max_seq_len")
    series = {f"{split} {label}": values for split, lengths in run.lengths.items()
              for label, values in lengths.series.items() if values}
    sampled = [f"{split}: {n.shards_read} of {n.shards} shards" for split, n in run.lengths.items()
               if n.shards_read < n.shards]
    note = f"Tokens per example; max_seq_len {max_len}." + (f" Read {', '.join(sampled)}." if sampled else "")
    panels = [image("data-lengths", "Example lengths", plots.histogram(series, "tokens", limit=max_len), note)
              if series else empty("data-lengths", "Example lengths", "no shard of data/ could be read")]
    fills = {split: lengths.fills for split, lengths in run.lengths.items() if lengths.fills}
    splits = manifest.get("splits") or {}
    ratios = ", ".join(f"{s} {i['fill_ratio']:.1%}" for s, i in splits.items() if i.get("fill_ratio") is not None)
    if fills:
        panels.append(image("data-fill", "Packing fill", plots.histogram(fills, "fraction of the block holding tokens",
                                                                          bins=20, limit=1.0),
                            f"Per packed block; fill ratio over each split: {ratios}."))
    else:
        layout = next(iter(splits.values()), {}).get("layout", "?")
        panels.append(empty("data-fill", "Packing fill", f"the {layout} layout has no packed blocks"
                            + (" (streaming packing: the trainer packs as it reads)" if layout == "documents" else "")))
    fields = ("rows", "examples", "documents", "pairs", "prompts", "tokens", "assistant_tokens", "blocks",
              "fill_ratio", "truncated", "dropped_overlong", "dropped_no_target", "expanded_rows")
    present = [f for f in fields if any(f in info for info in splits.values())]
    rows = [[split] + [info.get(f) for f in present] for split, info in splits.items()]
    overlong = (manifest.get("packing") or {}).get("overlong")
    panels.append(Panel("data-rows", "Rows kept, truncated and dropped",
                        table(["split", *present], rows) + f'<p class="note">Rows over max_seq_len {max_len}: '
                        f'{escape(str(overlong))} (packing.overlong).</p>', bool(rows)))
    return panels


def evaluation(run: RunData) -> list[Panel]:
    return [eval_metrics(run), comparison(run)]


def eval_metrics(run: RunData) -> Panel:
    title = "Evaluation metrics"
    if not isinstance(run.eval_metrics, dict):
        return empty("eval-metrics", title, "eval/metrics.json was not written (the evaluate task did not run "
                                            "or failed)")
    version = (run.champion or {}).get("version")
    rows = []
    for name, value in run.eval_metrics.items():
        mine, theirs = paired_aggregates(run, name)
        known = METRICS.get(name)
        better = None if known is None else ("lower" if known.lower_is_better else "higher")
        diff = mine - theirs if mine is not None and theirs is not None else None
        rows.append([name, value, theirs, diff, better])
    header = ["metric", "this run", f"champion {version}" if version else "champion", "difference", "better"]
    note = ("Champion values over the examples both models scored (from their eval/per_example.parquet)."
            if version else "No champion to compare with yet.")
    return Panel("eval-metrics", title, table(header, rows) + f'<p class="note">{escape(note)}</p>', True)


def paired_aggregates(run: RunData, metric: str) -> tuple[float | None, float | None]:
    """This run's and the champion's aggregate of `metric` over the examples both scored."""
    if run.mine is None or run.theirs is None:
        return None, None
    try:
        mine, theirs = contributions(run.mine[0], metric), contributions(run.theirs[0], metric)
    except ValueError:  # a count such as eval_tokens, or a metric one side did not measure
        return None, None
    ids = mine.keys() & theirs.keys()
    if not ids:
        return None, None

    def aggregate(values: dict[str, tuple[float, float]]) -> float:
        return sum(values[i][0] for i in ids) / sum(values[i][1] for i in ids)

    return aggregate(mine), aggregate(theirs)


def comparison(run: RunData) -> Panel:
    title = "Promotion decision"
    d = run.decision
    if not isinstance(d, dict):
        return empty("eval-comparison", title, "promotion/decision.json was not written (the promote task did "
                                               "not run or failed before deciding)")
    verdict = "promoted" if d.get("promoted") else "not promoted"
    body = (f'<p class="verdict {"good" if d.get("promoted") else "bad"}">{escape(verdict)}</p>'
            f'<p>{escape(str(d.get("reason", "")))}</p>')
    c = d.get("comparison")
    promotion = (run.recipe or {}).get("promotion") or {}
    if isinstance(c, dict) and all(isinstance(c.get(k), int | float) for k in ("difference", "low", "high")):
        uri = plots.interval(c["difference"], c["low"], c["high"], float(promotion.get("min_improvement") or 0),
                             promotion.get("mode") or "min", c.get("metric", d.get("metric", "")),
                             c.get("confidence_level", 0.95))
        body += f'<img alt="{escape(title)}" src="{uri}">'
        body += table(["n", "difference", "low", "high", "level", "resamples", "seed"],
                      [[c.get("n"), c["difference"], c["low"], c["high"], c.get("confidence_level"),
                        c.get("resamples"), c.get("seed")]])
    else:
        body += '<p class="note">No paired interval: ' + escape(
            "there was no champion to pair with" if not d.get("previous_champion")
            else f"promotion.decision is {d.get('decision')}, or the two could not be paired") + ".</p>"
    return Panel("eval-comparison", title, body, True)


def generations(run: RunData) -> Panel:
    title = "Generations: champion and challenger"
    if not run.examples:
        why = ("eval/per_example.parquet was not written (the evaluate task did not run or failed)"
               if run.mine is None else f"this run's evaluation generates nothing for {run.paradigm} "
                                        "(or the model has a custom head vLLM cannot run)")
        return empty("generations", title, why)
    version = (run.champion or {}).get("version")
    rows = [[e.example_id, e.prompt, e.reference, e.champion, e.challenger] for e in run.examples]
    note = (f"The champion is {version}." if version else "No champion yet: this run's generations only.")
    if version and all(e.champion is None for e in run.examples):
        note += " Its per-example results hold no generations for these examples."
    return Panel("generations", title, table(["example", "prompt", "reference", f"champion {version or ''}",
                                              "challenger (this run)"], rows)
                 + f'<p class="note">{escape(note)}</p>', True)


def tasks(run: RunData) -> Panel:
    title = "Wall time per task"
    if not run.tasks:
        return empty("tasks", title, "the task instances of this DAG run were not available to the report")
    timed = [t for t in run.tasks if isinstance(t.get("duration"), int | float)]
    rows = [[t["task_id"], t.get("state") or "not finished",
             f"{t['duration']:.1f}" if isinstance(t.get("duration"), int | float) else None] for t in run.tasks]
    total = sum(t["duration"] for t in timed)
    body = table(["task", "state", "seconds"], rows) + f'<p class="note">Finished tasks: {total:.1f} s in all.</p>'
    if timed:
        uri = plots.bars([t["task_id"] for t in timed], [t["duration"] for t in timed],
                         [STATE_COLORS.get(str(t.get("state")), "#1a73e8") for t in timed], "seconds")
        body = f'<img alt="{escape(title)}" src="{uri}">' + body
    return Panel("tasks", title, body, True)


def paradigm(run: RunData) -> list[Panel]:
    builders: dict[str, Callable[[RunData], list[Panel]]] = {"dpo": dpo, "kd": kd, "grpo": grpo}
    if run.paradigm in builders:
        return builders[run.paradigm](run)
    return [Panel("paradigm-sft", "Supervised fine-tuning",
                  '<p class="note">SFT logs no metrics beyond the training panels above.</p>', True)]


def dpo(run: RunData) -> list[Panel]:
    return [step_panel(run, "dpo-rewards", "DPO implicit rewards",
                       {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margin": "margin"},
                       "reward", why="no rewards/* columns in train/metrics.jsonl"),
            step_panel(run, "dpo-accuracy", "DPO reward accuracy", {"rewards/accuracy": "chosen > rejected"},
                       "fraction of pairs", why="no rewards/accuracy column in train/metrics.jsonl")]


def kd(run: RunData) -> list[Panel]:
    keys = sorted({k for r in run.steps for k in r if k.startswith("kd/") and k != "kd/cross_entropy"})
    return [step_panel(run, "kd-divergence", "Distillation divergence",
                       {**{k: k.removeprefix("kd/") for k in keys}, "kd/cross_entropy": "cross-entropy"},
                       "per assistant token", why="no kd/* columns in train/metrics.jsonl")]


def grpo(run: RunData) -> list[Panel]:
    functions = sorted({k for r in run.steps for k in r if k.startswith("reward/") and not k.endswith("_std")
                        and k != "reward/std"})
    return [step_panel(run, "grpo-rewards", "GRPO reward per function",
                       {k: k.removeprefix("reward/") for k in functions}, "reward",
                       why="no reward/* columns in train/metrics.jsonl"),
            step_panel(run, "grpo-completion-length", "GRPO completion length", {"completion_len": "mean"},
                       "tokens", why="no completion_len column in train/metrics.jsonl"),
            step_panel(run, "grpo-kl", "GRPO KL to the reference and clipped fraction",
                       {"kl": "KL", "clip_fraction": "clip fraction"}, "value",
                       why="no kl or clip_fraction column in train/metrics.jsonl")]
