"""Validation report: the JSON a program reads, the HTML a person reads, the summary a task log shows."""

from __future__ import annotations

import html
from dataclasses import asdict
from typing import Any

from posttrain.validation.frames import Frames
from posttrain.validation.suites import RuleResult


def split_report(source: str, frames: Frames, results: list[RuleResult]) -> dict[str, Any]:
    failed = [r for r in results if not r.success]
    return {
        "source": source,
        "rows": int(len(frames.rows)),
        "turns": int(len(frames.turns)),
        "unreadable_lines": frames.unreadable,
        "rules": [asdict(r) for r in results],
        "passed": sum(r.success for r in results),
        "failed": len(failed) + (1 if frames.unreadable else 0),
        "success": not failed and not frames.unreadable,
    }


def summary(report: dict[str, Any]) -> str:
    """One line per failed rule, naming the file, the rule and example line numbers."""
    lines = []
    for split, rep in report["splits"].items():
        if rep["unreadable_lines"]:
            first = rep["unreadable_lines"][:5]
            lines.append(f"{rep['source']} ({split}): {len(rep['unreadable_lines'])} unreadable line(s): "
                         + "; ".join(f"line {u['line']}: {u['error']}" for u in first))
        for rule in rep["rules"]:
            if not rule["success"]:
                where = f" e.g. line(s) {', '.join(map(str, rule['example_lines']))}" if rule["example_lines"] else ""
                count = (f" ({rule['unexpected_count']} failing)" if rule["unexpected_count"]
                         else f" (rows: {rep['rows']})")
                lines.append(f"{rep['source']} ({split}): rule '{rule['rule']}' failed{count}{where}")
    return "\n".join(lines)


def to_html(report: dict[str, Any]) -> str:
    rows = []
    for split, rep in report["splits"].items():
        for rule in rep["rules"]:
            status = "pass" if rule["success"] else "FAIL"
            rows.append(f"<tr class='{status}'><td>{html.escape(split)}</td><td>{html.escape(rule['rule'])}</td>"
                        f"<td>{status}</td><td>{rule['unexpected_count']}</td>"
                        f"<td>{', '.join(map(str, rule['example_lines']))}</td></tr>")
        for bad in rep["unreadable_lines"][:50]:
            rows.append(f"<tr class='FAIL'><td>{html.escape(split)}</td><td>readable JSON object</td><td>FAIL</td>"
                        f"<td>1</td><td>{bad['line']}: {html.escape(bad['error'])}</td></tr>")
    verdict = "passed" if report["success"] else "failed"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>posttrain data validation</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
            ".FAIL{background:#fdd}</style></head><body>"
            f"<h1>Data validation {verdict}</h1><p>recipe {html.escape(report['recipe'])}</p>"
            "<table><tr><th>split</th><th>rule</th><th>status</th><th>failing rows</th><th>example lines</th></tr>"
            + "".join(rows) + "</table></body></html>")
