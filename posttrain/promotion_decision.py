"""What promotion decides against a champion, and what a reviewer sees before it does.

One function decides (`decide_against`): the promote task calls it when it promotes, and the
approval gate (posttrain/operators/approval.py) calls it first to show the reviewer the same
numbers: the metric, the paired interval, the decision it would lead to, and a few generations of
challenger and champion side by side (`review_markdown`). Torch-free and airflow-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.promotion_stats import ID, Paired, Table, compare, decide_by_interval

PER_EXAMPLE = "eval/per_example.parquet"
# Reads a per-example file by URI: None when it is absent; OSError/ValueError when unreadable.
TableReader = Callable[[str], "Table | None"]


def decide(value: float, champion: dict | None, mode: str, min_improvement: float, metric: str) -> tuple[bool, str]:
    """The `mean` decision: the challenger's aggregate against the champion's."""
    if champion is None:
        return True, f"no champion yet; {metric} {value:.6g}"
    best = champion["value"]
    gain = (best - value) if mode == "min" else (value - best)
    verb = "lower" if mode == "min" else "higher"
    if gain > min_improvement or (min_improvement == 0 and gain > 0):
        return True, f"{metric} {value:.6g} beats champion {champion['version']} ({best:.6g}) by {gain:.6g}"
    return False, (f"{metric} {value:.6g} is not {verb} than champion {champion['version']} ({best:.6g}) "
                   f"by more than {min_improvement:g}")


def champion_table(mine: Table | None, champion: dict, read: TableReader) -> tuple[Table | None, str | None]:
    """The champion's per-example table, or why there is none to pair with."""
    if mine is None:
        return None, f"this run's evaluation wrote no {PER_EXAMPLE}"
    uri = champion.get("per_example_uri")
    if not uri:
        return None, "the champion has no per-example results (promoted before they were recorded)"
    try:
        theirs = read(uri)
    except (OSError, ValueError) as exc:  # not Parquet, or unreadable: no pairing, no promotion
        return None, f"the champion's per-example results {uri} could not be read ({exc})"
    if theirs is None:
        return None, f"the champion's per-example results {uri} are gone"
    return theirs, None


def decide_against(p: Any, champion_uri: str, value: float, mine: Table | None, champion: dict | None,
                   read: TableReader) -> dict[str, Any]:
    """The decision against `champion` (`p`: the recipe's promotion section), with its numbers and
    the reason in one sentence."""
    paired: Paired | None = None
    why: str | None = None
    theirs: Table | None = None
    if champion is not None:
        theirs, why = champion_table(mine, champion, read)
        if theirs is not None and mine is not None:
            paired, why = compare(mine, theirs, p.metric, p.confidence_level, p.bootstrap_resamples,
                                  p.bootstrap_seed)
    if champion is None or p.decision == "mean":
        promote, reason = decide(value, champion, p.mode, p.min_improvement, p.metric)
    elif paired is None:
        promote, reason = False, (f"could not compare with champion {champion['version']} example by "
                                  f"example ({why}), so not promoted (promotion.decision: confidence)")
    else:
        promote, reason = decide_by_interval(paired, p.mode, p.min_improvement, champion["version"])
    return {"promoted": promote, "reason": reason, "decision": p.decision, "metric": p.metric,
            "value": value, "comparison": paired.as_dict() if paired else None,
            "champion_uri": champion_uri, "previous_champion": champion}


def side_by_side(mine: Table | None, theirs: Table | None, limit: int = 5) -> list[dict[str, str | None]]:
    """Up to `limit` examples both models generated for: id, challenger's and champion's text
    (the champion's is None without a champion)."""
    if mine is None or "generated" not in mine[0]:
        return []
    cols = mine[0]
    champion_text: dict[str, Any] = {}
    if theirs is not None and "generated" in theirs[0]:
        champion_text = dict(zip(theirs[0][ID], theirs[0]["generated"], strict=True))
    rows = []
    for example, text in zip(cols[ID], cols["generated"], strict=True):
        if text is None or (champion_text and example not in champion_text):
            continue
        rows.append({"example_id": example, "challenger": text, "champion": champion_text.get(example)})
        if len(rows) == limit:
            break
    return rows


def _cell(text: str | None, width: int = 160) -> str:
    if text is None:
        return "—"
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def review_markdown(decision: dict[str, Any], samples: list[dict[str, str | None]], timeout_s: int) -> str:
    """The approval task's body (Markdown): what promote would decide, its numbers, the samples."""
    champion = decision["previous_champion"]
    lines = [f"**{decision['metric']}**: {decision['value']:.6g} (this run)"]
    if champion is None:
        lines.append("**champion**: none yet — approving makes this run the first champion")
    else:
        lines.append(f"**champion**: {champion['version']} ({decision['metric']} {champion['value']:.6g})")
    if (c := decision["comparison"]) is not None:
        lines.append(f"**paired difference** (challenger − champion over {c['n']} examples): "
                     f"{c['difference']:+.6g}, {c['confidence_level']:.0%} interval "
                     f"[{c['low']:+.6g}, {c['high']:+.6g}]")
    verdict = "promote" if decision["promoted"] else "do not promote"
    lines.append(f"**the rule says**: {verdict} — {decision['reason']}")
    lines.append(f"No answer within {timeout_s} s: not promoted.")
    text = "\n\n".join(lines)
    if samples:  # a table: its rows one per line
        rows = [f"| {s['example_id']} | {_cell(s['challenger'])} | {_cell(s['champion'])} |" for s in samples]
        text += "\n\n" + "\n".join(["| example | challenger | champion |", "|---|---|---|", *rows])
    return text
